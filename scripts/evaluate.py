"""Quality of sampling runs: python scripts/evaluate.py RUN_OR_MULTIRUN_FOLDER [...] [--reference REF]

For each run folder (one holding samples.npz; a multirun folder is searched one level down):

* without --reference: the digits measure into eval.json: classifier agreement (`accuracy`),
  a 5-NN check (`knn_accuracy`), the Fréchet distance in the 64-pixel feature space
  (`frechet`) and its floor for as many real digits (`frechet_real_floor`); see
  evaluation/digits.py for exactly what each is.
* with --reference (an .npz in ADM's layout, e.g. VIRTUAL_imagenet256_labeled.npz, or an image
  folder): FID, Inception Score and precision/recall with pytorch-fid's Inception network,
  added to the run's metrics.json (evaluation/fid.py), and to its W&B run when the run was
  logged with logger=wandb (or with --wandb).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from diffusion.errors import UserError
from diffusion.outputs import save_json
from evaluation.digits import evaluate_digits
from runs.script import ArgumentParser, run_script


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


def _digits(folders: list[Path]) -> None:
    print(f"{'run':<40} {'N':>5} {'accuracy':>9} {'5-NN':>6} {'Frechet':>8} {'floor':>6}")
    for folder in folders:
        r = evaluate_run(folder)
        print(f"{str(folder)[-40:]:<40} {r['num_images']:>5} {r['accuracy']:>9.3f} {r['knn_accuracy']:>6.3f} "
              f"{r['frechet']:>8.1f} {r['frechet_real_floor']:>6.1f}")
        summary = {k: v for k, v in r.items() if k != "per_class_accuracy"}
        print(json.dumps({"run": str(folder), **summary}), file=sys.stderr)


def _run_config(folder: Path, force_wandb: bool):
    """The run's own composed config (for its W&B settings), logger=wandb forced with --wandb."""
    from omegaconf import OmegaConf

    path = folder / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(path) if path.is_file() else OmegaConf.create({})
    if force_wandb and (cfg.get("logger") is None or cfg.logger.get("name") != "wandb"):
        cfg.logger = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "logger" / "wandb.yaml")
    return cfg


def _fid(folders: list[Path], args) -> None:
    from evaluation.fid import check_reference
    from evaluation.inception import InceptionFeatures
    from evaluation.run_eval import evaluate_into_run
    from runs.logging_wandb import run_logger

    settings = {"reference": args.reference, "inception_weights": args.inception_weights, "dims": args.dims,
                "batch_size": args.batch_size, "nearest_k": args.nearest_k, "reference_stats": args.reference_stats}
    check_reference(args.reference, "--reference")  # before the network is built (or fetched)
    net = InceptionFeatures(args.inception_weights, args.dims)  # built once for all folders
    print(f"{'run':<40} {'N':>6} {'FID':>9} {'IS':>8} {'precision':>9} {'recall':>7}")
    for folder in folders:
        with run_logger(_run_config(folder, args.wandb), folder, job_type="evaluate") as logger:
            m = evaluate_into_run(folder, settings, device=args.device, net=net)
            keys = ("fid", "inception_score", "inception_score_std", "precision", "recall")
            logger.log_metrics({k: m[k] for k in keys if k in m}, prefix="eval/")
        pr = (f"{m['precision']:>9.4f} {m['recall']:>7.4f}" if "precision" in m else f"{'-':>9} {'-':>7}")
        print(f"{str(folder)[-40:]:<40} {m['num_samples']:>6} {m['fid']:>9.3f} {m['inception_score']:>8.3f} {pr}")


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders (with samples.npz) or multirun folders")
    parser.add_argument("--reference",
                        help="FID reference: .npz (arr_0 uint8 NHWC and/or mu, sigma) or an image folder")
    parser.add_argument("--inception-weights", help="pt_inception-2015-12-05-6726825d.pth (default: torch hub's "
                        "cache, $TORCH_HOME/hub/checkpoints/; 'random' = random weights, for smoke tests only)")
    parser.add_argument("--dims", type=int, default=2048, choices=[64, 192, 768, 2048],
                        help="Inception features for FID")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--nearest-k", type=int, default=3, help="precision/recall neighbourhood size")
    parser.add_argument("--reference-stats", default="auto", choices=["auto", "images"],
                        help="auto: the reference .npz's own mu/sigma when present (as ADM's evaluator); "
                             "images: recompute")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--wandb", action="store_true", help="log to the run's W&B run even if it ran with logger=none")
    args = parser.parse_args(argv)
    folders = run_folders(args.runs)
    if not folders:
        print(UserError(f"runs={' '.join(args.runs)}: no samples.npz in these folders (nor one level down); "
                        "give run folders of scripts/sample.py or their multirun folders").line(), file=sys.stderr)
        return 2
    if args.reference:
        _fid(folders, args)
    else:
        _digits(folders)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
