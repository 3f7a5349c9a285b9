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


def compose_config(config_name: str, *overrides: str):
    """configs/<config_name>.yaml composed with the overrides (Hydra's global state cleared after)."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            return compose(config_name=config_name, overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture
def compose_sample():
    """compose_sample(*overrides) -> the composed configs/sample.yaml."""

    def _compose(*overrides):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            return compose(config_name="sample", overrides=list(overrides))

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture
def run_latents(monkeypatch):
    """run_latents(folder) -> the final latents (N, C, h, w) a run_from_config into folder made, batches in order.

    A random-weight model does not denoise: its first step's x0 estimate (x - sqrt(1-a) eps) / sqrt(a)
    is ~100x the noise, and the decoded images of two runs that differ only in later steps (a gate,
    the stitch point) differ by a grey level or two at most. Latents show every step's change, so
    comparisons of variants are made on them (and images are compared bitwise where equal)."""
    import runs.run as run

    recorded: dict[Path, list[torch.Tensor]] = {}
    real_generate = run.generate

    def recording_generate(denoisers, solver, decode, **kwargs):
        batches = recorded.setdefault(Path(kwargs["out_dir"]), [])

        def recording_decode(latents):
            batches.append(latents.detach().float().cpu().clone())
            return decode(latents)

        return real_generate(denoisers, solver, recording_decode, **kwargs)

    monkeypatch.setattr(run, "generate", recording_generate)

    return lambda folder: torch.cat(recorded[Path(folder)])


@pytest.fixture(scope="session")
def tiny_pipelines_dir(tmp_path_factory) -> Path:
    """Folder for tests/tiny_pipelines.save_tiny: each tiny pipeline is saved there once per session."""
    return tmp_path_factory.mktemp("tiny_pipelines")


REFERENCE_CACHE = Path.home() / ".cache" / "diffusion-accel"


def pip_target(name: str, *requirements: str, marker: str = ".installed") -> Path:
    """A folder holding `requirements` installed with `pip install --no-deps --target`, made once
    and cached as ~/.cache/diffusion-accel/<name>: reference packages that cannot be installed
    beside ours or whose dependencies we do not want in the environment. Installed into a
    staging folder and renamed into place (a concurrent run finds the whole folder or none);
    `marker` is a path inside it that says the install is complete. A failed install fails
    the test, never skips it."""
    import shutil
    import subprocess
    import sys
    import tempfile

    target = REFERENCE_CACHE / name
    if (target / marker).exists():
        return target
    REFERENCE_CACHE.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=REFERENCE_CACHE, prefix=f".{name}-install-"))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(staging),
                           *requirements], capture_output=True, text=True)
    if marker == ".installed" and not proc.returncode:
        (staging / marker).write_text("\n".join(requirements))
    if proc.returncode or not (staging / marker).exists():
        shutil.rmtree(staging, ignore_errors=True)
        pytest.fail(f"could not install {requirements} from the package registry: {proc.stderr[-1000:]}")
    if not (target / marker).exists():
        shutil.rmtree(target, ignore_errors=True)  # an incomplete earlier install
    try:
        staging.rename(target)
    except OSError:  # another run got there first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def install_reference_tgate() -> Path:
    """A folder holding the reference `tgate` 1.0.0 package (DIR/tgate), from the package registry or
    the wheel named by TGATE_REFERENCE_WHEEL. It cannot be installed beside ours (both are called
    `tgate`): tests put this folder on a subprocess's PYTHONPATH, or import a renamed copy
    (fixture `tgate_reference`)."""
    source = os.environ.get("TGATE_REFERENCE_WHEEL") or "tgate==1.0.0"
    return pip_target("tgate-1.0.0", source, marker="tgate/tgate_utils.py")


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
