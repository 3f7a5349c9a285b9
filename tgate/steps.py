"""T-GATE's view of the pipeline step rule, which lives in `diffusion.pipeline_steps` (one tracker for
T-GATE, T-Stitch and DeepCache): a call at a scheduler warm-up entry has no T-GATE step (tgate 1.0.0
computes it plainly, its `cur_step` is negative there); every other call has its progress-bar step.
"""
from __future__ import annotations

from diffusion.pipeline_steps import scheduler_order, step_of_entry
from diffusion.pipeline_steps import warmup_entries as warmup_calls

__all__ = ["scheduler_order", "step_of_call", "warmup_calls"]


def step_of_call(call: int, order: int = 1, warmup: int = 0) -> int | None:
    """The T-GATE step of the denoiser call made at loop entry `call` (0-based, one call per entry), or None
    at a warm-up entry. Examples: order 1 -> s = call - warmup; Heun (order 2) -> calls 0, 1 are step 0,
    calls 2, 3 step 1, ..."""
    if call < warmup:
        return None
    return step_of_entry(call, order, warmup)
