"""Pareto frontiers of quality against cost, and the frontier figure.

A point is on the frontier when no other point costs no more and is at least as good, one of
the two strictly. Curves: one per technique alone (T-Stitch, T-GATE), one for the combination and
one for the large model alone at fewer steps or with another sampler, each drawn through its own
frontier and starting at the large model alone. T-Stitch at fewer steps is on the T-Stitch curve.
A second figure (plot_steps_samplers) is T-Stitch's own: quality against steps, one panel per
sampler, one line per T-Stitch fraction (0: the large model alone).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# quality measures of each kind of sweep: (row key, axis label, higher is better)
QUALITIES = {
    "digits": (("accuracy", "SVC agreement", True), ("logreg_accuracy", "LogReg agreement", True),
               ("frechet", "Fréchet distance (64 pixels)", False), ("ssim", "SSIM to large alone, same seed", True)),
    "images": (("ssim", "SSIM to large alone, same seed", True), ("fid", "FID", False)),
}
# cost axes: (row key, axis label, scale)
COSTS = (("macs", "denoiser MACs per image (M)", 1e-6), ("seconds", "sampling time (s)", 1.0))
CURVES = (("tstitch", "T-Stitch alone", "tab:blue"), ("tgate", "T-GATE alone", "tab:orange"),
          ("combined", "T-Stitch + T-GATE", "tab:green"),
          ("steps", "large alone, fewer steps / other sampler", "tab:gray"),
          ("caches", "diffusers cache (+ T-Stitch)", "tab:purple"))


def pareto_front(rows: Sequence[dict], cost: str, quality: str, higher_is_better: bool = True) -> list[dict]:
    """The non-dominated rows, cheapest first (each one better than every cheaper one)."""
    sign = 1.0 if higher_is_better else -1.0
    ordered = sorted((r for r in rows if r.get(cost) is not None), key=lambda r: (r[cost], -sign * r[quality]))
    front, best = [], None
    for row in ordered:
        q = sign * row[quality]
        if best is None or q > best:
            front.append(row)
            best = q
    return front


def technique_curves(rows: Sequence[dict]) -> dict[str, list[dict]]:
    """technique -> its points and the large model alone (every curve starts there)."""
    baseline = [r for r in rows if r["technique"] == "baseline"]
    return {name: baseline + [r for r in rows if r["technique"] == name] for name, _, _ in CURVES}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _limits(values: Sequence[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = 0.08 * (hi - lo) or 0.01 * max(abs(hi), 1.0)
    return lo - pad, hi + pad


def plot_frontier(rows: Sequence[dict], out: Path, *, title: str = "", pick: dict | None = None,
                  tolerance: float | None = None, quality: str = "digits") -> Path:
    """Quality (agreement, Fréchet) against MACs and against time (when timed): every point faint,
    each curve's frontier drawn and labelled, the large model alone as a black star, `pick` ringed.
    The quality axis spans the frontiers; points far outside it (e.g. a broken setting) sit on its
    edge as triangles, with their labels."""
    plt = _pyplot()
    costs = [c for c in COSTS if all(r.get(c[0]) is not None for r in rows)]
    qualities = [q for q in QUALITIES[quality] if all(r.get(q[0]) is not None for r in rows)]
    fig, axes = plt.subplots(len(qualities), len(costs), figsize=(7.5 * len(costs), 5.2 * len(qualities)),
                             squeeze=False)
    baseline = next(r for r in rows if r["technique"] == "baseline")
    curves = technique_curves(rows)
    for i, (quality, q_label, higher) in enumerate(qualities):
        for j, (cost, c_label, scale) in enumerate(costs):
            ax = axes[i][j]
            fronts = {name: pareto_front(points, cost, quality, higher) for name, points in curves.items()}
            shown = [r[quality] for front in fronts.values() for r in front] + [baseline[quality]]
            if pick is not None:
                shown.append(pick[quality])
            lo, hi = _limits(shown)
            for name, label, color in CURVES:
                own = [r for r in curves[name] if r["technique"] == name]
                if not own:
                    continue
                inside = [r for r in own if lo <= r[quality] <= hi]
                ax.scatter([r[cost] * scale for r in inside], [r[quality] for r in inside], s=14, color=color,
                           alpha=0.35)
                for r in own:
                    if not lo <= r[quality] <= hi:  # off the axis: on its edge, pointing the way it lies
                        edge = lo if r[quality] < lo else hi
                        ax.scatter([r[cost] * scale], [edge], marker="v" if edge == lo else "^", s=30, color=color,
                                   alpha=0.6, clip_on=False)
                        ax.annotate(f"{r['short_label']}: {r[quality]:.3g}", (r[cost] * scale, edge), fontsize=6.5,
                                    color=color, xytext=(4, 4 if edge == lo else -10), textcoords="offset points")
                front = fronts[name]
                ax.plot([r[cost] * scale for r in front], [r[quality] for r in front], "o-", color=color,
                        label=label, ms=5, lw=1.5)
                for r in front:
                    if r is not baseline:
                        ax.annotate(r["short_label"], (r[cost] * scale, r[quality]), fontsize=6.5, color=color,
                                    xytext=(3, 3), textcoords="offset points")
            ax.scatter([baseline[cost] * scale], [baseline[quality]], marker="*", s=140, color="black",
                       zorder=5, label="large alone")
            if pick is not None:
                ax.scatter([pick[cost] * scale], [pick[quality]], s=160, facecolors="none", edgecolors="red",
                           lw=1.5, zorder=6, label=f"pick: {pick['short_label']}")
            if quality in ("accuracy", "logreg_accuracy") and tolerance is not None:
                ax.axhline(baseline[quality] - tolerance, color="grey", ls=":", lw=1,
                           label=f"large alone - {tolerance:g}")
            ax.set_ylim(lo, hi)
            ax.set_xlabel(c_label)
            floor = (f"; real digits, same N: {baseline['frechet_real_floor']:.1f}"
                     if quality == "frechet" and "frechet_real_floor" in baseline else "")
            ax.set_ylabel(q_label + (" (higher is better)" if higher else f" (lower is better{floor})"))
            ax.set_xlim(left=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
    return _save(fig, plt, out, title)


def _save(fig, plt, out: Path, title: str) -> Path:
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp" + out.suffix)
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out


def steps_figure_rows(rows: Sequence[dict]) -> list[dict]:
    """The rows of T-Stitch's steps x samplers figure: the large model alone and T-Stitch, no T-GATE, no cache
    (a cache point shares its sampler, steps and fraction with a plain one; it would break the line)."""
    return [r for r in rows if r.get("gate") is None and not r.get("cache")]


def plot_steps_samplers(rows: Sequence[dict], out: Path, *, quality: str = "digits", title: str = "") -> Path:
    """T-Stitch's steps x samplers figure: quality against the number of steps, one column per sampler, one
    line per T-Stitch fraction (0 = the large model alone); points without T-GATE or a cache only."""
    plt = _pyplot()
    plain = steps_figure_rows(rows)
    samplers = list(dict.fromkeys(r["sampler"] for r in plain))
    fractions = sorted({r["fraction"] for r in plain})
    qualities = [q for q in QUALITIES[quality][:3] if all(r.get(q[0]) is not None for r in plain)]
    fig, axes = plt.subplots(len(qualities), len(samplers), figsize=(5.2 * len(samplers), 4.2 * len(qualities)),
                             squeeze=False)
    colors = plt.get_cmap("viridis")
    for j, sampler in enumerate(samplers):
        for i, (key, label, higher) in enumerate(qualities):
            ax = axes[i][j]
            for k, fraction in enumerate(fractions):
                line = sorted((r for r in plain if r["sampler"] == sampler and r["fraction"] == fraction),
                              key=lambda r: r["steps"])
                if line:
                    ax.plot([r["steps"] for r in line], [r[key] for r in line], "o-", ms=4,
                            color=colors(k / max(len(fractions) - 1, 1)),
                            label="large alone" if fraction == 0 else f"T-Stitch {fraction:g}")
            ax.set_xlabel(f"{sampler} steps")
            ax.set_ylabel(label + (" (higher is better)" if higher else " (lower is better)"))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return _save(fig, plt, out, title)
