"""T-Stitch on stock diffusers pipelines: a small denoiser for the first steps of `pipe(...)`.

    pipe = get_tstitch_pipeline("stabilityai/stable-diffusion-xl-base-1.0", "segmind/SSD-1B", ratio=0.4)
    image = pipe(prompt, unet_s_ratio=0.4).images[0]      # or ratio=...; per call

`stitch_pipeline(pipe, small)` puts a `StitchedDenoiser` in place of `pipe.unet` (or
`pipe.transformer`) and gives the pipeline object a subclass of its own class whose
`__call__` takes `unet_s_ratio` / `ratio` / `fractions` and then runs the pipeline's own
`__call__` (no pipeline code is copied, so every pipeline that calls its denoiser works:
text-to-image, img2img, ControlNet, LCM ...). `unstitch_pipeline(pipe)` puts the original
denoiser and class back.
"""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from diffusion.errors import UserError

from .pipeline_compat import check_denoiser_pair
from .rules import check_rule
from .schedule import resolve_fractions
from .stitched import StitchedDenoiser

DENOISER_NAMES = ("unet", "transformer")
_CLASSES: dict[type, type] = {}  # pipeline class -> its stitched subclass


def denoiser_name(pipe) -> str:
    """'unet' or 'transformer': the pipeline component that denoises."""
    for name in DENOISER_NAMES:
        if isinstance(getattr(pipe, name, None), nn.Module):
            return name
    raise TypeError(f"{type(pipe).__name__} has no `unet` or `transformer` to stitch")


def is_stitched(pipe) -> bool:
    return isinstance(getattr(pipe, "unet", None), StitchedDenoiser) or \
        isinstance(getattr(pipe, "transformer", None), StitchedDenoiser)


def _stitched_class(cls: type) -> type:
    if cls not in _CLASSES:
        def __call__(self, *args, unet_s_ratio=None, ratio=None, fractions=None, **kwargs):
            """The pipeline's own call; `unet_s_ratio` / `ratio` (the small model's fraction) or
            `fractions` (one per model) apply to this call only, else the stitched default."""
            if unet_s_ratio is not None and ratio is not None and unet_s_ratio != ratio:
                raise UserError(f"unet_s_ratio={unet_s_ratio} and ratio={ratio}: give one")
            stitched = getattr(self, denoiser_name(self))
            r = ratio if ratio is not None else unet_s_ratio
            call_fractions = None
            if r is not None or fractions is not None:
                if fractions is None and len(stitched.models) != 2:
                    raise UserError(f"ratio={r} is the two-model shorthand; this pipeline stitches "
                                     f"{len(stitched.models)} models: give fractions=[...]")
                call_fractions = resolve_fractions(r, fractions, num_models=len(stitched.models))
            with stitched.trajectory(self.scheduler, call_fractions, lcm=_is_lcm_pipeline(self)):
                return cls.__call__(self, *args, **kwargs)

        _CLASSES[cls] = type(f"TStitch{cls.__name__}", (cls,), {"__call__": __call__, "_tstitch_base": cls,
                                                                 "__module__": cls.__module__})
    return _CLASSES[cls]


def _is_lcm_pipeline(pipe) -> bool:
    """Upstream's stitched LCM pipeline (its `floor` rule is i / n <= r) is a LatentConsistencyModelPipeline."""
    from diffusers import LatentConsistencyModelPipeline

    return isinstance(pipe, LatentConsistencyModelPipeline)


def _as_list(small):
    return list(small) if isinstance(small, (list, tuple)) else [small]


HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "proxies")


