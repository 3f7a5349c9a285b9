"""The techniques of a run's `accel` node: which are listed, the order they are applied in, and
what each refuses before any weights are read.

A technique is one file configs/accel/<name>.yaml that sets only its own keys of the `accel`
package: its settings under `accel.<name>`, a native sampler hook under `accel.hooks.<name>`, a
diffusers pipeline applier under `accel.pipeline.<name>`, and (T-Stitch) the denoisers that run
before `model` under `accel.models`. `accel=[tstitch,tgate]` merges the files; a technique is
listed when it has a hook or a pipeline entry (settings left by an experiment whose technique the
command line replaced, e.g. `+exp=digits_fast accel=none`, act on nothing).

The run applies the listed techniques in ORDER whatever the order of the list, so `[tgate,tstitch]`
is the run of `[tstitch,tgate]`: T-Stitch first (it decides which denoiser runs; on pipelines its
stitched denoiser stands in for the pipeline's own, which the others then hook), T-GATE next (at its
gate it makes DeepCache recompute, as tgate's DeepCache loaders do), DeepCache last. Techniques not
in ORDER follow, by name. The model family's facts (configs/family/<model>.yaml) say which
denoiser architecture a model is; ARCHITECTURES says which ones a technique acts on.
"""
from __future__ import annotations

from collections.abc import Mapping

from omegaconf import DictConfig, OmegaConf

from diffusion.errors import UserError

# the order techniques are applied in; new ones: append here. diffusers' caches come last: they hook the
# blocks of whichever denoiser runs (each stitched model has its own cache state) and see T-GATE's halved batch
CACHES = ("first_block_cache", "taylorseer", "mag_cache", "faster_cache", "pab", "sea_cache")
ORDER = ("tstitch", "tgate", "deep_cache", *CACHES)
# technique -> the denoiser architectures (family.architecture: dit | unet | mmdit | ...) it acts on;
# a technique not named here acts on any
ARCHITECTURES = {"deep_cache": ("unet",), **{name: ("dit", "mmdit") for name in CACHES}}
WHY = {"deep_cache": "DeepCache reuses the deep features of a U-Net's skip branches, which a {arch} does not have",
       **{name: "diffusers' cache hooks act on transformer blocks (diffusers' block registry), which a {arch} does "
                "not have" for name in CACHES}}
ARCH_NAMES = {"dit": "DiT", "unet": "U-Net", "mmdit": "MM-DiT", "unet_video": "spatio-temporal U-Net"}
RESERVED = ("models", "hooks", "pipeline")  # the keys of `accel` that are not one technique's settings


def _keys(node) -> list[str]:
    return [str(k) for k in (node or {})]


def order_key(name: str) -> tuple[int, str]:
    return (ORDER.index(name), "") if name in ORDER else (len(ORDER), name)


def listed(accel) -> tuple[str, ...]:
    """The techniques of an `accel` node (those with a hook or a pipeline entry), in ORDER."""
    if accel is None:
        return ()
    names = set(_keys(accel.get("hooks"))) | set(_keys(accel.get("pipeline")))
    return tuple(sorted(names, key=order_key))


def label(accel) -> str:
    """What metrics.json and the log call the run's acceleration: `tstitch+tgate`, or `none`."""
    return "+".join(listed(accel)) or "none"


def ordered(entries) -> list[tuple[str, object]]:
    """(name, node) of a hooks / pipeline mapping, in ORDER."""
    entries = entries or {}
    return [(name, entries[name]) for name in sorted(_keys(entries), key=order_key)]


def stitched_models(accel) -> Mapping:
    """accel.models, the denoisers that run before `model`: T-Stitch's, so only when it is listed."""
    if accel is None or "tstitch" not in listed(accel):
        return {}
    return accel.get("models") or {}


def requested(overrides) -> list[str] | None:
    """The technique names an `accel=...` override lists (None: no such override)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for text in overrides or ():
        if str(text).split("=", 1)[0].lstrip("+~") != "accel":
            continue
        value = OverridesParser.create().parse_overrides([str(text)])[0].value()
        return [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return None


def check_requested(names) -> None:
    """A technique listed twice is refused (Hydra merges the file twice without a word)."""
    names = list(names or [])
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"accel=[{','.join(names)}]: {', '.join(twice)} listed more than once; list each technique "
                        f"once, e.g. accel=[{','.join(dict.fromkeys(names))}]")


def _hydra_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def _model_name(cfg) -> str:
    return str(OmegaConf.select(cfg, "model.name", default="?"))


def check_techniques(cfg: DictConfig, pipeline: bool) -> tuple[str, ...]:
    """Every refusal by technique and model, before any weights are read; returns the listed techniques.

    pipeline: the run samples through a diffusers pipeline (it applies accel.pipeline entries) rather
    than the native sampler (accel.hooks and accel.models)."""
    check_requested(requested(_hydra_overrides()))
    accel = cfg.get("accel")
    names = listed(accel)
    model = _model_name(cfg)
    shown = f"accel={'[' + ','.join(names) + ']' if len(names) > 1 else (names or ('none',))[0]}"
    where, others = ("pipeline", "hooks") if pipeline else ("hooks", "pipeline")
    for name in names:
        if name not in _keys(accel.get(where)):
            kind = "a diffusers pipeline" if pipeline else "a native model"
            acts = "the native sampler" if pipeline else "diffusers pipelines"
            raise UserError(f"{shown}: {name} acts on {acts} only (accel.{others}.{name}) and {model!r} is {kind}; "
                            f"drop {name} from the list, or use accel=none")
    arch = OmegaConf.select(cfg, "family.architecture", default=None)
    for name in names:
        allowed = ARCHITECTURES.get(name)
        if allowed and arch not in allowed:
            what = ARCH_NAMES.get(arch, arch or "model of unknown architecture (no configs/family/ file)")
            why = WHY.get(name, "{arch}").format(arch=what)
            raise UserError(f"{shown}: {name} acts on {' / '.join(ARCH_NAMES.get(a, a) for a in allowed)} "
                            f"models and {model!r} is a {what}: {why}; drop {name} from the list")
    if "tgate" in names and arch == "mmdit" and OmegaConf.select(cfg, "accel.tgate.cache_attention", default=False):
        raise UserError(f"accel.tgate.cache_attention=true: {model!r} is an MM-DiT, whose text reaches the image "
                        "through joint attention, for which T-GATE has no caching rule; use "
                        "accel.tgate.cache_attention=false (guidance truncation alone)")
    if "tstitch" in names:
        check_partner(cfg, shown)
    return names


def check_partner(cfg: DictConfig, shown: str) -> None:
    """T-Stitch needs a small model: the family's partner (or one set on the command line) that composes."""
    model = _model_name(cfg)
    for key in _keys(OmegaConf.select(cfg, "accel.models", default=None)):
        try:
            node = cfg.accel.models[key]
        except Exception:  # an interpolation of a partner the family does not have
            node = None
        if not isinstance(node, DictConfig):
            raise UserError(f"{shown}: model {model!r} has no T-Stitch partner (accel.models.{key} is "
                            f"{OmegaConf.to_container(cfg.accel.models, resolve=False).get(key)!r}); name one: "
                            f"+model@family.stitch.small=<model config>, or stitch a model that has one "
                            f"(configs/family/*.yaml with stitch.small)")
        if (node.get("kind") == "pipeline") != (cfg.model.get("kind") == "pipeline"):
            raise UserError(f"{shown}: the partner {node.get('name')!r} (accel.models.{key}) and {model!r} cannot be "
                            "stitched: one is a diffusers pipeline, the other a native model; stitch models of one "
                            "kind and latent space")
