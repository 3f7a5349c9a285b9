"""T-GATE on a stock diffusers pipeline call: hooks on the denoiser, no copied pipeline code.

`gate_pipeline(pipe, config)` (what `apply_tgate(pipe, config)` does for a pipeline):

- wraps every attention module of the denoiser (`pipe.unet` or `pipe.transformer`)
  with the T-GATE module hooks (compute / cache / reuse, see tgate.schedule);
- knows the step of every denoiser call from the pipeline's own loop, with the step tracker
  T-Stitch and DeepCache use too (`diffusion.pipeline_steps`: the progress-bar step of the
  entry, entries counted by `scheduler.step` calls), so img2img (`strength` < 1), custom
  timesteps, second-order schedulers and pipelines that call the denoiser more than once per
  step work without a step callback; PNDM's warm-up entry computes plainly, as in tgate 1.0.0;
- from the gate step on, runs one CFG branch and hands the pipeline that output for
  both halves (tgate.branch), also for a ControlNet the pipeline calls with the CFG batch;
- optionally runs DeepCache through its own helper, restarted at the gate (tgate.deepcache);
  a DeepCache applied to the pipeline on its own (`deep_cache.apply_deep_cache`) is restarted
  there too, through `diffusion.feature_refresh`.

SD3 / SD3.5 take guidance truncation alone (`TGateConfig(cache_attention=False, branch="cond")`):
their joint attention has no T-GATE caching rule. Their skip-layer guidance pass (a second
denoiser call of a step, with `skip_layers`) belongs to the step it is made in, and must end
before the gate. Denoisers that take the guidance scale as an input (FLUX.1) run no CFG batch
and are refused.

Every pipeline call is one run: caches start empty and are freed when the call
returns (or raises). `remove()` / `remove_tgate(pipe)` leaves the pipeline and its
modules as they were.
"""
from __future__ import annotations

import functools
import inspect
import warnings

import torch.nn as nn

from diffusion.errors import UserError
from diffusion.feature_refresh import refresh_feature_caches
from diffusion.pipeline_steps import PipelineSteps

from .branch import batch_rows, repeat_branch, take_branch
from .config import TGateConfig
from .deepcache import DeepCacheAttachment, DeepCacheConfig, make_helper
from .model_gate import gate_attention, ungate_attention
from .schedule import PLAIN
from .state import TGateState

GATE_ATTRIBUTE = "_tgate_gate"  # set on the per-pipeline subclass that wraps __call__


def is_pipeline(obj) -> bool:
    try:
        from diffusers import DiffusionPipeline
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return False
    return isinstance(obj, DiffusionPipeline)


def denoiser_of(pipe) -> tuple[str, nn.Module]:
    """(attribute name, module) of the model the pipeline's loop calls every step."""
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            return name, module
    raise UserError(f"tgate: {type(pipe).__name__} has neither a `unet` nor a `transformer` module to gate")


def gate_of(pipe) -> PipelineGate | None:
    """The PipelineGate applied to pipe, or None."""
    return getattr(type(pipe), GATE_ATTRIBUTE, None)


def _skip_layer_guidance_steps(bound: dict) -> list[int]:
    """Steps at which SD3's pipeline makes its skip-layer guidance pass (`skip_guidance_layers`):
    i with start * n < i < stop * n, as StableDiffusion3Pipeline decides; [] when it makes none."""
    if bound.get("skip_guidance_layers") is None:
        return []
    n = bound.get("num_inference_steps")
    start, stop = bound.get("skip_layer_guidance_start"), bound.get("skip_layer_guidance_stop")
    if not all(isinstance(v, (int, float)) for v in (n, start, stop)):
        return []
    return [i for i in range(int(n)) if start * n < i < stop * n]


def _call_uses_cfg(pipe, bound: dict) -> bool:
    """Whether this pipeline call batches the two CFG branches.

    Pipelines that expose `do_classifier_free_guidance` (SD, SD-XL, ControlNet, SVD, ...)
    say so themselves once their call has set the guidance scale; PixArt decides from
    `guidance_scale > 1` inside its call, so fall back to the call's own argument.
    """
    if isinstance(inspect.getattr_static(type(pipe), "do_classifier_free_guidance", None), property):
        try:
            return bool(pipe.do_classifier_free_guidance)
        except AttributeError:
            pass
    for key in ("guidance_scale", "max_guidance_scale"):
        value = bound.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value > 1
    return False


