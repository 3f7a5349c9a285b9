"""Counting multiply-accumulates of a denoiser forward, on the `meta` device.

FlopCounterMode runs the real module code; on `meta` tensors nothing is computed or
allocated, so full-size models count in about a second. (On CPU tensors the fused
SDPA kernel is counted as zero, which is why counting happens on `meta`.)

Two conventions: all ops, and the one the T-GATE paper's tables use, which leaves out
the attention-score and attention-value matmuls (bmm / SDPA).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from .context import SamplingPlan, StepContext

# ops that compute softmax(QK^T)V: FlopCounterMode reports SDPA either as itself or,
# when it is decomposed, as the two batched matmuls
ATTENTION_MATMUL_OPS = ("bmm", "baddbmm", "scaled_dot_product")


def count_macs(forward: Callable[[], object]) -> dict[str, int]:
    """Run `forward()` under a flop counter; returns {"macs_all", "macs_paper"} (MACs = FLOPs / 2)."""
    with FlopCounterMode(display=False) as counter:
        forward()
    totals = counter.get_flop_counts().get("Global", {})
    all_flops = sum(totals.values())
    attention = sum(v for op, v in totals.items() if any(name in str(op) for name in ATTENTION_MATMUL_OPS))
    return {"macs_all": all_flops // 2, "macs_paper": (all_flops - attention) // 2}


def _hashable(value):
    try:
        hash(value)
        return value
    except TypeError:
        return repr(value)


def count_sampling_macs(
    count_step: Callable[[StepContext, int], dict[str, int]],
    plan: SamplingPlan,
    hooks=(),
) -> dict:
    """MACs of a whole sampling run, step by step, with the hooks deciding as in `sample`.

    count_step(ctx, rows): the MACs of the step's denoiser call (`ctx.model_index`) at
    `rows` batch rows, e.g. `count_macs` over a `meta` model. The loop mirrors
    `diffusion.sample`'s decisions: a guided step runs 2B rows, any other B rows of the
    chosen branch; hooks that gate modules act for real, since the real module code
    runs. Returns {"macs_all", "macs_paper", "per_step": [...]} for the plan's batch
    (batch_size=1 gives per-image counts).

    A meta forward of a large model takes seconds (meta kernels run in Python), and
    most steps repeat an earlier one exactly, so a step is counted once per key: the
    model, the rows, the decisions in `ctx.attention`, and the `count_state()` key of
    every hook that keeps state inside the model (e.g. which attention caches are
    filled). A repeated step takes the earlier count, and such hooks get
    `restore_count_state(...)` with what that step left, so later steps see the state
    a real run gives them. Hooks that change a forward by other means than these
    must implement count_state too.
    """
    B = plan.batch_size
    stateful = [h for h in hooks if hasattr(h, "count_state")]
    memo: dict = {}
    per_step = []
    for hook in hooks:
        hook.start(plan)
    for i in range(plan.num_steps):
        ctx = StepContext(i=i, n=plan.num_steps, t=torch.zeros(B, device="meta"),
                          timestep=plan.model_timesteps[i], guidance=plan.use_cfg)
        for hook in hooks:
            hook.step(ctx)
        rows = 2 * B if ctx.guidance else B
        key = (ctx.model_index, rows, _hashable(tuple(sorted(ctx.attention.items()))),
               tuple(h.count_state()[0] for h in stateful))
        if key in memo:
            macs, after = memo[key]
            for hook, snapshot in zip(stateful, after, strict=True):
                hook.restore_count_state(snapshot)
        else:
            macs = count_step(ctx, rows)
            memo[key] = (macs, [h.count_state()[1] for h in stateful])
        per_step.append({"step": i, "model_index": ctx.model_index, "rows": rows, **macs})
    for hook in hooks:
        hook.end()
    return {"macs_all": sum(s["macs_all"] for s in per_step),
            "macs_paper": sum(s["macs_paper"] for s in per_step),
            "forwards_counted": len(memo), "per_step": per_step}
