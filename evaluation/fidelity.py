"""Fidelity to a reference run: PSNR and SSIM of each sample against the reference's sample of the same seed.

Cache papers report these beside distribution metrics: they need no reference data set, only the
unaccelerated model's output for the same noise (and label or prompt), so they work for any model.
Both come from scikit-image (`skimage.metrics`), not from our own formulas:

* PSNR: `peak_signal_noise_ratio(reference, sample, data_range=255)` on the uint8 images (dB; `inf`
  for identical images, i.e. a run compared with itself).
* SSIM: `structural_similarity(..., win_size=7, data_range=255, channel_axis=-1)`: a uniform 7x7 window
  (scikit-image's default and the largest odd window that fits an 8x8 digit), over the colour channels
  of RGB images (grey written as RGB has equal channels, so it equals the grey SSIM).

Per-sample values are returned, so two points compare sample by sample (paired standard errors).
"""
from __future__ import annotations

import numpy as np

from diffusion.errors import UserError

SSIM_WINDOW = 7  # odd, <= the smallest image side (8 for the digits)


def _as_hwc(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:  # (N, H, W) grey
        images = images[..., None]
    if images.ndim != 4 or images.dtype != np.uint8:
        raise UserError(f"fidelity: expected uint8 images (N, H, W[, C]), got {images.dtype} {images.shape}")
    return images


def fidelity_per_sample(images: np.ndarray, reference: np.ndarray) -> dict[str, np.ndarray]:
    """{"psnr": (N,) dB, "ssim": (N,)} of images[k] against reference[k] (the same seed and label)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    x, ref = _as_hwc(images), _as_hwc(reference)
    if x.shape != ref.shape:
        raise UserError(f"fidelity: {x.shape} images against {ref.shape} reference images (not paired)")
    if min(x.shape[1:3]) < SSIM_WINDOW:
        raise UserError(f"fidelity: images of {x.shape[1]}x{x.shape[2]} are smaller than SSIM's {SSIM_WINDOW}x"
                        f"{SSIM_WINDOW} window")
    psnr = np.empty(len(x))
    ssim = np.empty(len(x))
    with np.errstate(divide="ignore"):  # identical images: PSNR inf, on purpose
        for k in range(len(x)):
            psnr[k] = peak_signal_noise_ratio(ref[k], x[k], data_range=255)
            ssim[k] = structural_similarity(ref[k], x[k], win_size=SSIM_WINDOW, data_range=255, channel_axis=-1)
    return {"psnr": psnr, "ssim": ssim}


def fidelity(images: np.ndarray, reference: np.ndarray) -> dict:
    """Mean PSNR (dB; inf when every sample equals its reference) and mean SSIM against the reference run."""
    per = fidelity_per_sample(images, reference)
    return {"psnr": float(per["psnr"].mean()), "ssim": float(per["ssim"].mean())}
