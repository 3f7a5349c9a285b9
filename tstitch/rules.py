"""Which model runs each step: the three rules of T-Stitch's code bases.

With n steps, step i (0-based, in sampling order), models in run order with fractions f_j and
cumulative fractions c_j (two models: the small fraction r, c_0 = r):

- `index` (this project's default): model j runs steps round(c_{j-1} n) <= i < round(c_j n); the
  small model runs exactly the first round(r n) steps.
- `timestep`: upstream's rule on the model timestep t of each step (training scale, 0..999).
  Form `dit` (NVlabs/T-Stitch `dit/models.py`): two models, the small one while
  `t / 1000 >= 1 - r` (`TStitch`); three or more, model j while `1 - t / 1000 <= c_j`, the
  cumulative fractions summed in float32 as `MultiTStitch` does. Form `ldm` (its
  `ldm/models/diffusion/ddpm.py`, `TStitchProxy`): the small one when `r == 1` or
  `t / 1000 > 1 - r` (strictly); for more models the same test against each c_j.
- `floor`: upstream's stitched diffusers pipelines (`tstitch_sd_utils.py`): SD / SD-XL, the
  small model while `(i + 1) / n <= r` (for more models: the first j with `(i + 1) / n <= c_j`);
  its LCM pipeline (`lcm=True`) `i / n <= r`, with r = 0 (never) and r = 1 (always) taken apart
  (for more models a model with fraction 0 never runs).

All are decided once per run on the host (no device sync per step). The rules agree on the
paper's DDIM-100 settings but not everywhere: 25 ADM-respaced steps at r = 0.1 give 3 small
steps by `timestep` (t = 999, 957, 916 are >= 900) and 2 by `index`; 25 steps at r = 0.3 give
8 by `index`, 7 by `floor`.
"""
from __future__ import annotations

from itertools import accumulate

import torch

from diffusion.errors import UserError

from .schedule import model_per_step

RULES = ("index", "timestep", "floor")
TIMESTEP_FORMS = ("dit", "ldm")
DIFFUSION_STEPS = 1000  # upstream divides the model timestep by the training chain's length


def check_rule(rule: str, timestep_form: str = "dit") -> None:
    if rule not in RULES:
        raise UserError(f"tstitch rule={rule!r}: must be one of {', '.join(RULES)}")
    if timestep_form not in TIMESTEP_FORMS:
        raise UserError(f"tstitch timestep_form={timestep_form!r}: must be one of {', '.join(TIMESTEP_FORMS)} "
                         "(dit: small while t/1000 >= 1 - r; ldm: strictly >)")


def _timestep_dit(fractions: list[float], t: float) -> int:
    if len(fractions) == 2:  # TStitch.forward
        return 0 if t / DIFFUSION_STEPS >= (1 - fractions[0]) else 1
    # MultiTStitch.forward_with_cfg: float32 cumulative fractions, the first milestone not below progress
    progress = 1 - t / DIFFUSION_STEPS
    milestones = torch.tensor(fractions).cumsum(0)
    for j, milestone in enumerate(milestones):
        if not progress > milestone:
            return j
    return len(fractions) - 1  # float32 sums just below 1 (upstream would return nothing)


def _timestep_ldm(fractions: list[float], t: float) -> int:
    for j, c in enumerate(list(accumulate(fractions))[:-1]):  # TStitchProxy.get_cur_idx, per milestone
        if c == 1.0 or t / DIFFUSION_STEPS > (1 - c):
            return j
    return len(fractions) - 1


def _floor(fractions: list[float], i: int, n: int, lcm: bool) -> int:
    for j, (f, c) in enumerate(zip(fractions[:-1], accumulate(fractions), strict=False)):
        if not lcm:
            if (i + 1) / n <= c:
                return j
        elif f != 0.0 and (c == 1.0 or i / n <= c):  # TStitchLCM: ratio 0 -> large, 1 -> small
            return j
    return len(fractions) - 1


def models_for_steps(fractions: list[float], num_steps: int, rule: str = "index", *, timesteps=None,
                     timestep_form: str = "dit", lcm: bool = False) -> list[int]:
    """(num_steps,) index of the model that runs each step under `rule`.

    timesteps: the model timestep of each step (host numbers, training scale), for `timestep`.
    lcm: `floor` as upstream's LCM pipeline (i / n <= r) instead of its SD / SD-XL ones.
    """
    check_rule(rule, timestep_form)
    if rule == "index":
        return model_per_step(fractions, num_steps)
    if rule == "floor":
        return [_floor(fractions, i, num_steps, lcm) for i in range(num_steps)]
    if timesteps is None or len(timesteps) < num_steps or any(t is None for t in list(timesteps)[:num_steps]):
        raise UserError(f"tstitch rule=timestep needs the model timestep of each of the {num_steps} steps; they "
                         "are not known here (e.g. scripts/count_macs.py with sampler=pipeline does not build the "
                         "pipeline's scheduler): use rule=index or rule=floor, or a native sampler")
    pick = _timestep_dit if timestep_form == "dit" else _timestep_ldm
    return [pick(fractions, float(t)) for t in list(timesteps)[:num_steps]]