def _config_before_loading(source, like: nn.Module, name: str, kwargs: dict) -> dict | None:
    """The small denoiser's config.json (hub ids: downloaded alone, no weights), found in the
    `name` subfolder, else in the other denoiser subfolder (an SD-XL folder has unet/, an SD3 one
    transformer/), else at the top of a bare denoiser folder; None when there is none to read."""
    folder = Path(source)
    if "subfolder" in kwargs:
        candidates = [kwargs["subfolder"]]
    elif folder.is_dir() and (folder / "config.json").is_file() and not (folder / "model_index.json").is_file():
        candidates = [None]  # a bare denoiser folder
    else:
        candidates = [name] + [other for other in DENOISER_NAMES if other != name]
    hub = {k: v for k, v in kwargs.items() if k in HUB_KWARGS}
    for subfolder in candidates:
        if folder.is_dir() and not (folder / (subfolder or "") / "config.json").is_file():
            continue
        try:
            return dict(type(like).load_config(str(source), subfolder=subfolder, **hub))
        except (OSError, ValueError):  # not on the hub / not cached offline: from_pretrained says why
            continue
    return None


def load_denoiser(source, like: nn.Module, name: str, check=None, **kwargs) -> nn.Module:
    """The denoiser of `source`: a module as is; a pipeline's `name` component; a hub id or a
    local folder loaded with the large model's class (its `name` subfolder when there is one),
    in the large model's dtype unless kwargs say otherwise.

    check(config: dict): called with the model's config.json before any weights are read, so a
    model that cannot stitch (another class, other input widths) is refused before a download."""
    if isinstance(source, nn.Module):
        return source
    if hasattr(source, "components"):  # a DiffusionPipeline
        return getattr(source, denoiser_name(source))
    if not isinstance(source, (str, Path)):
        raise TypeError(f"small model {source!r}: give a hub id, a local folder, a pipeline or a denoiser module")
    if check is not None:
        config = _config_before_loading(source, like, name, kwargs)
        if config is not None:
            check(config)
    kwargs.setdefault("torch_dtype", like.dtype)
    folder = Path(source)
    if folder.is_dir() and not (folder / name).is_dir() and (folder / "config.json").is_file():
        return type(like).from_pretrained(str(source), **kwargs)  # a bare denoiser folder
    if folder.is_dir() and not (folder / name).is_dir():
        raise UserError(f"small model folder {source}: has neither a {name}/ subfolder nor a config.json")
    kwargs.setdefault("subfolder", name)
    return type(like).from_pretrained(str(source), **kwargs)


def _placed_like(model: nn.Module, like: nn.Module) -> nn.Module:
    """`model` in eval mode on `like`'s device and in its dtype (moved only where they differ)."""
    if model.device != like.device:
        model = model.to(like.device)
    if model.dtype != like.dtype:
        model = model.to(like.dtype)
    return model.eval()


def _display_name(source, fallback: str) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    config = getattr(source, "config", None)
    path = config.get("_name_or_path") if config is not None and hasattr(config, "get") else None
    return str(path) if path else fallback


def check_stitch_settings(small, ratio: float | None = 0.5, fractions=None, rule: str = "index",
                          timestep_form: str = "dit", **load_kwargs) -> None:
    """The checks of `stitch_pipeline` that need no pipeline (run configs call this before loading)."""
    sources = _as_list(small)
    resolve_fractions(None if fractions is not None else ratio, fractions, num_models=len(sources) + 1)
    check_rule(rule, timestep_form)
    for source in sources:
        if isinstance(source, (str, Path)) and Path(source).is_absolute() and not Path(source).is_dir():
            raise UserError(f"small model {str(source)!r}: no such folder")


