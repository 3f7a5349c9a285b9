"""Which sampling step a denoiser call belongs to, counted the way diffusers pipelines count.

A pipeline's loop runs over the scheduler's timesteps and calls the denoiser once per
entry (the CFG halves are one batched call). Most schedulers have one entry per step.
Second-order ones (Heun, DPM2; `scheduler.order == 2`) have two entries per step, and a
few (PNDM's Runge-Kutta start) have extra "warm-up" entries before the first counted
step. The pipelines' progress bar advances after entry j when j+1 > warmup and
(j+1) % order == 0; we use the same rule, so step s is the s-th progress-bar step.

Counting calls from the start of the loop (instead of looking a timestep up in
`scheduler.timesteps`) needs no device-to-host copy per call, and it counts the steps
that actually run: an img2img call with strength < 1 starts at step 0 of its own loop.
"""
from __future__ import annotations


def warmup_calls(scheduler) -> int:
    """Entries of `scheduler.timesteps` before the first counted step (0 for most schedulers)."""
    order = scheduler_order(scheduler)
    steps = getattr(scheduler, "num_inference_steps", None)
    timesteps = getattr(scheduler, "timesteps", None)
    if steps is None or timesteps is None:
        return 0
    return max(len(timesteps) - steps * order, 0)


def scheduler_order(scheduler) -> int:
    order = getattr(scheduler, "order", 1)
    if not isinstance(order, int) or order < 1:
        raise ValueError(f"scheduler {type(scheduler).__name__} has order={order!r}; expected an integer >= 1")
    return order


def step_of_call(call: int, order: int = 1, warmup: int = 0) -> int | None:
    """The step index of the `call`-th denoiser call (0-based) of a pipeline's loop, or None
    for a call before the first counted step (a scheduler warm-up entry).

    Step s covers the calls after s progress-bar updates; an update follows call j when
    j+1 > warmup and (j+1) % order == 0. Examples: order 1 -> s = call - warmup;
    Heun (order 2, no warm-up) -> calls 0,1 are step 0, calls 2,3 step 1, ...
    """
    if call < warmup:
        return None
    # updates strictly before this call: multiples of `order` in (warmup, call]
    return call // order - warmup // order
