"""CompVis checkpoints and configs -> our models.

A CompVis LDM `.ckpt` is `{"state_dict": {...}, ...}` whose keys carry three prefixes:
`model.diffusion_model.` (the U-Net), `first_stage_model.` (the autoencoder) and
`cond_stage_model.` (here the class embedder); the diffusion buffers (`betas`, ...) and
the EMA copy (`model_ema.*`, names without dots) sit beside them. Its yaml's
`model.params` holds `unet_config`, `first_stage_config`, `cond_stage_config`,
`scale_factor`, `linear_start` / `linear_end`.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from diffusion.checkpoint_files import check_finite, read_safetensors, read_torch_file
from diffusion.errors import MissingFileError, UserError
from diffusion.state_dicts import load_state_dict_checked

from .conditioning import ClassConditionalLDM, ClassEmbedder
from .unet import UNetModel

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
COND_STAGE_PREFIX = "cond_stage_model."
EMA_PREFIX = "model_ema."
# class embedders CompVis and T-Stitch configs name; the CFG variant adds one null row
CLASS_EMBEDDERS = {"ClassEmbedder": 0, "ClassEmbedderCFG": 1}


def to_plain(config):
    """OmegaConf containers -> plain dicts/lists (resolved); anything else passes through."""
    if isinstance(config, (DictConfig, ListConfig)):
        return OmegaConf.to_container(config, resolve=True)
    return config


def read_compvis_config(path: str | os.PathLike) -> dict:
    """A CompVis yaml -> its `model.params` dict (a file holding only `params` also works)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(f"CompVis config {str(path)!r} does not exist")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    params = cfg.get("model", {}).get("params", cfg) if isinstance(cfg, dict) else None
    if not isinstance(params, dict) or "unet_config" not in params:
        raise UserError(f"{path}: not a CompVis LDM config (no model.params.unet_config)")
    return params


def check_kwargs(cls, kwargs: dict, where: str) -> dict:
    """Refuse constructor arguments `cls` does not take, naming them."""
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise UserError(f"{where} has arguments {cls.__name__} does not take: {unknown} "
                         f"(accepted: {sorted(accepted)})")
    required = {n for n, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is inspect.Parameter.empty and n != "self"}
    missing = sorted(required - set(kwargs))
    if missing:
        raise UserError(f"{where} lacks required arguments of {cls.__name__}: {missing}")
    return kwargs


def unet_from_params(params) -> UNetModel:
    """`unet_config.params` of a CompVis yaml (as is) -> a U-Net with random weights."""
    return UNetModel(**check_kwargs(UNetModel, dict(to_plain(params)), "unet_config.params"))


def class_embedder_from_config(cond_stage_config) -> ClassEmbedder:
    """`cond_stage_config` ({target, params}) -> the class embedder (random weights)."""
    cfg = dict(to_plain(cond_stage_config))
    kind = str(cfg.get("target", "ClassEmbedder")).rsplit(".", 1)[-1]
    if kind not in CLASS_EMBEDDERS:
        raise UserError(f"cond_stage_config target {cfg.get('target')!r}: only class-conditional LDMs "
                         f"({', '.join(CLASS_EMBEDDERS)}) are supported")
    params = dict(cfg.get("params", {}))
    extra_rows = CLASS_EMBEDDERS[kind] if params.pop("dropout_prob", 0.1) > 0 else 0
    params = check_kwargs(ClassEmbedder, params, "cond_stage_config.params")
    params["n_classes"] = params.get("n_classes", 1000) + extra_rows
    return ClassEmbedder(**params)


def load_compvis_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The `state_dict` of a CompVis `.ckpt` (or a `.safetensors`), read without unpickling code.

    Unreadable files and weights holding NaN/inf are a CheckpointError (diffusion.checkpoint_files);
    a Lightning checkpoint that pickles training objects is refused unread.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(f"LDM checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        state = read_safetensors(path)
    else:
        ckpt = read_torch_file(path, mmap=True)
        state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
        if not isinstance(state, dict):
            raise UserError(f"{path}: expected a dict with a 'state_dict', got {type(ckpt).__name__}")
    check_finite(state, path)
    return state


def split_prefix(state_dict: dict, prefix: str, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The entries under `prefix`, with the prefix removed; a clear error if there are none."""
    part = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not part:
        present = sorted({k.split(".", 1)[0] + "." for k in state_dict})
        raise UserError(f"{source} has no {prefix!r} keys (prefixes present: {present}); a CompVis LDM "
                         f"checkpoint has {UNET_PREFIX!r}, {FIRST_STAGE_PREFIX!r} and {COND_STAGE_PREFIX!r}")
    return part


def ema_unet_state(state_dict: dict, unet_keys) -> dict[str, torch.Tensor] | None:
    """The U-Net's EMA weights (CompVis LitEma stores `diffusion_model.a.b` as `model_ema.diffusion_modelab`)."""
    ema = {k: state_dict.get(EMA_PREFIX + ("diffusion_model." + k).replace(".", "")) for k in unet_keys}
    return ema if all(v is not None for v in ema.values()) else None


def build_class_conditional_ldm(state_dict: dict | None, unet_params, cond_stage_config, *,
                                use_ema: bool | None = None, name: str = "LDM",
                                source: str = "checkpoint") -> ClassConditionalLDM:
    """U-Net + class embedder from their CompVis configs, weights from a CompVis state dict (None: random).

    use_ema: the U-Net from the `model_ema.*` copy; None = when the checkpoint has a complete
    one (CompVis samples inside `ema_scope()`, i.e. with the EMA weights, whenever it exists).
    """
    model = ClassConditionalLDM(unet_from_params(unet_params), class_embedder_from_config(cond_stage_config), name)
    if state_dict is not None:
        unet_state = split_prefix(state_dict, UNET_PREFIX, source)
        ema = ema_unet_state(state_dict, model.unet.state_dict().keys()) if use_ema is not False else None
        if use_ema and ema is None:
            raise UserError(f"use_ema=true but {source} has no complete {EMA_PREFIX!r} copy of the U-Net")
        if ema is not None:
            unet_state = ema
        load_state_dict_checked(model.unet, unet_state, f"{source} [{UNET_PREFIX}*]")
        load_state_dict_checked(model.cond_stage_model, split_prefix(state_dict, COND_STAGE_PREFIX, source),
                     f"{source} [{COND_STAGE_PREFIX}*]")
    return model.eval()
