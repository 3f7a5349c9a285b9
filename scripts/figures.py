"""T-Stitch's Figure 1 in miniature: quality and sampling time against the small-model fraction.

    python scripts/sample.py -m +exp=digits_stitch_0.4 accel.tstitch.ratio=0.0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0
    python scripts/figures.py multirun/sample/<time> [more multirun folders of the same sweep ...]

Reads each job's fraction (.hydra/config.yaml), sampling time (metrics.json) and quality
(eval.json, computed with scripts/evaluate.py's measure if missing). With several folders of
the same sweep (repeats), the time of a fraction is the fastest repeat (the least disturbed by
other processes); quality is deterministic and is read from the first folder. Writes
<first folder>/tstitch_digits.png (or --out) and prints a Markdown table (also --table).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf


def load_jobs(folder: Path) -> dict[float, dict]:
    """fraction -> {accuracy, knn_accuracy, frechet, frechet_real_floor, seconds, steps_per_model, ...}."""
    from evaluate import evaluate_run  # scripts/evaluate.py, next to this file

    jobs = {}
    for job in sorted(p.parent for p in folder.glob("*/metrics.json")):
        cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
        ratio = float(cfg.accel.tstitch.ratio)
        # run order (small first); metrics.json's steps_per_model is key-sorted
        models = [str(m.name) for m in (cfg.accel.get("models") or {}).values()] + [str(cfg.model.name)]
        metrics = json.loads((job / "metrics.json").read_text())
        quality = json.loads((job / "eval.json").read_text()) if (job / "eval.json").is_file() else evaluate_run(job)
        jobs[ratio] = {**quality, "seconds": metrics["sampling_seconds"], "num_images": metrics["num_images"],
                       "steps_per_model": {m: metrics["steps_per_model"][m] for m in models}, "steps": metrics["steps"]}
    return jobs


def combine(folders: list[Path]) -> dict[float, dict]:
    runs = [load_jobs(f) for f in folders]
    rows = runs[0]
    for ratio, row in rows.items():
        row["seconds"] = min(r[ratio]["seconds"] for r in runs if ratio in r)
        row["repeats"] = sum(ratio in r for r in runs)
    return dict(sorted(rows.items()))


def markdown_table(rows: dict[float, dict]) -> str:
    base = rows.get(0.0, {}).get("seconds")
    lines = ["| small fraction | steps S / L | accuracy | 5-NN acc. | Fréchet (floor) | sampling s | vs large only |",
             "|---|---|---|---|---|---|---|"]
    for ratio, r in rows.items():
        steps = " / ".join(str(v) for v in r["steps_per_model"].values())
        speed = f"{base / r['seconds']:.2f}x" if base else "-"
        lines.append(f"| {ratio:.1f} | {steps} | {r['accuracy']:.3f} | {r['knn_accuracy']:.3f} | "
                     f"{r['frechet']:.1f} ({r['frechet_real_floor']:.1f}) | {r['seconds']:.2f} | {speed} |")
    return "\n".join(lines)


def plot(rows: dict[float, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
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
    fig.suptitle(f"T-Stitch on digits: {' -> '.join(first['steps_per_model'])}, "
                 f"{first['steps']} DDIM steps, {first['num_images']} samples", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="+", type=Path, help="multirun folders of the fraction sweep (repeats allowed)")
    parser.add_argument("--out", type=Path, help="figure path (default: <first folder>/tstitch_digits.png)")
    parser.add_argument("--table", type=Path, help="also write the Markdown table here")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    rows = combine(args.sweeps)
    if not rows:
        print(f"no jobs (*/metrics.json) in {args.sweeps[0]}", file=sys.stderr)
        return 2
    out = args.out or args.sweeps[0] / "tstitch_digits.png"
    plot(rows, out)
    table = markdown_table(rows)
    if args.table:
        args.table.write_text(table + "\n")
    print(table)
    print(f"figure: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
