"""Native LDM (Rombach et al. 2022): the CompVis U-Net, class conditioning, CompVis checkpoints."""
from .build import build_ldm, load_first_stage
from .compvis import (
    build_class_conditional_ldm,
    class_embedder_from_config,
    load_compvis_state_dict,
    read_compvis_config,
    split_prefix,
    unet_from_params,
)
from .conditioning import ClassConditionalLDM, ClassEmbedder
from .unet import UNetModel

__all__ = ["ClassConditionalLDM", "ClassEmbedder", "UNetModel", "build_class_conditional_ldm", "build_ldm",
           "load_first_stage", "class_embedder_from_config", "load_compvis_state_dict", "read_compvis_config",
           "split_prefix", "unet_from_params"]
