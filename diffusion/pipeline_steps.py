"""Which sampling step each denoiser call of one diffusers pipeline call belongs to.

One tracker for every technique that acts per step on a stock pipeline call (T-GATE's schedule,
T-Stitch's choice of model, DeepCache's full and cached steps), so that they agree on every call.

How a pipeline loops. Its loop makes one *entry* per timestep of `scheduler.timesteps` from where
the run starts (img2img with strength < 1 starts part-way). Each entry calls the denoiser, once
or more (SD3's skip-layer guidance pass, separate or "true" CFG passes), then `scheduler.step`
once. Most schedulers have one entry per step. Second-order ones (Heun, KDPM2:
`scheduler.order == 2`) have two per step, the last step one. PNDM as SD 1.x ships it has one
extra *warm-up* entry at the start: with `w = len(timesteps) - num_inference_steps * order`, the
pipeline's progress bar moves after entry j when j is the last entry or when j + 1 > w and
(j + 1) % order == 0.

The rule.

- entry of a denoiser call = the `scheduler.step` calls made so far in this pipeline call. Every
  call before the scheduler moves belongs to the same entry, however many the pipeline makes.
- step of a call = the progress-bar updates before its entry. Step s is the s-th step the
  progress bar shows; a run makes the `num_inference_steps` steps of its own loop (img2img:
  the ones it runs). Entries before the first update belong to step 0. A warm-up entry
  (entry < w: PNDM's first) is also flagged, so that T-GATE computes it plainly, as tgate 1.0.0
  does (it is the first half of PNDM's first step, as Heun's first call is of Heun's).
- pass of a call = its place among the calls of its entry: 0 for the first, 1 for a second pass
  in the same entry (separate CFG passes, SD3's skip-layer pass), ... Heun's two calls of a step
  are both pass 0, in two entries.

Why these two signals. Counting denoiser calls (T-GATE's old counter) runs ahead as soon as a
pipeline calls the denoiser twice per entry. Counting scheduler updates and dividing by the
order (T-Stitch's old counter) makes PNDM's warm-up entry a step of its own: 51 steps for 50.
Scheduler updates say when the loop has moved on; the progress-bar rule says which step that
is, as the user sees it.

Cost. Counting is plain Python on the host: no device-to-host copy per call. Only the number of
steps of a run (T-Stitch splits them) needs where the loop starts. Schedulers with
`set_begin_index` know it (img2img pipelines set it). For the others (DDIM, DDPM, PNDM) the first
call's timestep is looked up in `scheduler.timesteps`: one host copy per run, made only when
the number of steps is asked for.

A pipeline that calls `scheduler.step` more than once per entry (the deprecated MultiDiffusion
panorama pipeline steps every view) would count each call as an entry.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from diffusion.errors import UserError


def scheduler_order(scheduler) -> int:
    """Entries per step of `scheduler` (its `order`: 1 for most, 2 for Heun / KDPM2)."""
    order = getattr(scheduler, "order", 1)
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise UserError(f"scheduler {type(scheduler).__name__} has order={order!r}; expected an integer >= 1")
    return order


def warmup_entries(scheduler) -> int:
    """Entries of `scheduler.timesteps` before the first counted step, as the pipelines count them
    (0 for most schedulers, 1 for PNDM with skip_prk_steps). Needs `set_timesteps` to have run."""
    steps = getattr(scheduler, "num_inference_steps", None)
    timesteps = getattr(scheduler, "timesteps", None)
    if steps is None or timesteps is None:
        return 0
    return max(len(timesteps) - steps * scheduler_order(scheduler), 0)


def step_of_entry(entry: int, order: int = 1, warmup: int = 0) -> int:
    """The step of loop entry `entry` (0-based): progress-bar updates before it, i.e. the multiples
    of `order` in (warmup, entry]. Heun (order 2): entries 0, 1 -> 0, 2, 3 -> 1; PNDM (warmup 1):
    entries 0, 1 -> 0, 2 -> 1."""
    return max(entry // order - warmup // order, 0)


def first_entry_of_step(step: int, order: int = 1, warmup: int = 0) -> int:
    """The first loop entry of step `step` (the inverse of step_of_entry)."""
    return 0 if step == 0 else (warmup // order + step) * order


def steps_in_loop(entries: int, order: int = 1, warmup: int = 0) -> int:
    """Progress-bar steps of a loop of `entries` entries (the last entry always ends a step)."""
    if entries <= 0:
        return 0
    counted = max(entries // order - warmup // order, 0)  # updates after entries whose (j + 1) is a multiple
    last_counted = entries > warmup and entries % order == 0
    return counted + (0 if last_counted else 1)


def timestep_position(timesteps, timestep) -> int:
    """Index of the first entry of `timesteps` equal to `timestep` (a number, or a tensor whose entries
    are all that timestep); 0 when it is not there or not given. One host copy."""
    if timestep is None:
        return 0
    value = timestep.reshape(-1)[0] if torch.is_tensor(timestep) else torch.tensor(timestep)
    matches = (torch.as_tensor(timesteps).to(value.device) == value).nonzero()
    return int(matches[0, 0]) if len(matches) else 0


@dataclass(frozen=True)
class StepCall:
    """Where one denoiser call sits in its pipeline call (see the module docstring)."""

    step: int        # progress-bar step, 0-based
    entry: int       # loop entry: scheduler updates before the call
    pass_index: int  # place among the calls of its entry (0: the first)
    warmup: bool     # made at a scheduler warm-up entry (before the first counted step)


class PipelineSteps:
    """Counts the steps of one pipeline call at a time.

        steps = PipelineSteps()
        with steps.run(pipe.scheduler):      # brackets one pipe(...) call
            ...                              # each denoiser call: where = steps.call()

    `start(scheduler)` wraps the scheduler's `step` with a counter (an instance attribute, removed
    by `stop()`; the wrapper keeps `step`'s signature, which pipelines read). Several trackers may
    bracket the same call (one per technique): their wrappers nest and unwind in order.
    """

    def __init__(self):
        self.scheduler = None
        self.log: list[StepCall] = []  # every call registered in the current (or last) run
        self._previous_step = None
        self._had_own_step = False
        self._reset()

    def _reset(self) -> None:
        self.entries = 0  # scheduler updates in this run
        self.order: int | None = None  # read at the run's first question (the pipeline has set its timesteps)
        self.warmup: int | None = None
        self.begin: int | None = None  # where the loop starts in scheduler.timesteps (found by num_entries)
        self._num_steps: int | None = None
        self._last: StepCall | None = None

    @property
    def running(self) -> bool:
        return self.scheduler is not None

    def start(self, scheduler) -> None:
        """A new pipeline call with `scheduler`: counts start from zero."""
        if self.running:
            raise RuntimeError("this step tracker is already inside a pipeline call (calls do not nest)")
        if not callable(getattr(scheduler, "step", None)):
            raise TypeError(f"cannot count the steps of a {type(scheduler).__name__}: it has no step() method")
        self._had_own_step = "step" in vars(scheduler)
        previous = self._previous_step = scheduler.step

        @functools.wraps(previous)  # pipelines read step's signature (eta, generator): keep it visible
        def counted_step(*args, **kwargs):
            out = previous(*args, **kwargs)
            self.entries += 1
            return out

        scheduler.step = counted_step
        self.scheduler = scheduler
        self.log = []
        self._reset()

    def stop(self) -> None:
        """The scheduler's own `step` again (idempotent)."""
        scheduler, self.scheduler = self.scheduler, None
        if scheduler is None:
            return
        if self._had_own_step:
            scheduler.step = self._previous_step
        else:
            del scheduler.step
        self._previous_step = None

    @contextmanager
    def run(self, scheduler):
        self.start(scheduler)
        try:
            yield self
        finally:
            self.stop()

    def _read_scheduler(self) -> None:
        if not self.running:
            raise RuntimeError("the step tracker is asked for a step outside a pipeline call: bracket the call in "
                               "`with steps.run(pipe.scheduler):`")
        if self.order is None:
            self.order = scheduler_order(self.scheduler)
            self.warmup = warmup_entries(self.scheduler)

    def current(self) -> StepCall:
        """Where a denoiser call made now belongs; registers nothing (e.g. a ControlNet call before the
        denoiser's, or a look ahead)."""
        self._read_scheduler()
        entry, last = self.entries, self._last
        pass_index = last.pass_index + 1 if last is not None and last.entry == entry else 0
        return StepCall(step_of_entry(entry, self.order, self.warmup), entry, pass_index, entry < self.warmup)

    def call(self) -> StepCall:
        """Register one denoiser call and say where it belongs."""
        where = self.current()
        self._last = where
        self.log.append(where)
        return where

    def num_entries(self, timestep=None) -> int:
        """Entries of this run's loop (at least 1): the scheduler's timesteps from where the loop starts, fixed at
        the first ask. `timestep`: the first denoiser call's, which locates the start for schedulers without a
        begin index (one host copy per run)."""
        if self.begin is None:
            self._read_scheduler()
            timesteps = self.scheduler.timesteps
            if timesteps is None:
                raise RuntimeError(f"{type(self.scheduler).__name__} has no timesteps yet: the pipeline calls "
                                   "set_timesteps before its loop")
            begin = getattr(self.scheduler, "begin_index", None)
            self.begin = int(begin) if begin is not None else timestep_position(timesteps, timestep)
        return max(len(self.scheduler.timesteps) - self.begin, 1)

    def num_steps(self, timestep=None) -> int:
        """Steps this run makes (at least 1): the progress-bar steps of its loop (see num_entries)."""
        if self._num_steps is None:
            self._num_steps = max(steps_in_loop(self.num_entries(timestep), self.order, self.warmup), 1)
        return self._num_steps

    def step_timesteps(self, timestep=None) -> list[float]:
        """The scheduler timestep each step of this run starts at (its first entry's), on the host:
        one copy per call of this method."""
        n = self.num_steps(timestep)
        timesteps = torch.as_tensor(self.scheduler.timesteps).tolist()
        last = len(timesteps) - 1
        return [timesteps[min(self.begin + first_entry_of_step(s, self.order, self.warmup), last)] for s in range(n)]
