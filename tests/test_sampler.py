"""The sampling loop: guidance, hooks, per-sample seeds, bad input."""
import math

import numpy as np
import pytest
import torch

from diffusion import Hook
from diffusion.guidance import apply_cfg
from diffusion.sampler import sample
from diffusion.seeding import class_labels, initial_noise, sample_generators
from diffusion.solvers import build_solver
from runs.generate import generate


class TinyDenoiser(torch.nn.Module):
    """A small conv net with a class embedding: output [eps, v] like DiT."""

    def __init__(self, channels=4, num_classes=10, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(num_classes + 1, channels)
        self.net = torch.nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((x.shape[0], y.tolist()))
        h = x + self.embed(y)[:, :, None, None] + (t.float() / 1000)[:, None, None, None]
        return torch.tanh(self.net(h))


def _noise(n, seed=0):
    gens = sample_generators(seed, range(n), "cpu")
    return initial_noise(gens, (4, 4, 4), "cpu"), gens


def test_apply_cfg_guides_the_named_channels_and_keeps_the_variance():
    cond, uncond = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3)
    out = apply_cfg(cond, uncond, 4.0, eps_channels=4, guided_channels=3)
    torch.testing.assert_close(out[:, :3], uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]))
    torch.testing.assert_close(out[:, 3:], cond[:, 3:])  # 4th eps channel and variance: cond, unguided
    out_all = apply_cfg(cond, uncond, 4.0, eps_channels=4)
    torch.testing.assert_close(out_all[:, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]))
    with pytest.raises(ValueError, match="guided_channels=5"):
        apply_cfg(cond, uncond, 4.0, eps_channels=4, guided_channels=5)


def test_guided_step_runs_one_2b_batch_cond_first():
    model = TinyDenoiser()
    noise, gens = _noise(2)
    y = torch.tensor([3, 7])
    sample(model, build_solver("ddim", 3), noise, {"y": y}, {"y": torch.full_like(y, 10)}, cfg_scale=2.0,
           progress=False)
    assert model.calls == [(4, [3, 7, 10, 10])] * 3


def test_no_guidance_at_scale_one():
    model = TinyDenoiser()
    noise, _ = _noise(2)
    y = torch.tensor([3, 7])
    sample(model, build_solver("ddim", 3), noise, {"y": y}, {"y": y * 0 + 10}, cfg_scale=1.0, progress=False)
    assert model.calls == [(2, [3, 7])] * 3


class RecordingHook(Hook):
    """Switches to model 1 from step 2, turns guidance off from step 3 (uncond branch)."""

    def __init__(self):
        self.events = []

    def start(self, plan):
        self.events = [("start", plan.num_steps, plan.num_models, plan.batch_size, plan.use_cfg)]

    def step(self, ctx):
        self.events.append(("step", ctx.i, ctx.n))
        if ctx.i >= 2:
            ctx.model_index = 1
        if ctx.i >= 3:
            ctx.guidance, ctx.branch = False, "uncond"

    def end(self):
        self.events.append(("end",))


def test_hooks_choose_model_and_guidance_per_step():
    small, large = TinyDenoiser(seed=1), TinyDenoiser(seed=2)
    hook = RecordingHook()
    noise, _ = _noise(2)
    y = torch.tensor([3, 7])
    for _ in range(2):  # hooks reset in start: a second run sees the same events
        small.calls.clear(), large.calls.clear()
        result = sample([small, large], build_solver("ddim", 5), noise, {"y": y}, {"y": y * 0 + 10},
                        cfg_scale=3.0, hooks=[hook], progress=False)
        assert result.steps_per_model == [2, 3]
        assert small.calls == [(4, [3, 7, 10, 10])] * 2
        assert large.calls == [(4, [3, 7, 10, 10])] + [(2, [10, 10])] * 2
        assert hook.events == [("start", 5, 2, 2, True)] + [("step", i, 5) for i in range(5)] + [("end",)]


def test_bad_cfg_scale_is_refused_before_sampling():
    model = TinyDenoiser()
    noise, _ = _noise(1)
    for bad in (-0.5, math.nan, math.inf, "4"):
        with pytest.raises(ValueError, match="cfg_scale=.*must be a finite number >= 0"):
            sample(model, build_solver("ddim", 3), noise, {"y": torch.tensor([1])}, {"y": torch.tensor([10])},
                   cfg_scale=bad, progress=False)
    assert model.calls == []


def _generate(batch_size, seed=0, n=5, sampler="ddpm"):
    model = TinyDenoiser()
    labels = class_labels(seed, n, 10)

    def decode(z):
        return (z.clamp(-1, 1) * 127.5 + 128).to(torch.uint8).permute(0, 2, 3, 1).numpy()

    return generate(model, build_solver(sampler, 4, learned_variance=True), decode, latent_shape=(4, 4, 4),
                    labels=labels, null_label=10, seed=seed, batch_size=batch_size, device=torch.device("cpu"),
                    cfg_scale=4.0, guided_channels=3, progress=False)


def test_images_do_not_depend_on_batch_size():
    # DDPM draws fresh noise every step: each sample must use only its own generator
    one, three, five = _generate(1), _generate(3), _generate(5)
    np.testing.assert_array_equal(one.images, three.images)
    np.testing.assert_array_equal(one.images, five.images)
    np.testing.assert_array_equal(one.labels, five.labels)
    assert not np.array_equal(_generate(5, seed=1).images, five.images)
    assert five.steps_per_model == [4]


def test_class_labels():
    assert class_labels(0, 5, 1000, [207, 360]).tolist() == [207, 360, 207, 360, 207]
    random = class_labels(3, 50, 1000)
    assert random[:10].tolist() == class_labels(3, 10, 1000).tolist()  # prefix-stable
    assert len(set(random.tolist())) > 40 and random.min() >= 0 and random.max() < 1000
    with pytest.raises(ValueError, match=r"labels=\[5, 1000\]: each must be a class index in \[0, 999\]"):
        class_labels(0, 2, 1000, [5, 1000])
