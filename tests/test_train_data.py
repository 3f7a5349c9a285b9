"""The data group: digits pixel mapping, upsampling, image folders, repeatable batches."""
import numpy as np
import pytest
import torch
from PIL import Image

from data.datasets import DigitsDataset, ImageFolderDataset, StepBatchSampler, center_crop, digits_arrays
from diffusion.vae import to_uint8


def test_digits_are_in_unit_range_with_the_documented_pixel_values():
    data = DigitsDataset()
    raw, labels = digits_arrays()
    assert len(data) == 1797 and data.images.shape == (1797, 1, 8, 8) and data.num_classes == 10
    assert data.images.min() == -1 and data.images.max() == 1
    # written as a run writes images: pixel = intensity x 255/16 (rounded), ink bright
    pixels = to_uint8(data.images[:50])[..., 0].astype(int)
    np.testing.assert_array_less(np.abs(pixels - raw[:50] * 255 / 16), 1.0)
    x, y = data[3]
    assert x.shape == (1, 8, 8) and int(y) == labels[3]


def test_digits_upsample_by_a_whole_factor():
    up = DigitsDataset(upsample=2)
    assert up.image_size == 16 and up.images.shape[1:] == (1, 16, 16)
    torch.testing.assert_close(up.images[:, :, ::2, ::2], DigitsDataset().images)
    with pytest.raises(ValueError, match="whole factor"):
        DigitsDataset(upsample=0)


def test_image_folder(tmp_path):
    for cls, value in (("b_cat", 200), ("a_dog", 50)):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (40, 30), (value, value, value)).save(tmp_path / cls / "x.png")
    (tmp_path / "a_dog" / "notes.txt").write_text("not an image")
    data = ImageFolderDataset(str(tmp_path), image_size=16)
    assert data.classes == ["a_dog", "b_cat"] and len(data) == 2 and data.num_classes == 2
    x, y = data[1]
    assert x.shape == (3, 16, 16) and int(y) == 1
    assert x.mean().item() == pytest.approx(200 / 127.5 - 1, abs=0.02)
    grey = ImageFolderDataset(str(tmp_path), image_size=8, channels=1)
    assert grey[0][0].shape == (1, 8, 8)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        ImageFolderDataset(str(tmp_path / "nope"), 16)


def test_center_crop_is_square():
    assert center_crop(Image.new("RGB", (300, 100)), 32).size == (32, 32)


def test_step_batches_depend_only_on_seed_and_step():
    full = list(StepBatchSampler(100, 8, seed=3, start=0, stop=6))
    tail = list(StepBatchSampler(100, 8, seed=3, start=4, stop=6))
    assert tail == full[4:] and len(full[0]) == 8 and len(set(map(tuple, full))) == 6
    assert list(StepBatchSampler(100, 8, seed=4, start=0, stop=1)) != full[:1]
