"""The papers' figures from sweep folders (Hydra multirun folders of scripts/sample.py).

T-Stitch (Figure 1: quality and time against the small-model fraction):

    python scripts/sample.py -m +exp=digits_stitch_0.4 accel.tstitch.ratio=0.0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0
    python scripts/figures.py multirun/sample/<time> [more multirun folders of the same sweep ...]

T-GATE (its tables: MACs, latency and FID of the baseline and the gated settings):

    python scripts/sample.py -m +exp=dit_xl2 accel=tgate sampler=dpmpp_2m sampler.steps=25 \\
        accel.tgate.gate_step=25,10,15
    python scripts/figures.py --kind tgate multirun/sample/<time> --table tgate.md

Each job's settings come from .hydra/config.yaml, its time and MACs from metrics.json and its
quality from metrics.json's `fid` (scripts/evaluate.py --reference, or evaluate.reference=... in
the sampling job); runs without FID use the digits measure (eval.json, computed with
scripts/evaluate.py's measure if missing). With several folders of the same sweep (repeats), the
time of a setting is the fastest repeat (the least disturbed by other processes); quality is
deterministic and is read from the first folder. Writes the figure (--out; default
<first folder>/tstitch_digits.png or tgate.png) and prints a Markdown table (also --table).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from diffusion.errors import UserError
from runs.script import ArgumentParser, run_script


def _jobs(folder: Path) -> list[Path]:
    return sorted((p.parent for p in folder.glob("*/metrics.json")), key=lambda p: (len(p.name), p.name))


def _quality(job: Path, metrics: dict) -> dict:
    """FID etc. when the run was evaluated against a reference; else the digits measure."""
    if "fid" in metrics:
        return {k: metrics[k] for k in ("fid", "inception_score", "precision", "recall") if k in metrics}
    if (job / "eval.json").is_file():
        return json.loads((job / "eval.json").read_text())
    from evaluate import evaluate_run  # scripts/evaluate.py, next to this file

    return evaluate_run(job)


def _seconds(metrics: dict) -> float:
    return metrics["sampling_seconds"]


def load_jobs(folder: Path) -> dict[float, dict]:
    """T-Stitch sweep: fraction -> {quality..., seconds, steps_per_model, ...}."""
    jobs = {}
    for job in _jobs(folder):
        cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
        ratio = float(cfg.accel.tstitch.ratio)
        # run order (small first); metrics.json's steps_per_model is key-sorted
        models = [str(m.name) for m in (cfg.accel.get("models") or {}).values()] + [str(cfg.model.name)]
        metrics = json.loads((job / "metrics.json").read_text())
        jobs[ratio] = {**_quality(job, metrics), "seconds": _seconds(metrics), "num_images": metrics["num_images"],
                       "steps_per_model": {m: metrics["steps_per_model"][m] for m in models}, "steps": metrics["steps"]}
    return jobs


def combine(folders: list[Path], load=load_jobs) -> dict:
    runs = [load(f) for f in folders]
    rows = runs[0]
    for key, row in rows.items():
        row["seconds"] = min(r[key]["seconds"] for r in runs if key in r)
        row["repeats"] = sum(key in r for r in runs)
    return dict(sorted(rows.items()))


def markdown_table(rows: dict[float, dict]) -> str:
    base = rows.get(0.0, {}).get("seconds")
    fid = all("fid" in r for r in rows.values())
    quality = "FID | IS" if fid else "accuracy | 5-NN acc. | Fréchet (floor)"
    lines = [f"| small fraction | steps S / L | {quality} | sampling s | vs large only |",
             "|---|---|" + "---|" * (2 if fid else 3) + "---|---|"]
    for ratio, r in rows.items():
        steps = " / ".join(str(v) for v in r["steps_per_model"].values())
        speed = f"{base / r['seconds']:.2f}x" if base else "-"
        q = (f"{r['fid']:.2f} | {r['inception_score']:.2f}" if fid else
             f"{r['accuracy']:.3f} | {r['knn_accuracy']:.3f} | {r['frechet']:.1f} ({r['frechet_real_floor']:.1f})")
        lines.append(f"| {ratio:.1f} | {steps} | {q} | {r['seconds']:.2f} | {speed} |")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(rows: dict[float, dict], out: Path) -> None:
    plt = _pyplot()
    r = list(rows)
    fid = all("fid" in rows[k] for k in r)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    if fid:
        axes[0].plot(r, [rows[k]["fid"] for k in r], "o-")
        axes[0].set_ylabel("FID")
        axes[1].plot(r, [rows[k]["inception_score"] for k in r], "o-")
        axes[1].set_ylabel("Inception Score")
    else:
        axes[0].plot(r, [rows[k]["accuracy"] for k in r], "o-", label="SVC (scikit-learn example)")
        axes[0].plot(r, [rows[k]["knn_accuracy"] for k in r], "s--", label="5-NN on real digits")
        axes[0].set_ylabel("classifier agreement")
        axes[0].legend(fontsize=8)
        axes[1].plot(r, [rows[k]["frechet"] for k in r], "o-", label="samples")
        axes[1].plot(r, [rows[k]["frechet_real_floor"] for k in r], ":", color="grey", label="real digits, same N")
        axes[1].set_ylabel("Fréchet distance (64 pixels)")
        axes[1].legend(fontsize=8)
    axes[2].plot(r, [rows[k]["seconds"] for k in r], "o-")
    axes[2].set_ylabel("sampling time (s)")
    axes[2].set_ylim(bottom=0)
    first = rows[r[0]]
    for ax in axes:
        ax.set_xlabel("fraction of steps on the small model")
        ax.grid(alpha=0.3)
    fig.suptitle(f"T-Stitch: {' -> '.join(first['steps_per_model'])}, "
                 f"{first['steps']} steps, {first['num_images']} samples", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


# --- T-GATE: MACs / latency / FID table ---

def tgate_setting(cfg, steps: int) -> tuple[str, bool]:
    """A job's T-GATE setting as a label, and whether it gates at all (gate_step < steps)."""
    tg = (cfg.get("accel") or {}).get("tgate")
    parts = []
    ratio = ((cfg.get("accel") or {}).get("tstitch") or {}).get("ratio")
    if ratio:
        parts.append(f"T-Stitch {float(ratio):.1f}")
    gated = tg is not None and int(tg.gate_step) < steps
    if gated:
        parts.append(f"T-GATE g{tg.gate_step} sp{tg.sp_interval} fi{tg.fi_interval} wu{tg.warm_up}")
    return (" + ".join(parts) or "baseline"), gated


