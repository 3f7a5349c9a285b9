"""Shared fixtures: tiny saved models in the real file layouts, and composed Hydra configs."""
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# A 4-level AutoencoderKL (downsampling 8, 4 latent channels, like the SD VAE) at width 8.
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
    block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=32,
)


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Random non-zero values for every learned parameter (adaLN-Zero init would make DiT
    blocks identities and hide any difference); the fixed pos_embed table is kept."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> Path:
    """A save_pretrained folder of a random tiny VAE, as `stabilityai/sd-vae-ft-*` is laid out."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_vae")
    AutoencoderKL(**TINY_VAE).save_pretrained(folder)
    return folder


@pytest.fixture
def compose_sample():
    """compose_sample(*overrides) -> the composed configs/sample.yaml."""

    def _compose(*overrides):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            return compose(config_name="sample", overrides=list(overrides))

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def tiny_pipelines_dir(tmp_path_factory) -> Path:
    """Folder for tests/tiny_pipelines.save_tiny: each tiny pipeline is saved there once per session."""
    return tmp_path_factory.mktemp("tiny_pipelines")


REFERENCE_CACHE = Path.home() / ".cache" / "diffusion-accel"


def install_reference_tgate() -> Path:
    """A folder holding the reference `tgate` 1.0.0 package (DIR/tgate), installed once.

    `pip install --no-deps --target` from the package registry (or from the wheel named
    by TGATE_REFERENCE_WHEEL), cached under ~/.cache/diffusion-accel. It cannot be
    installed beside ours (both are called `tgate`): tests put this folder on a
    subprocess's PYTHONPATH, or import a renamed copy (fixture `tgate_reference`).
    """
    import shutil
    import subprocess
    import sys
    import tempfile

    target = REFERENCE_CACHE / "tgate-1.0.0"
    if (target / "tgate" / "tgate_utils.py").exists():
        return target
    REFERENCE_CACHE.mkdir(parents=True, exist_ok=True)
    source = os.environ.get("TGATE_REFERENCE_WHEEL") or "tgate==1.0.0"
    staging = Path(tempfile.mkdtemp(dir=REFERENCE_CACHE, prefix=".tgate-install-"))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(staging),
                           source], capture_output=True, text=True)
    if proc.returncode or not (staging / "tgate" / "tgate_utils.py").exists():
        shutil.rmtree(staging, ignore_errors=True)
        pytest.fail(f"could not install the reference {source} from the package registry "
                    f"(set TGATE_REFERENCE_WHEEL to a local wheel): {proc.stderr[-1000:]}")
    try:
        staging.rename(target)  # atomic: a concurrent run either finds the whole folder or none
    except OSError:  # another run got there first
        shutil.rmtree(staging, ignore_errors=True)
    return target


@pytest.fixture(scope="session")
def tgate_reference_dir() -> Path:
    return install_reference_tgate()


@pytest.fixture(scope="session")
def tgate_reference(tgate_reference_dir, tmp_path_factory):
    """The reference `tgate` 1.0.0 package imported in this process as `tgate_reference`
    (a renamed copy of the installed package)."""
    import importlib
    import shutil
    import sys

    root = tmp_path_factory.mktemp("tgate_reference")
    shutil.copytree(tgate_reference_dir / "tgate", root / "tgate_reference")
    sys.path.insert(0, str(root))
    return importlib.import_module("tgate_reference")