def stitch_pipeline(pipe, small, ratio: float | None = 0.5, fractions=None, rule: str = "index",
                    timestep_form: str = "dit", **load_kwargs):
    """Stitch `small` (one model, or a list in run order for several) before `pipe`'s own denoiser.

    small: a hub id, a local folder (a pipeline folder or a bare denoiser folder), a pipeline
    object or a denoiser module. ratio: the small model's fraction of the steps (two models);
    fractions: one per model, in run order, the pipeline's own denoiser last. rule: which
    model runs each step (tstitch.rules: `index`, `floor` = upstream's stitched pipelines,
    `timestep`). load_kwargs go to `from_pretrained` (variant, torch_dtype, subfolder, ...).
    Returns `pipe`, changed in place.
    """
    if is_stitched(pipe):
        raise UserError("this pipeline is stitched already: call tstitch.unstitch_pipeline(pipe) first")
    check_rule(rule, timestep_form)
    name = denoiser_name(pipe)
    large = getattr(pipe, name)
    sources = _as_list(small)
    fractions = resolve_fractions(None if fractions is not None else ratio, fractions, num_models=len(sources) + 1)
    fallback = ["small"] if len(sources) == 1 else [f"small{j + 1}" for j in range(len(sources))]
    names = [_display_name(s, f) for s, f in zip(sources, fallback, strict=True)] + [_display_name(large, "large")]
    controlnet = getattr(pipe, "controlnet", None) is not None

    def checker(small_name):
        return lambda config: check_denoiser_pair(config, large, small_name, names[-1], controlnet=controlnet)

    # names[-1] is the large model's: zip stops before it
    smalls = [load_denoiser(s, large, name, check=checker(n), **load_kwargs)
              for s, n in zip(sources, names, strict=False)]
    for model, model_name in zip(smalls, names, strict=False):
        check_denoiser_pair(model, large, model_name, names[-1], controlnet=controlnet)
    smalls = [_placed_like(m, large) for m in smalls]
    stitched = StitchedDenoiser(smalls + [large], fractions=fractions, names=names, rule=rule,
                                timestep_form=timestep_form)
    original_class = type(pipe)
    pipe.__class__ = _stitched_class(original_class)
    # bypass DiffusionPipeline.__setattr__: the config keeps naming the original component class
    object.__setattr__(pipe, name, stitched)
    return pipe


def unstitch_pipeline(pipe):
    """Put the pipeline's own denoiser and class back; returns `pipe`."""
    if not is_stitched(pipe):
        raise UserError("this pipeline is not stitched")
    name = denoiser_name(pipe)
    stitched = getattr(pipe, name)
    object.__setattr__(pipe, name, stitched.large)
    pipe.__class__ = type(pipe)._tstitch_base
    return pipe


def get_tstitch_pipeline(large, small, ratio: float = 0.5, fractions=None, pipeline_class=None, device=None,
                         small_kwargs: dict | None = None, rule: str = "index", timestep_form: str = "dit",
                         **from_pretrained_kwargs):
    """A stitched pipeline from hub ids, local folders or pipeline objects.

    large: a pipeline object, or a hub id / folder loaded with `pipeline_class`
    (default `DiffusionPipeline`, which reads the folder's pipeline class; with a
    `controlnet=` argument `AutoPipelineForText2Image`, which picks the ControlNet pipeline).
    from_pretrained_kwargs (torch_dtype, variant, controlnet, safety_checker, ...) go to the
    large pipeline's `from_pretrained`; small_kwargs to the small model's. rule / timestep_form:
    as stitch_pipeline (`floor` reproduces upstream's stitched pipelines).
    """
    if isinstance(large, (str, Path)):
        if pipeline_class is None:
            import diffusers

            controlnet = from_pretrained_kwargs.get("controlnet") is not None
            pipeline_class = diffusers.AutoPipelineForText2Image if controlnet else diffusers.DiffusionPipeline
        large = pipeline_class.from_pretrained(str(large), **from_pretrained_kwargs)
    elif from_pretrained_kwargs:
        raise UserError(f"{sorted(from_pretrained_kwargs)}: loading arguments need a hub id or folder as `large`")
    pipe = stitch_pipeline(large, small, ratio=ratio, fractions=fractions, rule=rule, timestep_form=timestep_form,
                           **(small_kwargs or {}))
    return pipe.to(device) if device is not None else pipe


get_tstitch_pipepline = get_tstitch_pipeline  # the T-Stitch repository's spelling
