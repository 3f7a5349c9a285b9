"""FID, IS and precision/recall of a run folder's samples.npz, merged into its metrics.json.

Used by scripts/evaluate.py (--reference) and at the end of a sampling job
(`evaluate.reference=...` in configs/sample.yaml).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from diffusion.errors import UserError
from diffusion.outputs import save_json
from evaluation.fid import check_reference, evaluate_images, load_reference
from evaluation.inception import DIMS_TO_BLOCK, InceptionFeatures, check_inception_weights

log = logging.getLogger(__name__)


def _device(name: str | None) -> str:
    import torch

    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def check_evaluate_settings(settings, prefix: str = "evaluate.") -> None:
    """Every evaluation setting, before a sampling run starts (so that a bad one does not surface
    after hours of sampling): the reference, the Inception weights (fetched now if they are not
    cached), dims, batch_size, nearest_k, reference_stats. Raises UserError `evaluate.key=value: ...`."""
    get = settings.get if hasattr(settings, "get") else lambda k, d=None: getattr(settings, k, d)
    check_reference(get("reference"), prefix + "reference")
    dims = get("dims", 2048)
    if dims not in DIMS_TO_BLOCK:
        raise UserError.setting(prefix + "dims", dims,
                                f"allowed are {sorted(DIMS_TO_BLOCK)} (pytorch-fid's feature sizes)")
    for key in ("batch_size", "nearest_k"):
        value = get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError.setting(prefix + key, value, "must be an integer >= 1")
    if get("reference_stats", "auto") not in ("auto", "images"):
        raise UserError.setting(prefix + "reference_stats", get("reference_stats"),
                                "allowed are auto (the .npz's own mu/sigma when present) and images")
    check_inception_weights(get("inception_weights"), prefix + "inception_weights")


def evaluate_into_run(run_dir: str | Path, settings, device: str | None = "auto",
                      net: InceptionFeatures | None = None) -> dict:
    """settings: reference, inception_weights, dims, batch_size, nearest_k (configs/sample.yaml's
    `evaluate`). Returns the run's metrics.json with the results added (keys fid, inception_score,
    precision, recall, ...)."""
    run_dir = Path(run_dir)
    get = settings.get if hasattr(settings, "get") else lambda k, d=None: getattr(settings, k, d)
    reference = load_reference(get("reference"))  # a bad path fails before the network is built
    net = net or InceptionFeatures(get("inception_weights"), int(get("dims", 2048) or 2048))
    with np.load(run_dir / "samples.npz") as npz:
        samples = npz["arr_0"]
    result = evaluate_images(samples, reference, net, batch_size=int(get("batch_size", 50) or 50),
                             nearest_k=int(get("nearest_k", 3) or 3),
                             reference_stats=get("reference_stats", "auto") or "auto", device=_device(device))
    result["reference"] = reference.source
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    metrics.update(result)
    save_json(metrics, metrics_path)
    log.info("FID %.3f, IS %.3f, precision %s, recall %s (%d samples vs %s)", result["fid"], result["inception_score"],
             result.get("precision"), result.get("recall"), result["num_samples"], reference.source)
    return metrics
