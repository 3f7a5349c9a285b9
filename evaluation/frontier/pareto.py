"""Pareto frontiers of quality against cost, and the frontier figure.

A point is on the frontier when no other point costs no more and is at least as good, one of
the two strictly. Curves: one per technique alone (T-Stitch, T-GATE) and one for the
combination, each drawn through its own frontier and starting at the large model alone.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# quality measures: (row key, axis label, higher is better)
QUALITIES = (("accuracy", "classifier agreement", True), ("frechet", "Fréchet distance (64 pixels)", False))
# cost axes: (row key, axis label, scale)
COSTS = (("macs", "denoiser MACs per image (M)", 1e-6), ("seconds", "sampling time (s)", 1.0))
CURVES = (("tstitch", "T-Stitch alone", "tab:blue"), ("tgate", "T-GATE alone", "tab:orange"),
          ("combined", "T-Stitch + T-GATE", "tab:green"))


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


def plot_frontier(rows: Sequence[dict], out: Path, *, title: str = "", pick: dict | None = None,
                  tolerance: float | None = None) -> Path:
    """Quality (agreement, Fréchet) against MACs and against time (when timed): every point faint,
    each curve's frontier drawn and labelled, the large model alone as a black star, `pick` ringed."""
    plt = _pyplot()
    costs = [c for c in COSTS if all(r.get(c[0]) is not None for r in rows)]
    fig, axes = plt.subplots(len(QUALITIES), len(costs), figsize=(6.2 * len(costs), 4.4 * len(QUALITIES)),
                             squeeze=False)
    baseline = next(r for r in rows if r["technique"] == "baseline")
    for i, (quality, q_label, higher) in enumerate(QUALITIES):
        for j, (cost, c_label, scale) in enumerate(costs):
            ax = axes[i][j]
            for (name, label, color), points in zip(CURVES, technique_curves(rows).values()):
                own = [r for r in points if r["technique"] == name]
                if not own:
                    continue
                ax.scatter([r[cost] * scale for r in own], [r[quality] for r in own], s=14, color=color, alpha=0.35)
                front = pareto_front(points, cost, quality, higher)
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
            if quality == "accuracy" and tolerance is not None:
                ax.axhline(baseline["accuracy"] - tolerance, color="grey", ls=":", lw=1,
                           label=f"large alone - {tolerance:g}")
            if quality == "frechet" and "frechet_real_floor" in baseline:
                ax.axhline(baseline["frechet_real_floor"], color="grey", ls="--", lw=1, label="real digits, same N")
            ax.set_xlabel(c_label)
            ax.set_ylabel(q_label + (" (higher is better)" if higher else " (lower is better)"))
            ax.set_xlim(left=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right" if higher else "upper right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp" + out.suffix)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out
