"""Solvers: one step of DDPM (learned range) and DDIM against ADM's formulas, and
every solver on a denoiser whose exact answer is known."""
import numpy as np
import pytest
import torch

from diffusion.respace import respaced_betas, space_timesteps
from diffusion.sampler import sample
from diffusion.seeding import initial_noise, sample_generators
from diffusion.solvers import NoiseSchedule, build_solver


class ADM:
    """Our reading of guided-diffusion's GaussianDiffusion over a respaced chain (float64)."""

    def __init__(self, steps):
        self.kept = space_timesteps(1000, str(steps))
        self.betas = respaced_betas(np.linspace(1e-4, 0.02, 1000), self.kept)
        acp = np.cumprod(1 - self.betas)
        self.acp, self.acp_prev = acp, np.append(1.0, acp[:-1])
        post_var = self.betas * (1 - self.acp_prev) / (1 - acp)
        self.post_log_var_clipped = np.log(np.append(post_var[1], post_var[1:]))
        self.coef1 = self.betas * np.sqrt(self.acp_prev) / (1 - acp)
        self.coef2 = (1 - self.acp_prev) * np.sqrt(1 - self.betas) / (1 - acp)

    def pred_xstart(self, x, eps, i):
        return np.sqrt(1 / self.acp[i]) * x - np.sqrt(1 / self.acp[i] - 1) * eps

    def p_sample(self, x, out, i, noise):
        eps, v = np.split(out, 2, axis=1)
        frac = (v + 1) / 2
        log_var = frac * np.log(self.betas[i]) + (1 - frac) * self.post_log_var_clipped[i]
        mean = self.coef1[i] * self.pred_xstart(x, eps, i) + self.coef2[i] * x
        return mean + (i != 0) * np.exp(0.5 * log_var) * noise

    def ddim_sample(self, x, eps, i, noise, eta):
        x0 = self.pred_xstart(x, eps, i)
        a, a_prev = self.acp[i], self.acp_prev[i]
        sigma = eta * np.sqrt((1 - a_prev) / (1 - a)) * np.sqrt(1 - a / a_prev)
        mean = x0 * np.sqrt(a_prev) + np.sqrt(1 - a_prev - sigma**2) * eps
        return mean + (i != 0) * sigma * noise


def _one_step(solver, x, out, index, seed=0):
    sched_steps, model_steps = solver.reset()
    step_t = sched_steps[len(sched_steps) - 1 - index]
    gens = sample_generators(seed, range(len(x)), "cpu")
    return solver.scheduler.step(out, step_t, x, generator=gens, **solver.step_kwargs).prev_sample, model_steps


@pytest.mark.parametrize("steps", [10, 250])
@pytest.mark.parametrize("index", [0, 1, 5, 9])
def test_ddpm_learned_range_step_matches_adm(steps, index):
    torch.manual_seed(index)
    x, out = torch.randn(2, 4, 3, 3), torch.randn(2, 8, 3, 3)
    out[:, 4:] = out[:, 4:].clamp(-1, 1)
    solver = build_solver("ddpm", steps, learned_variance=True)
    got, model_steps = _one_step(solver, x, out, index)
    noise = initial_noise(sample_generators(0, range(2), "cpu"), (4, 3, 3), "cpu")
    adm = ADM(steps)
    want = adm.p_sample(x.double().numpy(), out.double().numpy(), index, noise.double().numpy())
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-4, atol=2e-5)
    assert model_steps.tolist() == adm.kept[::-1]


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("index", [0, 3, 24])
def test_ddim_step_on_respaced_chain_matches_adm(eta, index):
    torch.manual_seed(index)
    x, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    solver = build_solver("ddim", 25, eta=eta)
    got, _ = _one_step(solver, x, eps, index)
    noise = initial_noise(sample_generators(0, range(2), "cpu"), (4, 3, 3), "cpu")
    want = ADM(25).ddim_sample(x.double().numpy(), eps.double().numpy(), index, noise.double().numpy(), eta)
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-4, atol=2e-5)