def load_tgate_jobs(folder: Path) -> dict[str, dict]:
    """T-GATE sweep: setting label -> {macs, seconds (per image), quality...}."""
    jobs = {}
    for job in _jobs(folder):
        cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
        metrics = json.loads((job / "metrics.json").read_text())
        label, gated = tgate_setting(cfg, int(metrics["steps"]))
        generated = metrics.get("num_generated", metrics["num_images"])
        jobs[label] = {**_quality(job, metrics), "gated": gated, "macs": metrics["macs_per_image"],
                       "seconds": _seconds(metrics) / max(generated, 1), "steps": metrics["steps"],
                       "model": str(cfg.model.name), "num_images": metrics["num_images"]}
    return jobs


def tgate_table(rows: dict[str, dict]) -> str:
    """Baseline first (the ungated row, else the most MACs), then by MACs, largest first."""
    order = sorted(rows, key=lambda k: (rows[k]["gated"], -rows[k]["macs"]))
    base = rows[order[0]]
    fid = all("fid" in r for r in rows.values())
    quality = "FID" if fid else "Fréchet (digits)"
    lines = [f"| setting | MACs / image | latency s / image | speed-up | MACs saved | {quality} |",
             "|---|---|---|---|---|---|"]
    for k in order:
        r = rows[k]
        quality = r["fid"] if fid else r["frechet"]
        lines.append(f"| {k} | {_macs(r['macs'])} | {r['seconds']:.4f} | {base['seconds'] / r['seconds']:.2f}x | "
                     f"{1 - r['macs'] / base['macs']:.1%} | {quality:.2f} |")
    return "\n".join(lines)


def _macs(m: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if m >= scale:
            return f"{m / scale:.3f}{unit}"
    return f"{m:.0f}"


def plot_tgate(rows: dict[str, dict], out: Path) -> None:
    plt = _pyplot()
    fid = all("fid" in r for r in rows.values())
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for k, r in rows.items():
        ax.scatter(r["macs"] / 1e9, r["fid"] if fid else r["frechet"])
        ax.annotate(k, (r["macs"] / 1e9, r["fid"] if fid else r["frechet"]), fontsize=7)
    ax.set_xlabel("MACs per image (G)")
    ax.set_ylabel("FID" if fid else "Fréchet distance (digits)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="+", type=Path, help="multirun folders of one sweep (repeats allowed)")
    parser.add_argument("--kind", choices=["tstitch", "tgate"], default="tstitch",
                        help="tstitch: quality and time against the fraction; tgate: MACs / latency / FID table")
    parser.add_argument("--out", type=Path,
                        help="figure path (default: <first folder>/tstitch_digits.png or tgate.png)")
    parser.add_argument("--table", type=Path, help="also write the Markdown table here")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    missing = [str(f) for f in args.sweeps if not _jobs(f)]
    if missing:
        print(UserError(f"sweeps={' '.join(missing)}: no jobs (*/metrics.json) there; give the multirun folders "
                        "of one sweep").line(), file=sys.stderr)
        return 2
    if args.kind == "tstitch":
        rows = combine(args.sweeps)
        out = args.out or args.sweeps[0] / "tstitch_digits.png"
        plot(rows, out)
        table = markdown_table(rows)
    else:
        rows = combine(args.sweeps, load_tgate_jobs)
        out = args.out or args.sweeps[0] / "tgate.png"
        plot_tgate(rows, out)
        table = tgate_table(rows)
    if args.table:
        args.table.write_text(table + "\n")
    print(table)
    print(f"figure: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
