"""Training data (configs/data/): images in [-1, 1] as (C, H, W) float tensors with class labels.

* `DigitsDataset`: scikit-learn's bundled `load_digits` (1,797 8x8 grey digits, 10 classes,
  intensities 0..16; no download). Pixel value = intensity x 255/16, not inverted (ink is
  bright), i.e. x = intensity / 16 * 2 - 1; optionally upsampled by a whole factor (nearest).
* `ImageFolderDataset`: root/<class>/<image>, classes in sorted order (torchvision's
  ImageFolder convention), ADM's centre crop to `image_size`; `flip` asks the training
  step for random horizontal flips (digits have none: a mirrored digit is another shape).

Batches are drawn by `StepBatchSampler`: the indices of step s depend only on (seed, s),
so a resumed run sees exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from diffusion.errors import MissingFileError, UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits: images (1797, 8, 8) float64 intensities 0..16, labels (1797,) int64."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn, read from disk

    digits = load_digits()
    return digits.images, digits.target.astype(np.int64)


def digits_to_unit_range(images: np.ndarray) -> np.ndarray:
    """Intensities 0..16 -> [-1, 1] (pixel value = intensity x 255/16 once written as uint8)."""
    return images / 16.0 * 2.0 - 1.0


class DigitsDataset(Dataset):
    """(1, 8u, 8u) images in [-1, 1] and their digit, u = upsample."""

    num_classes = 10
    channels = 1
    flip = False

    def __init__(self, upsample: int = 1):
        if isinstance(upsample, bool) or not isinstance(upsample, int) or upsample < 1:
            raise UserError(f"data.upsample={upsample!r}: must be a whole factor >= 1")
        images, labels = digits_arrays()
        x = torch.from_numpy(digits_to_unit_range(images)).float()[:, None]          # (N, 1, 8, 8)
        if upsample > 1:
            x = x.repeat_interleave(upsample, dim=2).repeat_interleave(upsample, dim=3)  # nearest
        self.images, self.labels = x, torch.from_numpy(labels)
        self.image_size = 8 * upsample

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, k: int):
        return self.images[k], self.labels[k]


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop: halve with BOX while the short side is >= 2 size, resize the short side
    to `size` with BICUBIC, then crop the centre size x size."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


class ImageFolderDataset(Dataset):
    """root/<class name>/<image file>; label = position of the class name in sorted order."""

    def __init__(self, root: str, image_size: int, channels: int = 3, flip: bool = True):
        root_path = Path(root).expanduser()
        if not root_path.is_dir():
            raise MissingFileError(f"data.root={root!r} is not a folder (expected root/<class>/<images>)")
        if channels not in (1, 3):
            raise UserError(f"data.channels={channels}: 1 (grey) or 3 (RGB)")
        self.classes = sorted(p.name for p in root_path.iterdir() if p.is_dir())
        self.files = [(f, k) for k, c in enumerate(self.classes) for f in sorted((root_path / c).rglob("*"))
                      if f.suffix.lower() in IMAGE_SUFFIXES]
        if not self.files:
            raise MissingFileError(f"no images under {root_path}/<class>/ (suffixes {sorted(IMAGE_SUFFIXES)})")
        self.num_classes, self.image_size, self.channels, self.flip = len(self.classes), image_size, channels, flip

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, k: int):
        path, label = self.files[k]
        with Image.open(path) as im:
            image = center_crop(im.convert("L" if self.channels == 1 else "RGB"), self.image_size)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
        x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)                           # (C, H, W)
        return x, torch.tensor(label)  # flips (self.flip) are drawn by the training step, from its seed


class StepBatchSampler(Sampler):
    """Batch index lists for steps start, start + 1, ..., stop - 1; step s's batch is drawn
    (with replacement) from its own generator keyed (seed, s)."""

    def __init__(self, num_items: int, batch_size: int, seed: int, start: int, stop: int):
        self.num_items, self.batch_size, self.seed, self.start, self.stop = num_items, batch_size, seed, start, stop

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def __iter__(self):
        for step in range(self.start, self.stop):
            rng = np.random.default_rng([int(self.seed), int(step)])
            yield rng.integers(self.num_items, size=self.batch_size).tolist()
