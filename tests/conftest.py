"""Shared fixtures: tiny saved models in the real file layouts, and composed Hydra configs."""
import os
from pathlib import Path

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine extra threads
# made a tiny U-Net forward 50x slower (3.7 s vs 0.07 s). Subprocesses (scripts) inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

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
def tgate_reference(tmp_path_factory):
    """The reference `tgate` 1.0.0 package from PyPI, importable as `tgate_reference`.

    It cannot be pip-installed beside ours (both are called `tgate`), so its wheel is
    downloaded from the package registry once (cached under ~/.cache/diffusion-accel)
    and unpacked under another name. Set TGATE_REFERENCE_WHEEL to use a local wheel.
    """
    import importlib
    import subprocess
    import sys
    import zipfile

    wheel = os.environ.get("TGATE_REFERENCE_WHEEL")
    if not wheel:
        cache = Path.home() / ".cache" / "diffusion-accel"
        found = sorted(cache.glob("tgate-1.0.0-*.whl"))
        if not found:
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "tgate==1.0.0", "--no-deps",
                                   "-d", str(cache)], capture_output=True, text=True)
            found = sorted(cache.glob("tgate-1.0.0-*.whl"))
            if not found:
                pytest.fail(f"could not download the reference tgate==1.0.0 wheel from the package registry "
                            f"(set TGATE_REFERENCE_WHEEL to a local copy): {proc.stderr[-1000:]}")
        wheel = found[0]
    root = tmp_path_factory.mktemp("tgate_reference")
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            if member.startswith("tgate/"):
                target = root / "tgate_reference" / member[len("tgate/"):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(member))
    sys.path.insert(0, str(root))
    return importlib.import_module("tgate_reference")


def pip_target(name: str, *requirements: str) -> Path:
    """A folder holding `requirements` installed with `pip --no-deps --target`, made once and
    cached under ~/.cache/diffusion-accel/<name> (reference packages whose dependencies we do
    not want in the environment). A failed install fails the test, never skips it."""
    import subprocess
    import sys

    folder = Path.home() / ".cache" / "diffusion-accel" / name
    done = folder / ".installed"
    if not done.exists():
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(folder),
                               *requirements], capture_output=True, text=True)
        if proc.returncode:
            pytest.fail(f"could not install {requirements} from the package registry: {proc.stderr[-1000:]}")
        done.write_text("\n".join(requirements))
    return folder


@pytest.fixture(scope="session")
def taming_modules():
    """CompVis's first-stage building blocks (taming's Encoder, Decoder, VectorQuantizer2) from pip's
    `taming-transformers-rom1504`, without the pytorch-lightning it declares."""
    import importlib
    import sys

    folder = pip_target("taming", "taming-transformers-rom1504==0.0.6", "einops")
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
    return importlib.import_module("taming.modules.diffusionmodules.model")
