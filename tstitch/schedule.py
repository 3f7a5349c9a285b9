"""Which denoiser runs which step: fractions of the trajectory, in order.

With n steps and cumulative fractions c_1 <= ... <= c_m = 1, model j runs the steps
round(c_{j-1} n) <= i < round(c_j n). For two models and small fraction r the small
model runs exactly the first round(r n) steps, the rule the paper's DiT numbers use.
"""
from __future__ import annotations

import math
from itertools import accumulate

from diffusion.errors import UserError

TOLERANCE = 1e-6  # fractions read from configs, e.g. 0.4 + 0.2 + 0.4, need not sum to 1 exactly


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def resolve_fractions(ratio: float | None = None, fractions=None, num_models: int | None = None) -> list[float]:
    """The per-model fractions, checked: each in [0, 1], summing to 1.

    ratio: two-model shorthand, the first (small) model's fraction -> [ratio, 1 - ratio].
    fractions: one per model, in the order the models run (smallest first).
    """
    if fractions is not None:
        fractions = list(fractions)
        if len(fractions) < 2:
            raise UserError(f"fractions={fractions}: stitching needs at least two models")
    elif ratio is not None:
        if not _is_number(ratio) or not 0 <= ratio <= 1:
            raise UserError(f"ratio={ratio!r}: the small model's fraction must be a number in [0, 1]")
        fractions = [float(ratio), 1.0 - float(ratio)]
    else:
        raise UserError("give either ratio (two models) or fractions (one per model)")
    bad = [f for f in fractions if not _is_number(f) or not 0 <= f <= 1]
    if bad:
        raise UserError(f"fractions={fractions}: each fraction must be a number in [0, 1] (bad: {bad})")
    if abs(sum(fractions) - 1) > TOLERANCE:
        raise UserError(f"fractions={fractions} sum to {sum(fractions):.6g}; they must sum to 1")
    if num_models is not None and len(fractions) != num_models:
        raise UserError(f"{len(fractions)} fractions {fractions} for {num_models} models: give one fraction per model")
    return [float(f) for f in fractions]


def step_boundaries(fractions: list[float], num_steps: int) -> list[int]:
    """End step (exclusive) of each model: round(cumulative fraction * n), the last one n."""
    ends = [round(c * num_steps) for c in accumulate(fractions)]
    ends[-1] = num_steps
    return ends


def model_per_step(fractions: list[float], num_steps: int) -> list[int]:
    """(n,) model index of every step."""
    indices, start = [], 0
    for j, end in enumerate(step_boundaries(fractions, num_steps)):
        indices += [j] * max(end - start, 0)
        start = max(start, end)
    return indices


def steps_per_model(fractions: list[float], num_steps: int) -> list[int]:
    per_step = model_per_step(fractions, num_steps)
    return [per_step.count(j) for j in range(len(fractions))]
