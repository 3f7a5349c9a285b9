"""Counting multiply-accumulates of a denoiser forward, on the `meta` device.

FlopCounterMode runs the real module code; on `meta` tensors nothing is computed or
allocated, so full-size models count in about a second. (On CPU tensors the fused
SDPA kernel is counted as zero, which is why counting happens on `meta`.)

Two conventions: all ops, and the one the T-GATE paper's tables use, which leaves out
the attention-score and attention-value matmuls (bmm / SDPA).
"""
from __future__ import annotations

from collections.abc import Callable

from torch.utils.flop_counter import FlopCounterMode

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
