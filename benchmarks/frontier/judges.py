"""The judges of a sweep point: what each number is, which way is better, and how a row gets them.

quality `digits` (the digits pair): three classifiers fitted on the real digits alone (the SVC,
logistic regression, 5-NN; evaluation/digits.py), the pixel Fréchet distance with its floor, and
fidelity (PSNR, SSIM; evaluation/fidelity.py) to the large model alone's sample of the same seed.
quality `images` (any model): fidelity, and FID / IS / CLIP score when the run's metrics.json has them
(a sampling run with `evaluate.reference=...` adds FID and IS).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from diffusion.errors import UserError

# judge -> (row key, higher is better, per-sample key for paired errors or None, name in tables)
JUDGES = {
    "svc": ("accuracy", True, "correct_svc", "SVC agreement"),
    "logreg": ("logreg_accuracy", True, "correct_logreg", "LogReg agreement"),
    "knn": ("knn_accuracy", True, "correct_knn", "5-NN agreement"),
    "ssim": ("ssim", True, "ssim_per_sample", "SSIM to large alone"),
    "fid": ("fid", False, None, "FID"),
    "clip_score": ("clip_score", True, None, "CLIP score"),
}
QUALITIES = ("digits", "images")
PAIRED = ("svc", "logreg", "knn")  # the digits judges with paired differences to the large model alone


def check_pick_judges(judges: Sequence[str], quality: str) -> list[str]:
    judges = list(judges or [])
    allowed = list(PAIRED) + ["ssim"] if quality == "digits" else ["ssim", "fid", "clip_score"]
    bad = [j for j in judges if j not in allowed]
    if not judges or bad:
        raise UserError(f"pick.judges={judges!r}: for quality={quality} each must be one of {allowed} (psnr is "
                        "inf for the large model against itself, so it cannot be a tolerance)")
    return judges


def paired_stats(values: Sequence[float], baseline: Sequence[float]) -> tuple[float, float]:
    """Mean of per-sample differences and its standard error (paired: the same seeds and labels)."""
    v, b = np.asarray(values, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if len(v) != len(b) or len(v) < 2:
        raise UserError(f"paired comparison needs the same samples (>= 2) in both: {len(v)} vs {len(b)}")
    diff = v - b
    return float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(len(v)))


def within(row: dict, baseline: dict, judges: Sequence[str], tolerance: float, se_margin: float = 0.0) -> bool:
    """Whether every judge puts the row within `tolerance` of the large model alone (SSIM: of 1). With
    `se_margin` k, a classifier's paired difference must clear the tolerance by k of its paired standard errors
    (row["<judge>_delta_se"]): the fastest of many points that pass is the one noise flattered most, and a
    margin keeps a point at the edge from being picked on luck. Judges without paired errors ignore it."""
    for judge in judges:
        key, higher, _, _ = JUDGES[judge]
        value, ref = row.get(key), baseline.get(key)
        if value is None or ref is None or (isinstance(value, float) and math.isnan(value)):
            return False
        margin = se_margin * (row.get(("" if judge == "svc" else f"{judge}_") + "delta_se") or 0.0) \
            if judge in PAIRED else 0.0
        if higher and value - margin < ref - tolerance - 1e-12 or not higher and value > ref + tolerance + 1e-12:
            return False
    return True
