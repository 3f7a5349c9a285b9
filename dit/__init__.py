"""Native DiT: the official model re-implemented, checkpoint loading, diffusers conversion."""
from dit.checkpoints import (
    OFFICIAL_CHECKPOINTS,
    CheckpointNotFoundError,
    build_dit,
    load_checkpoint_state_dict,
    load_state_dict_checked,
    official_checkpoint_for,
    resolve_checkpoint,
)
from dit.convert import (
    diffusers_to_official,
    load_diffusers_dit,
    official_kwargs_from_diffusers_config,
    official_to_diffusers,
)
from dit.models import DiT, DiT_models, dit_config

__all__ = [
    "DiT",
    "DiT_models",
    "dit_config",
    "build_dit",
    "resolve_checkpoint",
    "load_checkpoint_state_dict",
    "load_state_dict_checked",
    "CheckpointNotFoundError",
    "OFFICIAL_CHECKPOINTS",
    "official_checkpoint_for",
    "official_to_diffusers",
    "diffusers_to_official",
    "official_kwargs_from_diffusers_config",
    "load_diffusers_dit",
]
