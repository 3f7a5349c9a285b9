"""A stitched denoiser that stands in for a diffusers pipeline's `unet` (or `transformer`).

The pipeline's own `__call__` runs unchanged: it calls `pipe.unet(...)` once (or more) per
step, and this module hands each call to the model whose turn it is, by the rules of the
native hook (tstitch.rules: `index`, the default, gives the small model the first
round(r n) steps; `timestep` tests each step's scheduler timestep; `floor` is upstream's stitched
pipelines' `(i + 1) / n <= r`, `i / n <= r` for its LCM pipeline, where, as in upstream's loop, i is
the loop entry and n = len(timesteps): on most schedulers entries are steps, but PNDM's warm-up
entry and Heun's second entries count too, so the switch can fall inside a step there, as upstream's).

Which step a call belongs to comes from the pipeline's own loop, through the step tracker that
T-GATE and DeepCache use too (`diffusion.pipeline_steps`): a call's step is the progress-bar step
of the loop entry it is made in, entries being counted by `scheduler.step` calls. So Heun-type
schedulers (two calls per step) and pipelines that call the denoiser several times per step
(separate guidance passes, SD3's skip-layer pass) stay on one step until the loop moves on, PNDM's
warm-up entry belongs to the first step (a 50-step PNDM run makes 50 steps, not 51), img2img with
strength < 1 splits the steps it runs, and no call copies anything from the device (only the
number of steps of a run needs where the loop starts: one lookup per run for schedulers without
a begin index, DDIM, DDPM, PNDM).

`trajectory(scheduler)` brackets one pipeline call: the tracker counts the scheduler's `step`
calls (an instance-level wrapper, removed on exit) and the per-run state starts afresh.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from diffusion.errors import UserError
from diffusion.pipeline_steps import PipelineSteps, StepCall, first_entry_of_step

from .rules import check_rule, models_for_steps
from .schedule import resolve_fractions


class _Trajectory:
    """Per-call state: the step tracker and, from the first model call on, the model index of every step (and,
    for `floor`, of every loop entry)."""

    def __init__(self, scheduler, steps: PipelineSteps, fractions: list[float], rule: str = "index",
                 timestep_form: str = "dit", lcm: bool = False):
        self.scheduler, self.steps = scheduler, steps
        self.fractions = fractions
        self.rule, self.timestep_form, self.lcm = rule, timestep_form, lcm
        self.per_step: list[int] | None = None
        self.per_entry: list[int] | None = None

    def plan(self, timestep=None) -> list[int]:
        """(n,) model index per step, n = steps this run makes; fixed at the first model call,
        whose `timestep` locates the start for schedulers without a begin index."""
        if self.per_step is None:
            if self.scheduler.timesteps is None:
                raise RuntimeError("the stitched denoiser was called before the scheduler's set_timesteps")
            n = self.steps.num_steps(timestep)
            if self.rule == "floor":  # upstream's (i + 1) / len(timesteps) on its loop index: per entry
                self.per_entry = models_for_steps(self.fractions, self.steps.num_entries(timestep), "floor",
                                                  lcm=self.lcm)
                self.per_step = [self.per_entry[first_entry_of_step(s, self.steps.order, self.steps.warmup)]
                                 for s in range(n)]
            else:
                # the timestep rule reads each step's timestep: one host copy per run, only for that rule
                steps = self.steps.step_timesteps(timestep) if self.rule == "timestep" else None
                self.per_step = models_for_steps(self.fractions, n, self.rule, timesteps=steps,
                                                 timestep_form=self.timestep_form, lcm=self.lcm)
        return self.per_step

    def model_of(self, where: StepCall, timestep=None) -> tuple[int, int]:
        """(step, model index) of the call at `where`; a pipeline that runs past its schedule keeps the last model."""
        per_step = self.plan(timestep)
        step = min(where.step, len(per_step) - 1)
        if self.per_entry is not None:
            return step, self.per_entry[min(where.entry, len(self.per_entry) - 1)]
        return step, per_step[step]


class StitchedDenoiser(nn.Module):
    """`models` in run order (smallest first, the pipeline's own denoiser last) and their fractions.

    Attribute reads the pipeline makes of its denoiser (`config`, `dtype`, `device`,
    `add_embedding`, `attn_processors`, ...) go to the last (large) model, so the pipeline
    prepares inputs exactly as it does for that model; each call's arguments (ControlNet
    residuals included) go unchanged to the model that runs, except that `timestep_cond`
    (LCM's guidance embedding) is dropped for a model without a `time_cond_proj_dim`
    (an LCM-LoRA model, stitched with a distilled LCM UNet).
    """

    def __init__(self, models, fractions=None, ratio: float | None = None, names=None, rule: str = "index",
                 timestep_form: str = "dit"):
        super().__init__()
        models = list(models)
        if len(models) < 2:
            raise UserError(f"a stitched denoiser needs at least two models, got {len(models)}")
        check_rule(rule, timestep_form)
        self.models = nn.ModuleList(models)
        self.fractions = resolve_fractions(ratio, fractions, num_models=len(models))
        self.rule, self.timestep_form = rule, timestep_form
        self.names = list(names) if names is not None else [f"model{j}" for j in range(len(models))]
        self._trajectory: _Trajectory | None = None
        self.steps = PipelineSteps()  # the step of each call; its `log` keeps the last pipeline call's
        # what ran in the last pipeline call: model index per step, and (step, model index) per call
        self.last_steps: list[int] = []
        self.last_calls: list[tuple[int, int]] = []

    # -- the large model's face ------------------------------------------------------------
    @property
    def large(self) -> nn.Module:
        return self.models[-1]

    @property
    def config(self):
        return self.large.config

    @property
    def dtype(self) -> torch.dtype:
        return self.large.dtype

    @property
    def device(self) -> torch.device:
        return self.large.device

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # own parameters, buffers and submodules
        except AttributeError:
            if name in ("models", "_modules") or name.startswith("__"):
                raise
            return getattr(self.large, name)

    # -- one pipeline call -----------------------------------------------------------------
    @contextmanager
    def trajectory(self, scheduler, fractions=None, lcm: bool = False):
        """Bracket one pipeline call that uses `scheduler` (fractions: this call only; lcm: the call is
        a latent-consistency pipeline's, whose `floor` rule is upstream's LCM one)."""
        if self._trajectory is not None:
            raise RuntimeError("this stitched denoiser is already inside a pipeline call (calls do not nest)")
        fractions = self.fractions if fractions is None else resolve_fractions(fractions=fractions,
                                                                               num_models=len(self.models))
        run = _Trajectory(scheduler, self.steps, fractions, self.rule, self.timestep_form, lcm)
        self._trajectory, self.last_steps, self.last_calls = run, [], []
        try:
            with run.steps.run(scheduler):
                yield run
        finally:
            self._trajectory = None

    def current_model_index(self, timestep=None) -> int:
        run = self._trajectory
        if run is None:
            raise RuntimeError("the stitched denoiser picks its model by the step of a pipeline call: call the "
                               "pipeline (tstitch.stitch_pipeline / get_tstitch_pipeline set it up), or bracket "
                               "the calls in `with stitched.trajectory(scheduler):`")
        step, index = run.model_of(run.steps.call(), timestep)
        if len(self.last_steps) <= step:
            self.last_steps.append(index)
        self.last_calls.append((step, index))
        return index

    def forward(self, *args, **kwargs):
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        model = self.models[self.current_model_index(timestep)]
        if kwargs.get("timestep_cond") is not None and getattr(model.config, "time_cond_proj_dim", None) is None:
            kwargs = {**kwargs, "timestep_cond": None}
        return model(*args, **kwargs)

    def steps_per_model(self) -> dict[str, int]:
        """Steps each model ran in the last pipeline call."""
        return {name: self.last_steps.count(j) for j, name in enumerate(self.names)}
