"""FID, Inception Score and precision/recall of generated images against reference images.

* FID (Heusel et al. 2017): the Fréchet distance (evaluation/frechet.py, the one place of that
  maths) between Gaussians fitted to Inception features of the samples and of the reference.
* Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))) over the network's
  1008-way softmax, averaged over `splits` equal parts (10, as the original and ADM's evaluator).
* Precision and recall (Kynkäänniemi et al. 2019, "Improved precision and recall"): each set's
  manifold is the union of balls around its feature vectors, radius = distance to the k-th
  nearest other vector of the same set (k = 3). Precision: share of samples inside the
  reference manifold; recall: share of reference vectors inside the samples' manifold. On the
  2048-d Inception pool features, as ADM's evaluator computes them (the paper used VGG-16).

References: an `.npz` with `arr_0` (uint8 NHWC images: ADM's reference batches such as
`VIRTUAL_imagenet256_labeled.npz`, or a run's own `samples.npz`) and/or precomputed `mu`,
`sigma` (ADM's reference batches and pytorch-fid's statistics files carry them); or a folder of
images (png, jpg, ...). With `reference_stats="auto"` a file's own `mu`/`sigma` are used for FID
when present, as ADM's evaluator does (ADM computed them with the TensorFlow Inception graph,
which pytorch-fid's port reproduces closely but not bit for bit: `"images"` recomputes them
from `arr_0` with this network instead).
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from diffusion.errors import MissingFileError, UserError
from evaluation.frechet import frechet_distance_to_features, gaussian_stats
from evaluation.inception import InceptionFeatures

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class Reference:
    images: np.ndarray | list | None  # (N, H, W, 3) uint8, or a list of such arrays of mixed sizes
    mu: np.ndarray | None = None  # precomputed FID statistics, when the file has them
    sigma: np.ndarray | None = None
    source: str = ""


def load_reference(path: str | Path) -> Reference:
    """An ADM/pytorch-fid .npz or a folder of images (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"reference folder {path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return Reference([np.asarray(Image.open(p).convert("RGB")) for p in files], source=str(path))
    if path.suffix != ".npz" or not path.is_file():
        raise MissingFileError(f"reference {path}: expected an existing .npz (arr_0 uint8 NHWC and/or mu, sigma) "
                                "or a folder of images")
    with np.load(path) as npz:
        keys = set(npz.files)
        if "arr_0" not in keys and not {"mu", "sigma"} <= keys:
            raise UserError(f"reference {path} has keys {sorted(keys)}: need arr_0 (uint8 NHWC images) "
                             "and/or mu and sigma (FID statistics)")
        images = npz["arr_0"] if "arr_0" in keys else None
        mu, sigma = (npz["mu"], npz["sigma"]) if {"mu", "sigma"} <= keys else (None, None)
    if images is not None:
        check_images(images, f"reference {path} arr_0")
    return Reference(images, mu, sigma, str(path))


def check_reference(path, key: str = "reference") -> None:
    """What load_reference needs, checked without reading the images (before a run samples):
    an existing folder with images, or an .npz whose arr_0 header says uint8 (N, H, W, 3) and/or
    with mu and sigma. Raises UserError `key=path: ...`."""
    from diffusion.errors import UserError
    from diffusion.outputs import npz_array_header

    allowed = "give an .npz (arr_0: uint8 images N x H x W x 3, and/or mu and sigma) or a folder of images"
    p = Path(str(path)).expanduser()
    if p.is_dir():
        first = next((q for q in sorted(p.iterdir()) if q.suffix.lower() in IMAGE_SUFFIXES), None)
        if first is None:
            raise UserError.setting(key, path,
                                    f"a folder without images ({', '.join(sorted(IMAGE_SUFFIXES))}); {allowed}")
        try:
            with Image.open(first) as image:
                image.load()
        except (OSError, SyntaxError, ValueError) as err:
            raise UserError.setting(key, path, f"its image {first.name} does not decode ({err})") from None
        return
    if not p.is_file():
        raise UserError.setting(key, path, f"no such file or folder; {allowed}")
    if p.suffix != ".npz":
        raise UserError.setting(key, path, f"not an .npz; {allowed}")
    try:
        with zipfile.ZipFile(p) as archive:
            keys = {name.removesuffix(".npy") for name in archive.namelist()}
    except (OSError, zipfile.BadZipFile) as err:
        raise UserError.setting(key, path, f"not a readable .npz ({err}); {allowed}") from None
    if "arr_0" not in keys and not {"mu", "sigma"} <= keys:
        raise UserError.setting(key, path, f"holds {sorted(keys)}; {allowed}")
    if "arr_0" in keys:
        shape, dtype = npz_array_header(p) or (None, None)
        if shape is None or len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
            raise UserError.setting(key, path, f"arr_0 is {dtype} of shape {shape}; {allowed}")


def check_images(images, what: str) -> None:
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3):
        shape = getattr(images, "shape", None)
        dtype = getattr(images, "dtype", None)
        raise UserError(f"{what}: expected uint8 images (N, H, W, 3), got {dtype} {shape}")


