"""T-GATE's per-step schedule as a pure function of the step index (tgate 1.0.0 behaviour).

`s` counts the sampling steps (after any scheduler warm-up steps), `g` is gate_step.
Two phases (Liu et al. 2024, "Faster Diffusion via Temporal Attention Decomposition"):

| step     | cross-attention                       | self-attention                                   |
|----------|---------------------------------------|--------------------------------------------------|
| s < g-1  | compute                               | s < warm_up: compute; s == warm_up: cache;       |
|          |                                       | else cache if s % sp_interval == 0, else reuse   |
| s == g-1 | cache the mean of the two CFG halves  | cache the mean of the two CFG halves             |
| s >= g   | reuse                                 | cache if s % fi_interval == 0, else reuse        |

Guidance (the CFG batch) runs for s < g only. With `lcm=True` there is no CFG batch
at all, so "the mean of the CFG halves" is the output itself (caches keep their shape).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from diffusion.errors import UserError


class Action(str, Enum):
    """What one attention module does at one step."""

    COMPUTE = "compute"
    CACHE = "compute_and_cache"  # compute, keep the output for later steps
    CACHE_CFG_MEAN = "compute_and_cache_cfg_mean"  # compute (2B rows), keep the mean of the halves (B rows)
    REUSE = "reuse"  # return the cached output, compute nothing


@dataclass(frozen=True)
class StepActions:
    self_attn: Action
    cross_attn: Action
    guidance: bool  # whether the CFG batch (both branches) may still run at this step


PLAIN = StepActions(Action.COMPUTE, Action.COMPUTE, True)  # gating off: the model as it was


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_schedule(gate_step, sp_interval, fi_interval, warm_up, lcm=False) -> None:
    """Raise ValueError naming the first bad setting and its allowed range.

    A gate_step past the last step is allowed: no gate is reached (cross-attention computed and
    guidance run at every step), but self-attention is still reused per sp_interval from warm_up
    on, as in tgate 1.0.0; sp_interval=1 with warm_up=0 (or no T-GATE) is the plain model.
    """
    for key, value, low in (("gate_step", gate_step, 1), ("sp_interval", sp_interval, 1),
                            ("fi_interval", fi_interval, 1), ("warm_up", warm_up, 0)):
        if not _is_int(value) or value < low:
            raise UserError(f"tgate {key}={value!r}: must be an integer >= {low}")
    if not isinstance(lcm, bool):
        raise UserError(f"tgate lcm={lcm!r}: must be true or false")


def gate_actions(s: int, gate_step: int, sp_interval: int, fi_interval: int, warm_up: int,
                 lcm: bool = False) -> StepActions:
    """The actions of step `s` (0-based); see the module docstring for the table."""
    check_schedule(gate_step, sp_interval, fi_interval, warm_up, lcm)
    if not _is_int(s) or s < 0:
        raise UserError(f"step s={s!r}: must be an integer >= 0")
    mean = Action.CACHE if lcm else Action.CACHE_CFG_MEAN
    guidance = s < gate_step and not lcm
    if s < gate_step - 1:  # semantics-planning phase: text still attended to
        if s < warm_up:
            self_attn = Action.COMPUTE
        elif s == warm_up or s % sp_interval == 0:
            self_attn = Action.CACHE
        else:
            self_attn = Action.REUSE
        return StepActions(self_attn, Action.COMPUTE, guidance)
    if s == gate_step - 1:  # last step with both branches: cache what later steps reuse
        return StepActions(mean, mean, guidance)
    # fidelity-improving phase: cross-attention frozen, self-attention refreshed every fi_interval
    self_attn = Action.CACHE if s % fi_interval == 0 else Action.REUSE
    return StepActions(self_attn, Action.REUSE, guidance)


def gate_table(num_steps: int, **settings) -> list[StepActions]:
    """gate_actions for steps 0..num_steps-1."""
    return [gate_actions(s, **settings) for s in range(num_steps)]
