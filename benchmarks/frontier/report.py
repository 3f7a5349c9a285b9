"""The sweep's numbers: standard errors, the pick, the Markdown table.

Every point samples the same seeds and labels, so two points compare sample by sample: the
standard error of a difference in agreement is that of the per-sample differences (paired),
smaller than the two points' own errors combined when they agree on most samples.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from diffusion.errors import UserError

from .pareto import pareto_front
from .points import TECHNIQUE_NAMES


def agreement_stats(correct: Sequence[bool], baseline_correct: Sequence[bool]) -> dict:
    """accuracy, its standard error, and the paired difference to the baseline with its standard error."""
    c, b = np.asarray(correct, dtype=np.float64), np.asarray(baseline_correct, dtype=np.float64)
    if len(c) != len(b) or len(c) < 2:
        raise UserError(f"paired agreement needs the same samples (>= 2) in both: {len(c)} vs {len(b)}")
    n = len(c)
    diff = c - b
    return {
        "accuracy": float(c.mean()),
        "accuracy_se": float(c.std(ddof=1) / math.sqrt(n)),
        "delta": float(diff.mean()),
        "delta_se": float(diff.std(ddof=1) / math.sqrt(n)),
        "n": n,
    }


def pick_fastest(rows: Sequence[dict], tolerance: float, cost: str = "seconds") -> dict | None:
    """The cheapest point (by `cost`) whose agreement is at most `tolerance` below the large model alone's."""
    baseline = next(r for r in rows if r["technique"] == "baseline")
    ok = [r for r in rows if r.get(cost) is not None and r["accuracy"] >= baseline["accuracy"] - tolerance - 1e-12]
    return min(ok, key=lambda r: (r[cost], -r["accuracy"])) if ok else None


def mark_frontiers(rows: Sequence[dict]) -> None:
    """row["frontier"]: the cost axes ("MACs", "time") on whose agreement frontier (all points) the row lies."""
    on = {id(r): [] for r in rows}
    for cost, name in (("macs", "MACs"), ("seconds", "time")):
        if all(r.get(cost) is not None for r in rows):
            for r in pareto_front(rows, cost, "accuracy"):
                on[id(r)].append(name)
    for r in rows:
        r["frontier"] = on[id(r)]


def _steps(row: dict) -> str:
    """Steps of each model in run order (small first); the large model alone: 0 / n."""
    steps = row["steps"]
    return " / ".join(str(v) for v in steps) if len(steps) > 1 else f"0 / {steps[0]}"


def markdown_table(rows: Sequence[dict], pick: dict | None = None, base_name: str = "base") -> str:
    """One row per point, in sweep order; time and speed-up against the large model alone of the same run.
    The pick is in bold; the base config's own point (base_point) is marked with base_name."""
    baseline = next(r for r in rows if r["technique"] == "baseline")
    timed = baseline.get("seconds") is not None
    lines = ["| setting | technique | steps S / L | MACs / image | MACs vs large | sampling s | speed-up | "
             "agreement (SE) | vs large (paired SE) | 5-NN | Fréchet (floor) | frontier |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r["label"] + (f" ({base_name})" if r.get("base_point") and r["technique"] != "baseline" else "")
        name = f"**{name}**" if r is pick else name
        time = (f"{r['seconds']:.2f} | {baseline['seconds'] / r['seconds']:.2f}x" if timed else "- | -")
        lines.append(
            f"| {name} | {TECHNIQUE_NAMES[r['technique']]} | {_steps(r)} | {r['macs'] / 1e6:.1f} M | "
            f"{baseline['macs'] / r['macs']:.2f}x | {time} | {r['accuracy']:.3f} ({r['accuracy_se']:.3f}) | "
            f"{100 * r['delta']:+.1f} ({100 * r['delta_se']:.1f}) pt | {r['knn_accuracy']:.3f} | "
            f"{r['frechet']:.1f} ({r['frechet_real_floor']:.1f}) | {', '.join(r.get('frontier', [])) or ''} |")
    return "\n".join(lines)


def _versus(row: dict, baseline: dict) -> str:
    speed = f"{baseline['seconds'] / row['seconds']:.2f}x faster in time, " if row.get("seconds") else ""
    return (f"{speed}{baseline['macs'] / row['macs']:.2f}x fewer MACs, agreement {row['accuracy']:.3f} "
            f"({100 * row['delta']:+.1f} pt, paired SE {100 * row['delta_se']:.1f} pt), "
            f"Fréchet {row['frechet']:.1f} vs {baseline['frechet']:.1f}")


def summary(rows: Sequence[dict], pick: dict | None, tolerance: float, cost: str, base_name: str = "base") -> str:
    """A few lines: the baseline, the pick and how it compares (or that no point is within tolerance), and
    the base config's own point (base_point)."""
    baseline = next(r for r in rows if r["technique"] == "baseline")
    text = [f"large alone: agreement {baseline['accuracy']:.3f} (SE {baseline['accuracy_se']:.3f}, {baseline['n']} "
            f"samples), {baseline['macs'] / 1e6:.1f} M MACs per image"
            + (f", {baseline['seconds']:.2f} s" if baseline.get("seconds") is not None else "")]
    if pick is None:
        text.append(f"no point within {tolerance:g} of its agreement")
    else:
        text.append(f"fastest by {cost} within {tolerance:g} of its agreement: {pick['label']} ({pick['key']}): "
                    + _versus(pick, baseline))
    own = next((r for r in rows if r.get("base_point") and r["technique"] != "baseline"), None)
    if own is not None:
        text.append(f"{base_name}: {own['label']} ({own['key']}): " + _versus(own, baseline))
    return "\n".join(text)
