"""T-GATE as a sampler hook: one schedule over the whole trajectory, whichever model runs."""
from __future__ import annotations

from diffusion import Hook, SamplingPlan, StepContext

from .config import TGateConfig
from .model_gate import gate_attention, ungate_attention
from .state import TGateState


class TGateHook(Hook):
    """Gates the attention of every denoiser of the run and truncates guidance.

    Keyword settings are TGateConfig's (plain values, as Hydra passes them). The step
    count is the trajectory's: with T-Stitch, each model's attention modules keep their
    own caches, and a model that meets a reuse step it has no cache for computes it.
    """

    def __init__(self, gate_step: int = 10, sp_interval: int = 5, fi_interval: int = 1, warm_up: int = 2,
                 lcm: bool = False, branch: str = "uncond", cfg_scale: float | None = None,
                 cache_attention: bool = True):
        """cfg_scale: the run's guidance scale, when known from the config, so that lcm with a
        CFG batch is refused before any model is built (it is checked again at `start`).
        cache_attention=False: guidance truncation alone (TGateConfig)."""
        self.config = TGateConfig(gate_step, sp_interval, fi_interval, warm_up, lcm, branch, cache_attention)
        if cfg_scale is not None:
            self.config.check_guidance(use_cfg=cfg_scale != 1)
        self.state = TGateState(self.config)
        self._models: list = []

    def attach(self, models, names, solver) -> None:
        self.detach()
        for model in models:
            gate_attention(model, self.config, self.state)
            self._models.append(model)

    def detach(self) -> None:
        for model in self._models:
            ungate_attention(model)
        self._models = []

    def start(self, plan: SamplingPlan) -> None:
        self.state.start(plan.use_cfg)

    def step(self, ctx: StepContext) -> None:
        actions = self.state.step(ctx.i)
        ctx.attention["tgate"] = actions
        g = self.config.gate_step
        if ctx.i in (g - 1, g):  # caches of other techniques restart here (reference: DeepCache reset)
            ctx.refresh_features = True
        if ctx.guidance and not actions.guidance:
            ctx.guidance = False  # from the gate step on: one branch at batch B
            ctx.branch = self.config.branch

    def end(self) -> None:
        self.state.end()

    # MACs counting (diffusion.macs.count_sampling_macs): the caches decide what a forward
    # computes, so a counted step is only repeated when the caches look the same
    def count_state(self):
        caches = [h.cache for h in self.state.module_hooks]
        return (self.state.actions, tuple(None if c is None else tuple(c.shape) for c in caches)), caches

    def restore_count_state(self, caches) -> None:
        for hook, cache in zip(self.state.module_hooks, caches, strict=True):
            hook.cache = cache