class PipelineGate:
    """The handle `apply_tgate(pipe, config)` returns; `remove()` undoes it (also a context manager)."""

    def __init__(self, pipe, config: TGateConfig, deepcache: DeepCacheConfig | None = None, helper=None):
        """deepcache: DeepCache settings (a new DeepCacheSDHelper is made), or helper: an existing
        DeepCacheSDHelper with its params set (what the DeepCache loaders keep as pipe.deepcache)."""
        if not isinstance(config, TGateConfig):
            raise TypeError(f"tgate: config must be a TGateConfig, got {type(config).__name__}")
        if deepcache is not None and not isinstance(deepcache, DeepCacheConfig):
            raise TypeError(f"tgate: deepcache must be a DeepCacheConfig or None, got {type(deepcache).__name__}")
        if gate_of(pipe) is not None:
            raise UserError(f"tgate is already applied to this {type(pipe).__name__}; remove_tgate(pipe) first")
        self.pipe = pipe
        self.config = config
        self.denoiser_name, self.denoiser = denoiser_of(pipe)
        if "guidance_embeds" in (getattr(self.denoiser, "config", None) or {}):
            raise UserError(f"tgate: {type(pipe).__name__}'s {type(self.denoiser).__name__} takes the guidance scale "
                            "as an input (guidance-distilled, as FLUX.1): its pipeline runs no CFG batch, "
                            "so there is no guidance to truncate, and its joint attention has no T-GATE caching rule")
        self.state = TGateState(config)
        if config.branch == "uncond" and "VideoDiffusion" in type(pipe).__name__:
            warnings.warn("tgate: SVD's unconditional branch has zeroed image conditioning; tgate 1.0.0 runs the "
                          "conditional branch after the gate (TGateConfig(branch='cond'), as TgateSVDLoader does)",
                          stacklevel=3)
        if deepcache is not None and helper is not None:
            raise UserError("tgate: give deepcache settings or a DeepCache helper, not both")
        if deepcache is not None:
            helper = make_helper(pipe, deepcache)

        self._class = type(pipe)
        self._running = 0  # nesting depth of pipeline calls (a pipeline may call itself)
        self._pending: dict[int, int] = {}  # id(module) -> CFG rows, for calls that run one branch
        self._use_cfg = False  # set at each run's first denoiser call
        self.steps = PipelineSteps()  # which step each denoiser call of a pipeline call belongs to
        self._begin_run()
        gate_attention(self.denoiser, config, self.state)
        self._handles = [
            self.denoiser.register_forward_pre_hook(self._before_denoiser, with_kwargs=True),
            self.denoiser.register_forward_hook(self._after_call),
        ]
        controlnet = getattr(pipe, "controlnet", None)
        if isinstance(controlnet, nn.Module):  # its residuals are computed from the CFG batch too
            self._handles += [controlnet.register_forward_pre_hook(self._before_controlnet, with_kwargs=True),
                              controlnet.register_forward_hook(self._after_call)]
        self.deepcache = DeepCacheAttachment(pipe, helper) if helper is not None else None
        pipe.__class__ = _gated_class(self._class, self)
        self.removed = False

    # -- one pipeline call ------------------------------------------------------------
    def _begin_run(self, bound: dict | None = None) -> None:
        self._bound = bound or {}
        self._calls = 0  # denoiser calls so far in this run (skip-layer passes not counted)
        self._cfg_rows = None
        self._restarted: set[int] = set()
        self._pending.clear()
        self.state.end()  # plain computing until the loop's first denoiser call; no old caches

    def _start_call(self, args, kwargs) -> None:
        if self._running == 0:
            try:
                bound = inspect.signature(self._class.__call__).bind(self.pipe, *args, **kwargs)
                bound.apply_defaults()
                arguments = dict(bound.arguments)
            except TypeError:  # let the pipeline itself report a bad call
                arguments = {}
            late = [i for i in _skip_layer_guidance_steps(arguments) if i >= self.config.gate_step]
            scale = arguments.get("guidance_scale")
            if late and isinstance(scale, (int, float)) and scale > 1:  # SD3 runs it with guidance only
                raise UserError(f"tgate: skip-layer guidance would run at steps {late}, at or after gate_step="
                                 f"{self.config.gate_step}, where guidance has stopped; end it before the gate "
                                 f"(skip_layer_guidance_stop <= {self.config.gate_step}/num_inference_steps) or "
                                 "drop skip_guidance_layers")
            self._begin_run(arguments)
            if self.deepcache is not None:
                self.deepcache.restart()
            self.steps.start(self.pipe.scheduler)
        self._running += 1

    def _end_call(self) -> None:
        self._running -= 1
        if self._running == 0:
            self.steps.stop()
            self._begin_run()  # frees the caches; a denoiser call outside a pipeline call computes plainly

    def _first_denoiser_call(self, args, kwargs) -> None:
        self._use_cfg = _call_uses_cfg(self.pipe, self._bound)
        self.state.start(self._use_cfg)  # refuses lcm=True with a CFG batch
        if self._use_cfg:
            self._cfg_rows = batch_rows(args, kwargs)

    # -- hooks --------------------------------------------------------------------------
    def _before_denoiser(self, module, args, kwargs):
        if not self._running:
            return None  # called outside a pipeline call: the plain model
        if kwargs.get("skip_layers") is not None and self._calls:
            # SD3's skip-layer guidance pass: a second call of the step (the scheduler has not moved); it runs
            # as the pipeline asks, every attention module computing
            where = self.steps.call()
            if not where.warmup and where.step >= self.config.gate_step:
                raise RuntimeError(f"tgate: skip-layer guidance at step {where.step}, after gate_step="
                                   f"{self.config.gate_step}: guidance has stopped there")
            self.state.actions = PLAIN
            return None
        if self._calls == 0:
            self._first_denoiser_call(args, kwargs)
        self._calls += 1
        where = self.steps.call()
        if where.pass_index and self._use_cfg:
            # e.g. separate CFG passes (one call per branch): the caches and the branch cut need the CFG batch
            raise RuntimeError(f"tgate: {type(self.pipe).__name__} called its denoiser {where.pass_index + 1} times "
                               f"in one loop entry (step {where.step}); T-GATE needs the two CFG branches as one "
                               "batched call per entry (SD3's skip-layer pass aside), so pipelines that run "
                               "guidance as separate passes are not supported")
        if where.warmup:  # a scheduler warm-up entry: computed with guidance, as the reference does
            self.state.actions = PLAIN
            return None
        step = where.step
        self.state.step(step)
        gate = self.config.gate_step
        if step in (gate - 1, gate) and step not in self._restarted:
            self._restarted.add(step)  # full U-Net at the CFG-mean step and at the first one-branch step
            if self.deepcache is not None:
                self.deepcache.restart()
            refresh_feature_caches(self.denoiser)  # DeepCache applied on its own (deep_cache.apply_deep_cache)
        if not self._use_cfg or self.state.actions.guidance:
            return None
        rows = batch_rows(args, kwargs)
        if rows != self._cfg_rows:
            raise RuntimeError(f"tgate: the denoiser got {rows} rows at step {step}, but {self._cfg_rows} "
                               "(the CFG batch) at the first step; this pipeline changes its batch mid-run")
        self._pending[id(module)] = rows
        return take_branch(args, kwargs, rows, self.config.branch)

    def _before_controlnet(self, module, args, kwargs):
        if not self._running or self._calls == 0 or not self._use_cfg:
            return None  # the first step always runs both branches
        where = self.steps.current()  # the step of the denoiser call to come
        if where.warmup or self.config.actions(where.step, True).guidance:
            return None
        rows = batch_rows(args, kwargs)
        if rows != self._cfg_rows:  # e.g. guess mode: the ControlNet sees the conditional rows only
            return None
        self._pending[id(module)] = rows
        return take_branch(args, kwargs, rows, self.config.branch)

    def _after_call(self, module, args, output):
        rows = self._pending.pop(id(module), None)
        return None if rows is None else repeat_branch(output, rows)

    # -- removal ------------------------------------------------------------------------
    def remove(self) -> None:
        """The pipeline as it was before apply_tgate (idempotent)."""
        if self.removed:
            return
        for handle in self._handles:
            handle.remove()
        ungate_attention(self.denoiser)
        if self.deepcache is not None:
            self.deepcache.remove()
        if gate_of(self.pipe) is self:
            self.pipe.__class__ = self._class
        self._begin_run()
        self.removed = True

    def __enter__(self) -> PipelineGate:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _gated_class(cls: type, gate: PipelineGate) -> type:
    """A subclass of the pipeline's class whose __call__ marks the start and end of a run.

    Python looks `__call__` up on the type, so the instance's class is swapped for this
    one while gated. It keeps the class's name and module, so `type(pipe).__name__`,
    save_pretrained and isinstance checks see the pipeline they know.
    """
    original = cls.__call__

    @functools.wraps(original)
    def __call__(self, *args, **kwargs):
        gate._start_call(args, kwargs)
        try:
            return original(self, *args, **kwargs)
        finally:
            gate._end_call()

    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__, GATE_ATTRIBUTE: gate})


def gate_pipeline(pipe, config: TGateConfig, deepcache: DeepCacheConfig | None = None) -> PipelineGate:
    """Apply T-GATE (and optionally DeepCache) to every later `pipe(...)` call until removed."""
    return PipelineGate(pipe, config, deepcache)


def ungate_pipeline(pipe) -> None:
    gate = gate_of(pipe)
    if gate is not None:
        gate.remove()
