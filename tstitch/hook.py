"""T-Stitch as a sampler hook: pick the denoiser of every step (rules: tstitch.rules)."""
from __future__ import annotations

from diffusion import Hook, SamplingPlan, StepContext

from .compat import check_stitchable
from .rules import check_rule, models_for_steps
from .schedule import resolve_fractions


class TStitchHook(Hook):
    """Run denoiser j for its fraction of the steps, in order (smallest model first).

    Only the model choice changes: guidance runs within each model and the latent
    trajectory is one, with no re-noising at a switch. rule: `index` (the first
    round(r n) steps), `timestep` (upstream's test on each step's model timestep, in its
    `dit` or `ldm` form) or `floor` (upstream's pipelines: (i + 1) / n <= r); see tstitch.rules.
    """

    def __init__(self, ratio: float | None = None, fractions=None, rule: str = "index", timestep_form: str = "dit"):
        self.fractions = resolve_fractions(ratio, fractions)
        check_rule(rule, timestep_form)
        self.rule, self.timestep_form = rule, timestep_form
        self._per_step: list[int] = []

    def attach(self, models, names, solver) -> None:
        """Check the run's denoisers against the fractions and each other."""
        resolve_fractions(fractions=self.fractions, num_models=len(models))
        check_stitchable(models, names, solver.learned_variance)

    def start(self, plan: SamplingPlan) -> None:
        resolve_fractions(fractions=self.fractions, num_models=plan.num_models)
        # host list, from the plan's host timesteps: no device sync per step
        self._per_step = models_for_steps(self.fractions, plan.num_steps, self.rule, timesteps=plan.model_timesteps,
                                          timestep_form=self.timestep_form)

    def step(self, ctx: StepContext) -> None:
        ctx.model_index = self._per_step[ctx.i]
