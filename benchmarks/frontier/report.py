"""The sweep's numbers: standard errors, the pick, the Markdown table, the summary.

Every point samples the same seeds and labels, so two points compare sample by sample: the
standard error of a difference in agreement is that of the per-sample differences (paired),
smaller than the two points' own errors combined when they agree on most samples.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from diffusion.errors import UserError

from .judges import JUDGES, PAIRED, paired_stats, within
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


def within_frechet(row: dict, baseline: dict, frechet_tolerance: float | None) -> bool:
    """Whether the row's pixel Fréchet distance is at most (1 + frechet_tolerance) x the large model alone's on
    the same seeds (a relative bound: the distance's small-N bias scales both). None: no bound; a set without
    Fréchet distances (pipelines) is not bounded either."""
    if frechet_tolerance is None or baseline.get("frechet") is None:
        return True
    value = row.get("frechet")
    return value is not None and not math.isnan(value) \
        and value <= baseline["frechet"] * (1.0 + frechet_tolerance) + 1e-12


def same_steps_row(rows: Sequence[dict], row: dict) -> dict | None:
    """The large model alone at row's sampler and steps (no technique), if the set has it."""
    return next((r for r in rows if r["technique"] in ("baseline", "steps") and r["sampler"] == row["sampler"]
                 and r["steps"] == row["steps"]), None)


def add_same_steps_speedups(rows: Sequence[dict], cost: str) -> None:
    """row["same_steps_speedup"]: how many times cheaper (by `cost`) the row is than the large model alone at
    its own sampler and steps, the part of its speed-up its technique earns (fewer steps earn the rest);
    row["same_steps_key"] names that row. None where the set lacks it or the cost is unknown."""
    for row in rows:
        same = same_steps_row(rows, row)
        ok = same is not None and row.get(cost) and same.get(cost)
        row["same_steps_speedup"] = same[cost] / row[cost] if ok else None
        row["same_steps_key"] = same["key"] if same is not None else None
        row["same_steps_cost"] = cost


def pick_fastest(rows: Sequence[dict], judges: Sequence[str], tolerance: float, cost: str = "seconds",
                 techniques: Sequence[str] | None = None, frechet_tolerance: float | None = None,
                 same_steps_speedup: float | None = None, se_margin: float = 0.0) -> dict | None:
    """The cheapest point (by `cost`) within `tolerance` of the large model alone (the first row) by every judge
    and with a Fréchet distance within `frechet_tolerance` (relative) of its, among the points of `techniques`
    (None: of every kind, the large model alone included), and, with `same_steps_speedup`, at least that many
    times cheaper than the large model alone at its own sampler and steps (row["same_steps_speedup"],
    add_same_steps_speedups: the technique, not fewer steps, must earn that much). `se_margin`: judges.within."""
    baseline = rows[0]
    ok = [r for r in rows if r.get(cost) is not None and within(r, baseline, judges, tolerance, se_margin)
          and within_frechet(r, baseline, frechet_tolerance)
          and (techniques is None or r["technique"] in techniques)
          and (same_steps_speedup is None or (r.get("same_steps_speedup") or 0.0) >= same_steps_speedup)]
    return min(ok, key=lambda r: (r[cost], -r.get("accuracy", r.get("ssim", 0.0)))) if ok else None


def mark_frontiers(rows: Sequence[dict]) -> None:
    """row["frontier"]: the cost axes ("MACs", "time") on whose quality frontier (all points) the row lies
    (SVC agreement for the digits, else SSIM to the large model alone)."""
    quality = "accuracy" if "accuracy" in rows[0] else "ssim"
    on = {id(r): [] for r in rows}
    for cost, name in (("macs", "MACs"), ("seconds", "time")):
        if all(r.get(cost) is not None for r in rows):
            for r in pareto_front(rows, cost, quality):
                on[id(r)].append(name)
    for r in rows:
        r["frontier"] = on[id(r)]


def _steps(row: dict) -> str:
    """Steps of each model in run order (small first); the large model alone: 0 / n."""
    steps = row["model_steps"]
    return " / ".join(str(v) for v in steps) if len(steps) > 1 else f"0 / {steps[0]}"


def _pt(row: dict, prefix: str) -> str:
    return f"{100 * row[prefix + 'delta']:+.1f} ({100 * row[prefix + 'delta_se']:.1f})"


def _psnr(row: dict) -> str:
    return "inf" if math.isinf(row["psnr"]) else f"{row['psnr']:.1f}"


def markdown_table(rows: Sequence[dict], pick: dict | None = None, base_name: str = "base",
                   quality: str = "digits") -> str:
    """One row per point; time and speed-up against the large model alone (the first row) of the same set.
    Agreement differences in points (paired SE); the pick in bold; the base config's own point marked."""
    baseline = rows[0]
    timed = baseline.get("seconds") is not None
    digits = quality == "digits"
    head = ["setting", "technique", "steps S / L", "MACs / image", "MACs vs large", "sampling s", "speed-up"]
    same_steps = any(r.get("same_steps_speedup") is not None for r in rows)
    if same_steps:  # the speed-up over the large model alone at the row's own sampler and steps
        head.append("vs large, same steps")
    if digits:
        head += ["SVC agreement", "vs large, pt (paired SE)", "LogReg vs large, pt", "5-NN vs large, pt",
                 "Fréchet (floor)"]
    else:
        head += [k for k in ("fid", "inception_score", "clip_score") if k in baseline]
    head += ["PSNR dB", "SSIM", "frontier"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        name = r["label"] + (f" ({base_name})" if r.get("base_point") and r["technique"] != "baseline" else "")
        name = f"**{name}**" if r is pick else name
        time = [f"{r['seconds']:.2f}", f"{baseline['seconds'] / r['seconds']:.2f}x"] if timed else ["-", "-"]
        macs = ([f"{r['macs'] / 1e6:.1f} M", f"{baseline['macs'] / r['macs']:.2f}x"]
                if r.get("macs") and baseline.get("macs") else ["-", "-"])
        cells = [name, TECHNIQUE_NAMES[r["technique"]], _steps(r), *macs, *time]
        if same_steps:
            cells.append("-" if r.get("same_steps_speedup") is None else f"{r['same_steps_speedup']:.2f}x"
                         + ("" if r["same_steps_cost"] == "seconds" else f" ({r['same_steps_cost']})"))
        if digits:
            cells += [f"{r['accuracy']:.4f}", _pt(r, ""), _pt(r, "logreg_"), _pt(r, "knn_"),
                      f"{r['frechet']:.1f} ({r['frechet_real_floor']:.1f})"]
        else:
            cells += [f"{r[k]:.3f}" for k in ("fid", "inception_score", "clip_score") if k in baseline]
        cells += [_psnr(r), f"{r['ssim']:.3f}", ", ".join(r.get("frontier", []))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compiled_table(rows: Sequence[dict], modes: Sequence[str]) -> str:
    """Eager and compiled sampling time of each timed row (round-robin medians; compiling not included), speed-ups
    against the large model alone timed the same way, and what dynamo did (recompiles, compile seconds)."""
    head = ["setting", "eager s", "speed-up"]
    for mode in modes:
        head += [f"{mode} s", "speed-up", "vs eager", "recompiles", "graphs", "compile s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], f"{r['seconds']:.3f}", f"{r['speedup']:.2f}x"]
        for mode in modes:
            cells += [f"{r[f'seconds_{mode}']:.3f}", f"{r[f'speedup_{mode}']:.2f}x",
                      f"{r['seconds'] / r[f'seconds_{mode}']:.2f}x", str(r[f"recompiles_{mode}"])
                      + (" (limit hit)" if r[f"recompile_limit_hit_{mode}"] else ""),
                      str(r[f"compiled_graphs_{mode}"]), f"{r[f'compile_seconds_{mode}']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _versus(row: dict, baseline: dict, quality: str) -> str:
    speed = f"{baseline['seconds'] / row['seconds']:.2f}x faster in time, " if row.get("seconds") else ""
    text = speed + (f"{baseline['macs'] / row['macs']:.2f}x fewer MACs" if row.get("macs") and baseline.get("macs")
                    else f"{baseline['quality_run_seconds'] / row['quality_run_seconds']:.2f}x faster (own runs)")
    if quality == "digits":
        text += (f", SVC {row['accuracy']:.4f} ({_pt(row, '')} pt), LogReg {row['logreg_accuracy']:.4f} "
                 f"({_pt(row, 'logreg_')} pt), 5-NN {_pt(row, 'knn_')} pt, Fréchet {row['frechet']:.1f} vs "
                 f"{baseline['frechet']:.1f}")
    return text + f", PSNR {_psnr(row)} dB, SSIM {row['ssim']:.3f} to the large model's sample"


def _paired(row: dict, other: dict, quality: str) -> str:
    """Speed and paired differences (points, SE) of row against another row than the large model alone."""
    text = (f"{other['seconds'] / row['seconds']:.2f}x faster in time, " if row.get("seconds") and other.get("seconds")
            else "") + (f"{other['macs'] / row['macs']:.2f}x fewer MACs" if row.get("macs") and other.get("macs")
                        else "")
    if quality == "digits":
        for judge in PAIRED:
            per = JUDGES[judge][2]
            delta, se = paired_stats(row[per], other[per])
            text += f", {JUDGES[judge][3].replace(' agreement', '')} {100 * delta:+.2f} ({100 * se:.2f}) pt"
        text += f", Fréchet {row['frechet']:.1f} vs {other['frechet']:.1f}"
    return text


def summary(rows: Sequence[dict], pick: dict | None, rule: str, base_name: str = "base",
            quality: str = "digits", fastest_any: dict | None = None) -> str:
    """A few lines on the report set: the baseline, the pick and how it compares, and the base config's own
    point."""
    baseline = rows[0]
    text = [f"large alone ({baseline['label']}): {baseline['n']} samples"
            + (f", {baseline['macs'] / 1e6:.1f} M MACs per image" if baseline.get("macs") else "")
            + (f", {baseline['seconds']:.2f} s" if baseline.get("seconds") is not None else "")
            + (f", SVC agreement {baseline['accuracy']:.4f}, LogReg {baseline['logreg_accuracy']:.4f}"
               if quality == "digits" else "")]
    if pick is None:
        text.append(f"pick ({rule}): none")
    else:
        text.append(f"pick ({rule}): {pick['label']} ({pick['key']}), on the report set: "
                    + _versus(pick, baseline, quality))
        same = same_steps_row(rows, pick)
        if same is not None and same is not baseline:  # the large model alone at the pick's own sampler and steps
            text.append(f"pick against {same['label']} ({same['key']}), paired: " + _paired(pick, same, quality))
    if fastest_any is not None and fastest_any is not pick:
        text.append(f"the fastest point of ANY kind within the same tolerance (selection set): {fastest_any['label']} "
                    f"({fastest_any['key']}), on the report set: " + _versus(fastest_any, baseline, quality))
    for own in rows:
        if own.get("base_point") and own["technique"] != "baseline":
            text.append(f"{base_name}: {own['label']} ({own['key']}): " + _versus(own, baseline, quality))
    return "\n".join(text)