class PointMassDenoiser:
    """The exact eps-prediction when all data is one point x0: eps = (x - sqrt(abar_t) x0) / sqrt(1 - abar_t).

    It reads abar at the training-scale t it is given, so a solver that conditions
    the model on the wrong timestep does not land on x0.
    """

    def __init__(self, x0, schedule=NoiseSchedule()):  # noqa: B008 - a frozen dataclass, safe to share
        self.x0 = x0
        self.acp = torch.tensor(np.cumprod(1 - schedule.betas()), dtype=torch.float64)

    def __call__(self, x, t, y):
        t = t.double()
        lo = t.floor().long().clamp(0, 999)
        hi = (lo + 1).clamp(max=999)
        w = (t - lo).view(-1, 1, 1, 1)  # Euler conditions on fractional t
        abar = ((1 - w) * self.acp[lo].view(-1, 1, 1, 1) + w * self.acp[hi].view(-1, 1, 1, 1))
        eps = (x.double() - abar.sqrt() * self.x0) / (1 - abar).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1).float()  # + a flat variance


@pytest.mark.parametrize("name,steps", [("ddpm", 50), ("ddim", 25), ("dpmpp_2m", 20), ("euler", 50)])
def test_every_solver_lands_on_the_point_mass(name, steps):
    x0 = torch.full((1, 4, 2, 2), 0.5, dtype=torch.float64)
    solver = build_solver(name, steps, learned_variance=True)
    gens = sample_generators(0, range(3), "cpu")
    noise = initial_noise(gens, (4, 2, 2), "cpu")
    y = torch.zeros(3, dtype=torch.long)
    result = sample(PointMassDenoiser(x0), solver, noise, {"y": y}, generators=gens, progress=False)
    assert torch.allclose(result.latents.double(), x0.expand_as(result.latents), atol=2e-2)


def test_bad_solver_settings_are_refused():
    with pytest.raises(ValueError, match="unknown sampler 'plms'.*ddpm, ddim"):
        build_solver("plms", 10)
    for steps in (0, -3, 2.5):
        with pytest.raises(ValueError, match=f"steps={steps!r}: must be an integer >= 1"):
            build_solver("ddim", steps)
    with pytest.raises(ValueError, match="eta=-1"):
        build_solver("ddim", 10, eta=-1.0)
    with pytest.raises(ValueError, match="spacing='trailing' for ddpm: allowed adm, ddim"):
        build_solver("ddpm", 10, spacing="trailing")


class CompVisDDIM:
    """Our reading of CompVis's DDIMSampler (uniform discretisation, float64) on the LDM schedule."""

    def __init__(self, steps, T=1000, start=0.0015, end=0.0195):
        acp = np.cumprod(1 - np.linspace(start**0.5, end**0.5, T) ** 2)
        self.timesteps = np.arange(0, T, T // steps) + 1                         # 1, 1 + T/N, ...
        self.a = acp[self.timesteps]
        self.a_prev = np.append(acp[0], acp[self.timesteps[:-1]])

    def step(self, x, eps, index, noise, eta):
        """index counts from the last (least noisy) step, as CompVis's `index` does."""
        a, a_prev = self.a[index], self.a_prev[index]
        sigma = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
        return np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma**2) * eps + sigma * noise


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("index", [0, 1, 7, 19])
def test_ddim_ldm_spacing_matches_compvis(eta, index):
    torch.manual_seed(index)
    x, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    ldm = NoiseSchedule(beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear")
    solver = build_solver("ddim", 20, ldm, eta=eta, spacing="ldm")
    got, model_steps = _one_step(solver, x, eps, index)
    ref = CompVisDDIM(20)
    assert model_steps.tolist() == ref.timesteps[::-1].tolist()   # 951, 901, ..., 1: the model sees t + 1
    noise = initial_noise(sample_generators(0, range(2), "cpu"), (4, 3, 3), "cpu")
    want = ref.step(x.double().numpy(), eps.double().numpy(), index, noise.double().numpy(), eta)
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-4, atol=2e-5)


def test_ldm_spacing_refuses_steps_that_do_not_divide_the_chain():
    with pytest.raises(ValueError, match="steps dividing 1000.*steps=300"):
        build_solver("ddim", 300, spacing="ldm")
    with pytest.raises(ValueError, match="spacing='ldm' for ddpm"):
        build_solver("ddpm", 10, spacing="ldm")
