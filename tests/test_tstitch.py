"""T-Stitch: which model runs which step, one trajectory, bad input, and runs from configs."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffusion import sample
from diffusion.seeding import initial_noise, sample_generators
from diffusion.solvers import build_solver
from dit import DiT
from tstitch import TStitchHook, model_per_step, resolve_fractions, steps_per_model

from conftest import CONFIGS, randomize

RATIOS = [round(0.1 * k, 1) for k in range(11)]


@pytest.mark.parametrize("n", [10, 25, 50, 100, 250])
@pytest.mark.parametrize("r", RATIOS)
def test_small_model_runs_exactly_the_first_round_rn_steps(n, r):
    small = round(r * n)
    assert model_per_step(resolve_fractions(ratio=r), n) == [0] * small + [1] * (n - small)
    assert steps_per_model(resolve_fractions(fractions=[r, 1 - r]), n) == [small, n - small]


@pytest.mark.parametrize("n", [10, 25, 50, 100, 250])
@pytest.mark.parametrize("fractions", [[0.4, 0.2, 0.4], [0.3, 0.3, 0.4], [0.0, 0.5, 0.5], [0.1, 0.0, 0.9],
                                       [0.2, 0.2, 0.2, 0.4]])
def test_several_models_split_by_cumulative_fractions(n, fractions):
    ends = [round(sum(fractions[: j + 1]) * n) for j in range(len(fractions))]
    starts = [0] + ends[:-1]
    assert steps_per_model(fractions, n) == [e - s for s, e in zip(starts, ends, strict=True)]
    assert model_per_step(fractions, n) == sorted(model_per_step(fractions, n))  # in order, no interleaving
    assert sum(steps_per_model(fractions, n)) == n


def test_three_model_paper_split():
    assert steps_per_model([0.4, 0.2, 0.4], 100) == [40, 20, 40]
    assert steps_per_model([0.4, 0.2, 0.4], 25) == [10, 5, 10]


@pytest.mark.parametrize("kwargs,message", [
    (dict(fractions=[0.5, 0.6]), r"fractions=\[0.5, 0.6\] sum to 1.1; they must sum to 1"),
    (dict(fractions=[0.3, 0.3, 0.3]), r"sum to 0.9; they must sum to 1"),
    (dict(fractions=[1.5, -0.5]), r"each fraction must be a number in \[0, 1\] \(bad: \[1.5, -0.5\]\)"),
    (dict(ratio=1.2), r"ratio=1.2: the small model's fraction must be a number in \[0, 1\]"),
    (dict(ratio=-0.1), r"ratio=-0.1"),
    (dict(ratio=float("nan")), r"ratio=nan"),
    (dict(fractions=[1.0]), r"at least two models"),
    (dict(), r"give either ratio"),
])
def test_bad_fractions_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TStitchHook(**kwargs)


# small and "large" stand-ins: the official S/B/XL widths, cut to a few blocks for speed
SIZES = {"small": dict(depth=1, hidden_size=64, num_heads=2), "large": dict(depth=3, hidden_size=96, num_heads=3)}


def _dit(size="small", seed=0, patch_size=2, **kwargs):
    kwargs = {"input_size": 4, "num_classes": 10, "patch_size": patch_size, **SIZES[size], **kwargs}
    return randomize(DiT(**kwargs), seed=seed, std=0.05).eval()


def test_model_and_fraction_lists_of_different_lengths_are_refused():
    hook = TStitchHook(fractions=[0.4, 0.2, 0.4])
    with pytest.raises(ValueError, match=r"3 fractions \[0.4, 0.2, 0.4\] for 2 models: give one fraction per model"):
        hook.attach([_dit(), _dit("large")], ["small", "large"], build_solver("ddim", 10))


@pytest.mark.parametrize("other,message", [
    (dict(input_size=8), r"different latent sizes: \{'small': 4, 'large': 8\}"),
    (dict(in_channels=3), r"different latent channel counts: \{'small': 4, 'large': 3\}"),
    (dict(num_classes=20), r"different class counts: \{'small': 10, 'large': 20\}"),
])
def test_incompatible_models_are_refused(other, message):
    with pytest.raises(ValueError, match=message):
        TStitchHook(ratio=0.4).attach([_dit(), _dit("large", **other)], ["small", "large"], build_solver("ddim", 10))


def test_learned_variance_mismatch_is_refused_under_ddpm_only():
    models, names = [_dit(learn_sigma=True), _dit(learn_sigma=False)], ["sigma", "no-sigma"]
    with pytest.raises(ValueError, match=r"different learned-variance outputs under DDPM.*use sampler=ddim"):
        TStitchHook(ratio=0.4).attach(models, names, build_solver("ddpm", 10, learned_variance=True))
    TStitchHook(ratio=0.4).attach(models, names, build_solver("ddim", 10))  # eps only: fine


def _stitched(models, solver, ratio=None, fractions=None, hooks=None, seed=0, n=3):
    gens = sample_generators(seed, range(n), "cpu")
    noise = initial_noise(gens, (4, 4, 4), "cpu")
    y = torch.arange(n) % 10
    hooks = [TStitchHook(ratio, fractions)] if hooks is None else hooks
    return sample(models, solver, noise, {"y": y}, {"y": torch.full_like(y, 10)}, cfg_scale=3.0,
                  guided_channels=3, hooks=hooks, generators=gens, progress=False)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m", "euler"])
def test_fraction_zero_is_the_large_model_and_one_the_small_model_bitwise(sampler):
    small, large = _dit(seed=1), _dit("large", seed=2)
    solver = build_solver(sampler, 10, learned_variance=True)
    alone_small = _stitched([small], solver, hooks=[]).latents
    alone_large = _stitched([large], solver, hooks=[]).latents
    r0, r1 = _stitched([small, large], solver, ratio=0.0), _stitched([small, large], solver, ratio=1.0)
    assert torch.equal(r0.latents, alone_large) and r0.steps_per_model == [0, 10]
    assert torch.equal(r1.latents, alone_small) and r1.steps_per_model == [10, 0]
    mid = _stitched([small, large], solver, ratio=0.4)
    assert mid.steps_per_model == [4, 6]
    assert not torch.equal(mid.latents, alone_small) and not torch.equal(mid.latents, alone_large)


class Switching(torch.nn.Module):
    """A single denoiser that calls `small` for its first k calls, then `large`: what one
    stitched trajectory must equal (no re-noising, the running model's own variance)."""

    def __init__(self, small, large, k):
        super().__init__()
        self.small, self.large, self.k, self.calls = small, large, k, 0

    def forward(self, x, t, y):
        self.calls += 1
        return (self.small if self.calls <= self.k else self.large)(x, t, y)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m", "euler"])
def test_stitching_is_one_trajectory(sampler):
    small, large = _dit(seed=1), _dit("large", seed=2)
    solver = build_solver(sampler, 10, learned_variance=True)
    stitched = _stitched([small, large], solver, ratio=0.3)
    switching = _stitched([Switching(small, large, 3)], solver, hooks=[])
    assert torch.equal(stitched.latents, switching.latents)


def test_three_models_run_in_order():
    models = [_dit(seed=1), _dit("small", seed=2, patch_size=4), _dit("large", seed=3)]
    result = _stitched(models, build_solver("ddim", 25), fractions=[0.4, 0.2, 0.4])
    assert result.steps_per_model == [10, 5, 10]
    assert result.evals_per_model == [20, 10, 20]  # guided: two rows per step


# --- from configs -------------------------------------------------------------------------

# the "large" model is DiT-S/4 here: the same width as DiT-S/2, so the tests stay quick
TINY = ["model=dit_s2", "model.name=DiT-S/4", "model.image_size=32", "num_samples=2", "batch_size=2", "sampler.steps=5",
        "progress=false", "pretrained=false", "vae.arch.block_out_channels=[8,8,8,8]",
        "vae.arch.norm_num_groups=8", "vae.arch.layers_per_block=1"]
# DiT-S/2 names no T-Stitch partner of its own (configs/family/dit_s2.yaml): the small model is a DiT-S/2 at its size
TINY += ["+model@family.stitch.small=dit_s2", "family.stitch.small.image_size=${model.image_size}"]


def test_stitch_experiment_runs_and_records_steps_and_macs(compose_sample, tmp_path):
    from runs.run import run_from_config

    cfg = compose_sample("+exp=dit_stitch_0.4", *TINY)
    assert (cfg.sampler.name, cfg.accel.tstitch.ratio, cfg.sampler.cfg_scale) == ("ddim", 0.4, 1.5)
    metrics = run_from_config(cfg, tmp_path)
    assert metrics["steps_per_model"] == {"DiT-S/2": 2, "DiT-S/4": 3}
    s, b = metrics["macs_per_forward"]["DiT-S/2"], metrics["macs_per_forward"]["DiT-S/4"]
    assert 0 < b < s  # S/4 sees 4x fewer tokens than S/2
    assert metrics["macs_per_image"] == 2 * (2 * s + 3 * b)  # guided steps: two rows each


def test_three_model_experiment_composes_with_fraction_override(compose_sample):
    cfg = compose_sample("+exp=dit_stitch_sbxl", "accel.tstitch.fractions=[0.2,0.3,0.5]")
    assert [m.name for m in cfg.accel.models.values()] == ["DiT-S/2", "DiT-B/2"]
    from runs.run import build_hooks

    assert build_hooks(cfg)[0].fractions == [0.2, 0.3, 0.5]


def test_bad_ratio_from_config_fails_before_models_are_built(compose_sample, tmp_path):
    from runs.run import run_from_config

    cfg = compose_sample("+exp=dit_stitch_0.4", *TINY, "accel.tstitch.ratio=1.5", "model.name=DiT-Q/9")
    with pytest.raises(ValueError, match=r"ratio=1.5"):  # not the (later) unknown-model error
        run_from_config(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# slow (a multirun of two script jobs); the default run covers sweeps with tests/test_launchers.py's multirun
# and test_refusals.py's sweep check, the ratio itself with the in-process tests above
@pytest.mark.slow
def test_ratio_sweep_from_the_command_line(tmp_path):
    """`-m` over accel.tstitch.ratio, as the README's sweep of the paper's curve."""
    cmd = [sys.executable, "scripts/sample.py", "-m", "+exp=dit_stitch_0.4", *TINY,
           "accel.tstitch.ratio=0.0,1.0", f"hydra.sweep.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=CONFIGS.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads((tmp_path / str(k) / "metrics.json").read_text()) for k in range(2)]
    assert [r["steps_per_model"] for r in runs] == [{"DiT-S/2": 0, "DiT-S/4": 5}, {"DiT-S/2": 5, "DiT-S/4": 0}]
    images = [np.load(tmp_path / str(k) / "samples.npz")["arr_0"] for k in range(2)]
    assert all(a.shape == (2, 32, 32, 3) for a in images)
    assert not np.array_equal(*images)  # all DiT-S/4 vs all DiT-S/2: random weights that act


def test_stitch_point_changes_the_run_with_random_weights(compose_sample, tmp_path, run_latents):
    """pretrained=false: ratio 0.4 differs from both ends (DiT-S/4 alone, DiT-S/2 alone), which differ too."""
    from runs.run import run_from_config

    latents = {}
    for ratio in (0.0, 0.4, 1.0):
        run_from_config(compose_sample("+exp=dit_stitch_0.4", *TINY, f"accel.tstitch.ratio={ratio}"),
                        tmp_path / str(ratio))
        latents[ratio] = run_latents(tmp_path / str(ratio))
    assert all(x.abs().max() > 0 for x in latents.values())
    for a, b in ((0.4, 0.0), (0.4, 1.0), (0.0, 1.0)):
        assert (latents[a] - latents[b]).norm() > 1e-3 * latents[b].norm(), (a, b)
