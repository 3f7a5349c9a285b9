"""Samplers from configs: a diffusers scheduler plus how its timesteps map to the model's.

The core owns the loop; diffusers owns each solver's update rule. A `Solver` holds a
configured scheduler and knows, for every step, the timestep the scheduler expects and
the training-scale timestep (0..999) the denoiser is conditioned on. They differ only
for ADM-respaced chains, where the scheduler runs over the respaced chain's own indices.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from diffusion.errors import UserError

from .respace import respaced_betas, space_timesteps

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "euler")
# ddpm/ddim follow ADM: "adm" = space_timesteps(T, "N"), "ddim" = space_timesteps(T, "ddimN").
RESPACED_SPACINGS = ("adm", "ddim")
# ddim only: "ldm" = CompVis DDIMSampler's uniform discretisation (range(0, T, T // N) + 1, the
# last step lands on alphas_cumprod[0]); what LDM and the T-Stitch U-Net numbers use.
LDM_SPACING = "ldm"
# dpmpp_2m/euler use diffusers' own spacing of the training steps.
DIFFUSERS_SPACINGS = ("linspace", "leading", "trailing")


@dataclass(frozen=True)
class NoiseSchedule:
    """The training noise schedule (configs/schedule/)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"  # "linear" (ADM/DiT) or "scaled_linear" (LDM)

    def betas(self) -> np.ndarray:
        """(T,) float64 betas, computed as ADM / LDM do."""
        T = self.num_train_timesteps
        if self.beta_schedule == "linear":
            return np.linspace(self.beta_start, self.beta_end, T, dtype=np.float64)
        if self.beta_schedule == "scaled_linear":
            return np.linspace(self.beta_start**0.5, self.beta_end**0.5, T, dtype=np.float64) ** 2
        raise UserError(f"beta_schedule={self.beta_schedule!r} is not one of 'linear', 'scaled_linear'")


@dataclass
class Solver:
    """A scheduler ready to run `num_steps` steps; `reset()` before every sampling run."""

    name: str
    scheduler: object
    num_steps: int
    learned_variance: bool  # the scheduler consumes DiT's variance channels (DDPM only)
    model_timesteps: list[int] | None = None  # respaced chains: index -> training-scale t
    step_kwargs: dict = field(default_factory=dict)

    def reset(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Reset solver state; return (scheduler timesteps, model timesteps), both (n,) on CPU.

        Scheduler timesteps stay on the CPU so solvers' `if t > 0` checks never sync a GPU.
        """
        self.scheduler.set_timesteps(self.num_steps)
        steps = self.scheduler.timesteps
        if self.model_timesteps is None:
            return steps, steps.clone()
        table = torch.tensor(self.model_timesteps)
        return steps, table[steps.long()]

    @property
    def init_noise_sigma(self) -> float:
        return float(self.scheduler.init_noise_sigma)


def check_solver_args(name: str, steps, eta: float = 0.0, spacing: str | None = None,
                      num_train_timesteps: int = 1000) -> None:
    """Raise ValueError on a bad sampler setting, before any model is built."""
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserError(f"sampler.steps={steps!r}: must be an integer >= 1")
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
        raise UserError(f"sampler.eta={eta!r}: must be a finite number >= 0")
    allowed = {"ddpm": RESPACED_SPACINGS, "ddim": RESPACED_SPACINGS + (LDM_SPACING,)}.get(name, DIFFUSERS_SPACINGS)
    if spacing is not None and spacing not in allowed:
        raise UserError(f"sampler.spacing={spacing!r} for {name}: allowed {', '.join(allowed)}")
    if spacing == LDM_SPACING and num_train_timesteps % steps:
        # CompVis takes range(0, T, T // N), which is not N steps then; refuse rather than differ
        raise UserError(f"sampler.spacing=ldm needs sampler.steps dividing {num_train_timesteps} (CompVis's "
                         f"uniform DDIM discretisation); got steps={steps}")


def build_solver(
    name: str,
    steps: int,
    schedule: NoiseSchedule = NoiseSchedule(),
    *,
    learned_variance: bool = False,
    eta: float = 0.0,
    spacing: str | None = None,
) -> Solver:
    """Build a solver.

    learned_variance: the denoiser outputs [eps, v] (DiT with learn_sigma). DDPM then
    samples with ADM's learned-range variance; other solvers use eps only. Without it
    DDPM uses the fixed-large variance DiT's `create_diffusion` picks for such models.
    """
    T = schedule.num_train_timesteps
    check_solver_args(name, steps, eta, spacing, T)
    if name == "ddim" and spacing == LDM_SPACING:
        # an even stride with offset 1 over the full chain: diffusers' DDIM steps it exactly
        # (prev = t - T // N; the last step's alpha_prev is alphas_cumprod[0], set_alpha_to_one=False)
        scheduler = DDIMScheduler(num_train_timesteps=T, trained_betas=schedule.betas().tolist(), clip_sample=False,
                                  timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)
        return Solver(name, scheduler, steps, False, None, {"eta": float(eta)})
    if name in ("ddpm", "ddim"):
        spacing = spacing or "adm"
        kept = space_timesteps(T, f"ddim{steps}" if spacing == "ddim" else str(steps))
        common = dict(
            num_train_timesteps=len(kept),
            trained_betas=respaced_betas(schedule.betas(), kept).tolist(),
            clip_sample=False,  # DiT samples with clip_denoised=False
            timestep_spacing="leading",
            steps_offset=0,
        )
        if name == "ddpm":
            variance = "learned_range" if learned_variance else "fixed_large"
            scheduler = DDPMScheduler(variance_type=variance, **common)
            return Solver(name, scheduler, len(kept), learned_variance, kept)
        scheduler = DDIMScheduler(set_alpha_to_one=True, **common)
        return Solver(name, scheduler, len(kept), False, kept, {"eta": float(eta)})

    common = dict(
        num_train_timesteps=T,
        trained_betas=schedule.betas().tolist(),
        timestep_spacing=spacing or "linspace",
    )
    if name == "dpmpp_2m":
        scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **common)
    else:
        scheduler = EulerDiscreteScheduler(**common)
    return Solver(name, scheduler, steps, False)
