"""Digits quality of sampling runs: python scripts/evaluate.py RUN_OR_MULTIRUN_FOLDER [...]

For each run folder (one holding samples.npz; a multirun folder is searched one level down)
writes eval.json: classifier agreement (`accuracy`), a 5-NN check (`knn_accuracy`), the
Fréchet distance in the 64-pixel feature space (`frechet`) and its floor for as many real
digits (`frechet_real_floor`); see evaluation/digits.py for exactly what each is.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from diffusion.outputs import save_json
from evaluation.digits import evaluate_digits


def run_folders(paths: list[str]) -> list[Path]:
    found = []
    for p in map(Path, paths):
        if (p / "samples.npz").is_file():
            found.append(p)
        elif p.is_dir():
            found += sorted((q.parent for q in p.glob("*/samples.npz")), key=lambda q: (len(q.name), q.name))
    return found


def evaluate_run(folder: Path) -> dict:
    with np.load(folder / "samples.npz") as npz:
        result = evaluate_digits(npz["arr_0"], npz["arr_1"])
    save_json(result, folder / "eval.json")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders (with samples.npz) or multirun folders")
    args = parser.parse_args(argv)
    folders = run_folders(args.runs)
    if not folders:
        print(f"no samples.npz in {args.runs} (nor one level down)", file=sys.stderr)
        return 2
    print(f"{'run':<40} {'N':>5} {'accuracy':>9} {'5-NN':>6} {'Frechet':>8} {'floor':>6}")
    for folder in folders:
        r = evaluate_run(folder)
        print(f"{str(folder)[-40:]:<40} {r['num_images']:>5} {r['accuracy']:>9.3f} {r['knn_accuracy']:>6.3f} "
              f"{r['frechet']:>8.1f} {r['frechet_real_floor']:>6.1f}")
        print(json.dumps({"run": str(folder), **{k: v for k, v in r.items() if k != "per_class_accuracy"}}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
