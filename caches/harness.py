"""What diffusers' cache hooks leave to the caller, as one sampler hook (diffusion.Hook).

diffusers applies a cache to a transformer (`apply_*`) and expects the denoising loop to (1) reset
the hooks' state before every call of a pipeline, (2) enter one `cache_context` per CFG branch around
every call, and (3) tell the hooks where the loop is (timestep for PAB and FasterCache, step index,
step count and sigma for SeaCache). Our sampler does none of that, so `CacheHook` does, around each
denoiser of the run:

- state: every cache hook of every model is reset in `start` (each trajectory: every batch of a run,
  every call); only the hooks the cache registered are reset (T-GATE's attention caches, also
  "stateful" to diffusers, are T-GATE's business).
- contexts: the sampler runs CFG as one [cond; uncond] batch, so one context holds both branches
  (named "cfg"); when guidance stops (T-GATE's gate) one branch runs at half the rows, in a context of
  its own ("cond" or "uncond") that starts empty: no cached tensor of 2B rows meets a B-row input.
- T-GATE's feature refresh (`StepContext.refresh_features`, at gate_step - 1 and gate_step): the
  running model's cache state is reset, so those two steps run in full. T-GATE caches its attention
  (the CFG mean) at gate_step - 1; a block cache that skipped that step would leave T-GATE reusing a
  stale output for the rest of the run.
- T-Stitch: each model has its own hooks and state; a model's state is reset in `start` and untouched
  until it first runs, so the large model's cache starts empty at the switch.

Subclasses (caches.techniques) say how to apply diffusers' hook to one model.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import CacheContext, _set_cache_context
from diffusers.utils.torch_utils import unwrap_module

from diffusion import Hook, SamplingPlan, StepContext
from diffusion.errors import UserError

from .accounting import WorkCounter
from .registry import attention_modules, blocks_of

HARNESS_HOOK = "caches_harness"


def _registries(model: nn.Module) -> dict[int, HookRegistry]:
    return {id(m): m._diffusers_hook for m in unwrap_module(model).modules() if hasattr(m, "_diffusers_hook")}


def _hook_names(model: nn.Module) -> set[tuple[int, str]]:
    return {(id(m), name) for m in unwrap_module(model).modules() if hasattr(m, "_diffusers_hook")
            for name in m._diffusers_hook.hooks}


class _ContextHook(ModelHook):
    """Outermost hook on a denoiser: each call runs inside the cache context the owner names."""

    def __init__(self, owner: CacheHook, index: int):
        super().__init__()
        self.owner, self.index = owner, index

    def new_forward(self, module: nn.Module, *args, **kwargs):
        owner = self.owner
        if not owner.active:  # outside a sampling run (e.g. MACs counting): the plain model
            return self.fn_ref.original_forward(*args, **kwargs)
        if owner.pipeline is not None:  # a stock pipeline's loop: where it is (caches.pipelines)
            owner.pipeline.locate(args, kwargs)
        rows = next(int(a.shape[0]) for a in (*args, *kwargs.values()) if torch.is_tensor(a) and a.ndim)
        owner.on_call(self.index, rows)
        args, kwargs = owner.before_call(self.index, module, args, kwargs)
        with owner.context(self.index, module):
            out = self.fn_ref.original_forward(*args, **kwargs)
        return owner.after_call(self.index, module, out)


class CacheHook(Hook):
    """One of diffusers' caches on every denoiser of the run (each with its own state)."""

    name = "cache"               # the accel name, for messages and metrics
    uses_contexts = True         # the cache keeps its state in diffusers' StateManager contexts

    def __init__(self):
        self.active = False
        self.ctx: StepContext | None = None
        self.plan: SamplingPlan | None = None
        self.solver = None
        self.counter = WorkCounter()
        self._models: list[nn.Module] = []
        self._names: list[str] = []
        self._owned: list[list[tuple[HookRegistry, str]]] = []  # per model: the (registry, hook) we added
        self.meta = False            # attached to meta models (MACs counting): nothing applied
        self.pipeline = None         # caches.pipelines.PipelineCache when on a stock pipeline
        self._eager: dict[str, int] = {}

    # --- what a technique says ---
    def apply(self, model: nn.Module, name: str, index: int) -> None:
        """Apply diffusers' cache to one denoiser (raise UserError when it cannot)."""
        raise NotImplementedError

    def check_plan(self, plan: SamplingPlan) -> None:
        pass

    def before_call(self, index, module, args, kwargs):
        return args, kwargs

    def after_call(self, index, module, out):
        return out

    def context_fields(self) -> dict:
        """CacheContext fields beyond the name (SeaCache: step_index, sigma, num_inference_steps)."""
        return {}

    def run_metrics(self) -> dict:
        return {}

    # --- the harness ---
    @property
    def timestep(self) -> float:
        """The current step's timestep on the training scale (PAB's and FasterCache's callback)."""
        # the model timestep (0..999, as PAB's and FasterCache's ranges), not the scheduler's (a respaced
        # solver counts its own steps 0..n-1); from the plan's host list: no device sync
        return -1.0 if self.ctx is None or self.plan is None else float(self.plan.model_timesteps[self.ctx.i])

    def branch_name(self) -> str:
        ctx = self.ctx
        return "cfg" if ctx is None or ctx.guidance else ctx.branch

    @contextmanager
    def context(self, index: int, module: nn.Module):
        if not self.uses_contexts:
            yield
            return
        _set_cache_context(module, CacheContext(self.branch_name(), **self.context_fields()))
        try:
            yield
        finally:
            _set_cache_context(module, None)

    def attach(self, models, names, solver) -> None:
        self.detach()
        self.counter, self._names, self.solver = WorkCounter(), [], solver
        self.meta = any(p.is_meta for m in models for p in m.parameters())
        if self.meta:  # runs/run.py counts plain MACs on meta copies: data-dependent caches are counted in the run
            return
        try:
            for index, (model, name) in enumerate(zip(models, names, strict=True)):
                before = _hook_names(model)
                self.apply(model, name, index)
                registries = _registries(model)
                owned = [(registries[i], hook) for i, hook in sorted(_hook_names(model) - before)]
                self._models.append(model)
                self._names.append(name)
                # (names: metrics keys; counts: caches.accounting)
                self._owned.append(owned)
                self.counter.attach(model, [b for _, b in blocks_of(model)], [a for _, a in attention_modules(model)])
                registry = HookRegistry.check_if_exists_or_initialize(model)
                registry.register_hook(_ContextHook(self, index), HARNESS_HOOK)  # outermost: registered last
                self._owned[-1].append((registry, HARNESS_HOOK))
                registry.invalidate_child_registries_cache()  # contexts reach the hooks just added
            self._eager = self.eager_hooks()  # read now: detach removes the hooks before metrics are written
        except Exception:
            self.detach()
            raise

    def detach(self) -> None:
        for owned in self._owned:
            for registry, hook in reversed(owned):
                if registry.get_hook(hook) is not None:
                    registry.remove_hook(hook, recurse=False)
        for model in self._models:
            for m in unwrap_module(model).modules():
                registry = getattr(m, "_diffusers_hook", None)
                if registry is not None and not registry.hooks:
                    if "forward" in m.__dict__ and getattr(m.forward, "__func__", None) is type(m).forward:
                        del m.forward
                    del m._diffusers_hook
            registry = getattr(model, "_diffusers_hook", None)
            if registry is not None:
                registry.invalidate_child_registries_cache()
        self.counter.detach()
        self._models, self._owned = [], []  # names and counts stay for metrics()

    def reset_model(self, index: int) -> None:
        """Drop the cache state of one model (only the hooks this cache added)."""
        for registry, hook in self._owned[index]:
            h = registry.get_hook(hook)
            if h is not None and h._is_stateful:
                h.reset_state(registry._module_ref)

    def start(self, plan: SamplingPlan) -> None:
        if self.meta:
            return
        self.check_plan(plan)
        self.plan, self.ctx, self.active = plan, None, True
        for index in range(len(self._models)):
            self.reset_model(index)

    def step(self, ctx: StepContext) -> None:
        # kept, not copied: hooks listed after this one still decide (model, guidance); the call reads them
        self.ctx = ctx

    def on_call(self, index: int, rows: int) -> None:
        """Before a denoiser call inside a run: count the rows asked; at T-GATE's refresh steps, reset."""
        self.counter.models[index].asked += rows
        if self.ctx is not None and self.ctx.refresh_features:
            self.reset_model(index)

    def end(self) -> None:
        self.active = False
        for index in range(len(self._models)):
            self.reset_model(index)

    def eager_hooks(self) -> dict[str, dict]:
        """diffusers' hooks of this cache with `torch.compiler.disable`d methods, by class: the methods and
        the number of modules hooked. Under compile=regional a disabled `new_forward` runs its whole module
        eager (MagCache's blocks); a disabled helper is a graph break inside the compiled block."""
        found: dict[str, dict] = {}
        for owned in self._owned:
            for registry, name in owned:
                hook = registry.get_hook(name)
                if hook is None:
                    continue
                methods = sorted(k for k, v in vars(type(hook)).items() if getattr(v, "_torchdynamo_disable", False))
                if methods:
                    entry = found.setdefault(type(hook).__name__, {"disabled": methods, "modules": 0})
                    entry["modules"] += 1
        return found

    def metrics(self, per_forward_macs=None, num_images: int = 0) -> dict:
        """For metrics.json: the work really done, and what the cache reports of itself."""
        out = {"cache": self.name, "cache_compile_disabled_hooks": self._eager,
               **self.counter.metrics(self._names, per_forward_macs, num_images)}
        return {**out, **self.run_metrics()}


def check_choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise UserError(f"{key}={value!r}: allowed values are {', '.join(map(str, allowed))}")
