"""T-Stitch as a sampler hook: pick the denoiser of every step by its index."""
from __future__ import annotations

from diffusion import Hook, SamplingPlan, StepContext

from .compat import check_stitchable
from .schedule import model_per_step, resolve_fractions


class TStitchHook(Hook):
    """Run denoiser j for its fraction of the steps, in order (smallest model first).

    Only the model choice changes: guidance runs within each model and the latent
    trajectory is one, with no re-noising at a switch.
    """

    def __init__(self, ratio: float | None = None, fractions=None):
        self.fractions = resolve_fractions(ratio, fractions)
        self._per_step: list[int] = []

    def attach(self, models, names, solver) -> None:
        """Check the run's denoisers against the fractions and each other."""
        resolve_fractions(fractions=self.fractions, num_models=len(models))
        check_stitchable(models, names, solver.learned_variance)

    def start(self, plan: SamplingPlan) -> None:
        resolve_fractions(fractions=self.fractions, num_models=plan.num_models)
        self._per_step = model_per_step(self.fractions, plan.num_steps)  # host list: no device sync

    def step(self, ctx: StepContext) -> None:
        ctx.model_index = self._per_step[ctx.i]
