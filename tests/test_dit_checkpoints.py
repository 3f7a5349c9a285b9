"""dit.checkpoints: resolving, safe loading and key/shape-checked loading of DiT weights. No network."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from dit import DiT_models, build_dit
from dit.checkpoints import (
    OFFICIAL_CHECKPOINTS,
    OFFLINE_ENV_VARS,
    CheckpointNotFoundError,
    load_checkpoint_state_dict,
    load_state_dict_checked,
    official_checkpoint_for,
    resolve_checkpoint,
)
from dit.models import DiT

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
XL256 = "DiT-XL-2-256x256.pt"


def randomize(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def offline_cache(monkeypatch, tmp_path):
    """TORCH_HOME in tmp_path, no offline switches, and any download attempt fails loudly."""
    for var in OFFLINE_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def no_network(url, dst, *args, **kwargs):
        raise OSError(f"network disabled in tests ({url})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


# ---------------------------------------------------------------------------
# Loading local files
# ---------------------------------------------------------------------------

def test_plain_state_dict_loads_strictly(tmp_path):
    src = randomize(DiT_models["DiT-S/8"](input_size=8, num_classes=10))
    path = tmp_path / "s8.pt"
    torch.save(src.state_dict(), path)
    model = build_dit("DiT-S/8", input_size=8, num_classes=10, ckpt=path)
    assert same(snapshot(model), snapshot(src))
    assert not model.training


@pytest.mark.parametrize("layout", ["ema", "model", "train.py"])
def test_wrapped_checkpoints(tmp_path, layout):
    ema, raw = randomize(DiT(**TINY), 1), randomize(DiT(**TINY), 2)
    if layout == "ema":
        obj, want = {"ema": ema.state_dict()}, ema
    elif layout == "model":
        obj, want = {"model": raw.state_dict()}, raw
    else:  # what DiT's train.py writes: EMA wins; argparse args must be accepted by weights_only
        obj = {"model": raw.state_dict(), "ema": ema.state_dict(), "opt": {"state": {}, "param_groups": []},
               "args": argparse.Namespace(model="DiT-XL/2", image_size=256)}
        want = ema
    torch.save(obj, tmp_path / "ckpt.pt")
    model = DiT(**TINY)
    load_state_dict_checked(model, load_checkpoint_state_dict(tmp_path / "ckpt.pt"), "ckpt.pt")
    assert same(snapshot(model), snapshot(want))


class NotATensor:
    """Stands in for any object a malicious or sloppy checkpoint might pickle."""


def test_non_tensor_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"ema": DiT(**TINY).state_dict(), "payload": NotATensor()}, path)
    with pytest.raises(ValueError, match=r"holds pickled Python objects \(test_dit_checkpoints.NotATensor\)"
                                         r".*refused unread") as err:
        load_checkpoint_state_dict(path)
    assert "weights_only" not in str(err.value)  # never the advice to unpickle an untrusted file


def test_non_state_dict_is_refused(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="state dict"):
        load_checkpoint_state_dict(tmp_path / "list.pt")


# ---------------------------------------------------------------------------
# Key/shape checking
# ---------------------------------------------------------------------------

def test_wrong_patch_size_checkpoint_names_mismatches_and_loads_nothing(tmp_path):
    path = tmp_path / "s8.pt"
    torch.save(randomize(DiT_models["DiT-S/8"](input_size=16, num_classes=10)).state_dict(), path)
    with pytest.raises(ValueError) as info:
        build_dit("DiT-S/2", input_size=16, num_classes=10, ckpt=path)
    msg = str(info.value)
    assert str(path) in msg and "shape mismatches (4)" in msg
    assert "x_embedder.proj.weight: checkpoint (384, 4, 8, 8) vs model (384, 4, 2, 2)" in msg
    assert "pos_embed: checkpoint (1, 4, 384) vs model (1, 64, 384)" in msg
    assert "final_layer.linear.weight: checkpoint (512, 384) vs model (32, 384)" in msg
    assert "final_layer.linear.bias: checkpoint (512,) vs model (32,)" in msg


def test_wrong_num_classes_and_key_differences(tmp_path):
    model = randomize(DiT(**TINY), 3)
    before = snapshot(model)
    other = dict(randomize(DiT(**{**TINY, "num_classes": 1000}), 4).state_dict())
    del other["blocks.1.mlp.fc2.bias"]
    other["blocks.1.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as info:
        load_state_dict_checked(model, other, "other.pt")
    msg = str(info.value)
    assert "other.pt" in msg and "nothing was loaded" in msg
    assert "missing keys (1): blocks.1.mlp.fc2.bias" in msg
    assert "unexpected keys (1): blocks.1.extra.weight" in msg
    assert "y_embedder.embedding_table.weight: checkpoint (1001, 32) vs model (11, 32)" in msg
    assert same(snapshot(model), before)  # checked before loading: untouched


def test_long_key_lists_are_truncated():
    model = DiT(**{**TINY, "depth": 4})
    shallow = DiT(**{**TINY, "depth": 1}).state_dict()
    # one key per layer kind, the blocks folded: `blocks.*.attn.qkv.weight, ..., ... (N more kinds)`
    with pytest.raises(ValueError, match=r"missing keys \(30\): blocks\.\*\.[^;]*\.\.\. \(\d+ more kinds\)"):
        load_state_dict_checked(model, shallow, "shallow")


# ---------------------------------------------------------------------------
# Names and resolution
# ---------------------------------------------------------------------------

def test_unknown_model_name_lists_allowed_names_before_any_work(tmp_path):
    with pytest.raises(ValueError) as info:
        build_dit("DiT-XXL/2", ckpt=tmp_path / "does-not-exist.pt")
    msg = str(info.value)
    assert "DiT-XXL/2" in msg and all(name in msg for name in DiT_models)


def test_official_checkpoint_table():
    assert OFFICIAL_CHECKPOINTS == {
        "DiT-XL-2-256x256.pt": "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt",
        "DiT-XL-2-512x512.pt": "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt",
    }
    assert official_checkpoint_for("DiT-XL/2", 32) == "DiT-XL-2-256x256.pt"
    assert official_checkpoint_for("DiT-XL/2", 64) == "DiT-XL-2-512x512.pt"
    assert official_checkpoint_for("DiT-B/2", 32) is None


@pytest.mark.parametrize("var", OFFLINE_ENV_VARS)
def test_offline_resolve_names_file_folder_and_url(offline_cache, monkeypatch, var):
    monkeypatch.setenv(var, "1")
    with pytest.raises(CheckpointNotFoundError) as info:
        resolve_checkpoint(XL256)
    msg = str(info.value)
    assert XL256 in msg and str(offline_cache) in msg and OFFICIAL_CHECKPOINTS[XL256] in msg
    assert var in msg
    assert isinstance(info.value, FileNotFoundError)


def test_download_failure_is_a_clear_error_and_leaves_no_partial(offline_cache):
    with pytest.raises(CheckpointNotFoundError, match="download failed") as info:
        resolve_checkpoint(XL256)
    assert OFFICIAL_CHECKPOINTS[XL256] in str(info.value)
    assert list(offline_cache.iterdir()) == []


def test_download_goes_to_temp_name_then_cache(offline_cache, monkeypatch):
    seen = []

    def fake_download(url, dst, *args, **kwargs):
        seen.append((url, Path(dst)))
        Path(dst).write_bytes(b"weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    path = resolve_checkpoint(XL256)
    assert path == offline_cache / XL256 and path.read_bytes() == b"weights"
    (url, tmp), = seen
    assert url == OFFICIAL_CHECKPOINTS[XL256] and tmp != path and tmp.parent == offline_cache
    # Second call: cache hit, no download.
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded twice"))
    assert resolve_checkpoint(XL256) == path


def test_cached_official_file_is_used_offline(offline_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline_cache.mkdir(parents=True)
    (offline_cache / XL256).write_bytes(b"x")
    assert resolve_checkpoint(XL256) == offline_cache / XL256
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / XL256).write_bytes(b"y")
    assert resolve_checkpoint(XL256, cache_dir=other) == other / XL256


def test_unknown_checkpoint_name_lists_official_names(offline_cache):
    with pytest.raises(CheckpointNotFoundError) as info:
        resolve_checkpoint("DiT-XL-2-1024x1024.pt")
    assert all(name in str(info.value) for name in OFFICIAL_CHECKPOINTS)


def test_pretrained_without_release_fails_and_offline_release_fails(offline_cache, monkeypatch):
    with pytest.raises(ValueError, match="no official checkpoint for DiT-B/2"):
        build_dit("DiT-B/2", input_size=32, pretrained=True)
    monkeypatch.setenv("DIT_OFFLINE", "1")
    with pytest.raises(CheckpointNotFoundError, match=XL256):
        build_dit("DiT-XL/2", input_size=32, pretrained=True)


def test_random_init_when_no_checkpoint():
    model = build_dit("DiT-S/8", input_size=8, num_classes=10)
    assert isinstance(model, DiT) and not model.training
