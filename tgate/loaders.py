"""Drop-in loaders with tgate 1.0.0's names: `pipe = TgateSDXLLoader(pipe)`, then
`pipe.tgate(prompt, gate_step=10, sp_interval=5, fi_interval=1, warm_up=2,
num_inference_steps=25, lcm=False, **any argument of the pipeline's own call)`.

`pipe.tgate(...)` gates the pipeline (tgate.pipelines), calls the pipeline's own
`__call__`, and removes the gate again, also when the call raises: the plain `pipe(...)`
stays the stock pipeline. Per-loader facts taken from tgate 1.0.0:

- SD, SD-XL, PixArt-α/Σ: after the gate the unconditional (negative-prompt) branch runs;
  the text reaches the model only through the cached cross-attention.
- SVD: its unconditional branch has zeroed image conditioning, so the conditional
  branch runs after the gate.
- DeepCache loaders: defaults sp_interval=1, warm_up=0; the DeepCache helper is
  restarted at steps gate_step - 1 and gate_step. `pipe.deepcache` is the helper
  (DeepCache's own `DeepCacheSDHelper`); it is enabled only during `pipe.tgate(...)`.
- `lcm=True` (a latent-consistency denoiser, no CFG batch): caches keep their shape.
  Given to the loader (`TgateSDXLLoader(pipe, lcm=True)`, as tgate's README does) it is
  the default of `pipe.tgate`.
"""
from __future__ import annotations

from types import MethodType

from diffusion.errors import UserError

from .config import TGateConfig
from .deepcache import DeepCacheConfig, make_helper
from .pipelines import PipelineGate, denoiser_of

STANDARD = dict(gate_step=10, sp_interval=5, fi_interval=1, warm_up=2)
WITH_DEEPCACHE = dict(gate_step=10, sp_interval=1, fi_interval=1, warm_up=0)


def _check_loader_kwargs(loader: str, kwargs: dict) -> bool:
    unknown = sorted(set(kwargs) - {"lcm"})
    if unknown:
        raise TypeError(f"{loader}: unexpected argument(s) {unknown}; allowed: lcm")
    lcm = kwargs.get("lcm", False)
    if not isinstance(lcm, bool):
        raise UserError(f"{loader}: lcm={lcm!r}: must be True or False")
    return lcm


def _install(pipe, loader: str, denoiser: str, branch: str, defaults: dict, lcm: bool = False,
             deepcache: DeepCacheConfig | None = None):
    name, _ = denoiser_of(pipe)
    if name != denoiser:
        raise UserError(f"{loader} expects a pipeline with a `{denoiser}` (got {type(pipe).__name__}, "
                         f"which has a `{name}`)")
    helper = make_helper(pipe, deepcache) if deepcache is not None else None

    def tgate(self, *args, gate_step: int = defaults["gate_step"], sp_interval: int = defaults["sp_interval"],
              fi_interval: int = defaults["fi_interval"], warm_up: int = defaults["warm_up"], lcm: bool = lcm,
              **kwargs):
        """The pipeline's own call with T-GATE; any argument of the pipeline's call may be given."""
        config = TGateConfig(gate_step=gate_step, sp_interval=sp_interval, fi_interval=fi_interval,
                             warm_up=warm_up, lcm=lcm, branch=branch)
        gate = PipelineGate(self, config, helper=helper)
        try:
            return self(*args, **kwargs)
        finally:
            gate.remove()

    pipe.tgate = MethodType(tgate, pipe)
    if helper is not None:
        pipe.deepcache = helper
    return pipe


def TgateSDLoader(pipe, **kwargs):
    return _install(pipe, "TgateSDLoader", "unet", "uncond", STANDARD, _check_loader_kwargs("TgateSDLoader", kwargs))


def TgateSDXLLoader(pipe, **kwargs):
    return _install(pipe, "TgateSDXLLoader", "unet", "uncond", STANDARD,
                    _check_loader_kwargs("TgateSDXLLoader", kwargs))


def TgatePixArtAlphaLoader(pipe, **kwargs):
    return _install(pipe, "TgatePixArtAlphaLoader", "transformer", "uncond", STANDARD,
                    _check_loader_kwargs("TgatePixArtAlphaLoader", kwargs))


def TgatePixArtSigmaLoader(pipe, **kwargs):
    return _install(pipe, "TgatePixArtSigmaLoader", "transformer", "uncond", STANDARD,
                    _check_loader_kwargs("TgatePixArtSigmaLoader", kwargs))


def TgateSVDLoader(pipe, **kwargs):
    return _install(pipe, "TgateSVDLoader", "unet", "cond", STANDARD, _check_loader_kwargs("TgateSVDLoader", kwargs))


def TgateSDDeepCacheLoader(pipe, cache_interval: int = 3, cache_branch_id: int = 0, **kwargs):
    return _install(pipe, "TgateSDDeepCacheLoader", "unet", "uncond", WITH_DEEPCACHE,
                    _check_loader_kwargs("TgateSDDeepCacheLoader", kwargs),
                    DeepCacheConfig(cache_interval, cache_branch_id))


def TgateSDXLDeepCacheLoader(pipe, cache_interval: int = 3, cache_branch_id: int = 0, **kwargs):
    return _install(pipe, "TgateSDXLDeepCacheLoader", "unet", "uncond", WITH_DEEPCACHE,
                    _check_loader_kwargs("TgateSDXLDeepCacheLoader", kwargs),
                    DeepCacheConfig(cache_interval, cache_branch_id))