def inception_outputs(net: InceptionFeatures, images, batch_size: int = 50, device="cpu",
                      progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """images (N, H, W, 3) uint8 (or a list of such, sizes may differ) -> features (N, D), probs (N, 1008)."""
    net = net.to(device)
    feats, probs = [], []
    n = len(images)
    for start in tqdm(range(0, n, batch_size), desc="inception", disable=not progress):
        chunk = images[start:start + batch_size]
        groups = [np.stack(chunk)] if len({im.shape for im in chunk}) == 1 else [im[None] for im in chunk]
        for group in groups:  # images of one size go through together
            f, p = net(torch.from_numpy(np.ascontiguousarray(group)).to(device))
            feats.append(f.numpy())
            probs.append(p.numpy())
    return np.concatenate(feats), np.concatenate(probs)


def fid_from_features(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    """FID of sample features (N, D) against reference statistics mu (D,), sigma (D, D)."""
    return frechet_distance_to_features(features, mu, sigma)


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """probs (N, C) softmax rows -> (mean, std) of exp(mean_x KL(p(y|x) || p(y))) over `splits` parts."""
    probs = np.asarray(probs, dtype=np.float64)
    splits = max(1, min(splits, len(probs)))
    scores = []
    for part in np.array_split(probs, splits):
        marginal = part.mean(axis=0, keepdims=True)
        kl = np.sum(part * (np.log(part + 1e-12) - np.log(marginal + 1e-12)), axis=1)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))


def _kth_neighbour_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """(N,) distance from each row of x to its k-th nearest other row."""
    radii = []
    for start in range(0, len(x), chunk):
        d = torch.cdist(x[start:start + chunk], x)  # (c, N); the row's own distance 0 is among the k+1 smallest
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _inside_any_ball(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    """(P,) bool: point p lies within radius r_c of some centre c (strictly, as the reference code)."""
    inside = []
    for start in range(0, len(points), chunk):
        d = torch.cdist(points[start:start + chunk], centres)  # (c, C)
        inside.append((d < radii[None, :]).any(dim=1))
    return torch.cat(inside)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, chunk: int = 1024) -> dict:
    """Kynkäänniemi et al.'s k-NN manifold precision and recall of fake against real features."""
    if k < 1 or k >= min(len(real), len(fake)):
        raise UserError(f"nearest_k={k}: must be >= 1 and below both set sizes ({len(real)}, {len(fake)})")
    r, f = torch.from_numpy(np.asarray(real, np.float64)), torch.from_numpy(np.asarray(fake, np.float64))
    real_radii, fake_radii = _kth_neighbour_radii(r, k, chunk), _kth_neighbour_radii(f, k, chunk)
    return {"precision": float(_inside_any_ball(f, r, real_radii, chunk).double().mean()),
            "recall": float(_inside_any_ball(r, f, fake_radii, chunk).double().mean())}


def evaluate_images(samples: np.ndarray, reference: Reference, net: InceptionFeatures, *, batch_size: int = 50,
                    nearest_k: int = 3, reference_stats: str = "auto", device="cpu", progress: bool = True) -> dict:
    """FID, Inception Score and (when the reference has images) precision/recall of samples."""
    check_images(samples, "samples")
    if reference_stats not in ("auto", "images"):
        raise UserError(f"reference_stats={reference_stats!r}: allowed are 'auto' (the file's mu/sigma when "
                         "present) and 'images' (computed from its images)")
    feats, probs = inception_outputs(net, samples, batch_size, device, progress)
    result = {"num_samples": int(len(samples)), "fid_dims": int(feats.shape[1])}
    result["inception_score"], result["inception_score_std"] = inception_score(probs)
    ref_feats = None
    if reference.images is not None:
        ref_feats, _ = inception_outputs(net, reference.images, batch_size, device, progress)
        result["num_reference"] = int(len(ref_feats))
    use_file_stats = reference.mu is not None and (reference_stats == "auto" or reference.images is None)
    if use_file_stats:
        if reference.mu.shape != (feats.shape[1],):
            raise UserError(f"reference mu has shape {reference.mu.shape}, the features have {feats.shape[1]} dims "
                             f"(set evaluate.dims to {reference.mu.shape[0]})")
        mu, sigma, result["fid_reference_stats"] = reference.mu, reference.sigma, "file mu/sigma"
    else:
        mu, sigma = gaussian_stats(ref_feats)
        result["fid_reference_stats"] = "reference images"
    result["fid"] = fid_from_features(feats, mu, sigma)
    # precision/recall need the reference's own features (not possible from mu/sigma alone)
    if ref_feats is not None and min(len(ref_feats), len(feats)) > nearest_k:
        result.update(precision_recall(ref_feats, feats, nearest_k))
        result["nearest_k"] = int(nearest_k)
    return result
