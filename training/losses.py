"""The ADM / DiT training loss: eps MSE, plus the variational bound for a learned variance.

Facts from Nichol & Dhariwal 2021 (ADM, "improved DDPM") as DiT trains with them
(`create_diffusion(timestep_respacing="")`: linear betas, learn_sigma, rescaled MSE):

* x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t uniform in [0, T).
* The model returns [eps_hat, v] over its channels. The variance interpolates in log
  space between the posterior variance (lower bound) and beta_t (upper bound):
  log var = frac * log beta_t + (1 - frac) * log beta_tilde_t, frac = (v + 1) / 2.
* loss = mean((eps - eps_hat)^2) + L_vb * T / 1000, where L_vb is the KL between the
  true posterior q(x_{t-1} | x_t, x_0) and p(x_{t-1} | x_t) in bits per dimension
  (at t = 0 the discretised decoder NLL), with eps_hat *detached*: the bound trains
  the variance only, the MSE trains the mean ("hybrid" objective, lambda = 1 at T = 1000).
Without learn_sigma the loss is the MSE alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffusion.errors import UserError
from diffusion.solvers import NoiseSchedule


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """(N, ...) -> (N,): mean over every dimension but the batch."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log p(x) of data quantised to 256 levels in [-1, 1] under N(mean, e^(2 log_scale)), elementwise.

    Each level owns a bin of width 2/255; the edge levels own the tails. ADM uses a tanh
    approximation of the normal CDF; this uses the exact one (torch.special.ndtr).
    """
    inv_std = torch.exp(-log_scale)
    centered = x - mean
    cdf_plus = torch.special.ndtr(inv_std * (centered + 1.0 / 255))
    cdf_min = torch.special.ndtr(inv_std * (centered - 1.0 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))               # lowest level: P(X < x + 1/255)
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))  # highest level: P(X > x - 1/255)
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _gather(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table (T,) float64, t (N,) -> (N, 1, 1, ...) in like's dtype/device, broadcastable to like."""
    out = table.to(like.device)[t].to(like.dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


@dataclass
class DiffusionLoss:
    """Training loss over a NoiseSchedule; call with a denoiser `model(x_t, t, y)`."""

    schedule: NoiseSchedule = NoiseSchedule()
    learn_sigma: bool = True

    def __post_init__(self):
        betas = torch.from_numpy(self.schedule.betas())                 # (T,) float64
        self.num_timesteps = len(betas)
        abar = torch.cumprod(1.0 - betas, dim=0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        self.betas = betas
        self.sqrt_abar = abar.sqrt()
        self.sqrt_one_minus_abar = (1.0 - abar).sqrt()
        self.sqrt_recip_abar = (1.0 / abar).sqrt()
        self.sqrt_recipm1_abar = (1.0 / abar - 1.0).sqrt()
        # q(x_{t-1} | x_t, x_0) = N(c1 x_0 + c2 x_t, beta_tilde_t)
        posterior_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        # beta_tilde_0 = 0: ADM clips the log at t = 0 to the t = 1 value
        self.posterior_log_var = torch.log(torch.cat([posterior_var[1:2], posterior_var[1:]]))
        self.posterior_c1 = betas * abar_prev.sqrt() / (1.0 - abar)
        self.posterior_c2 = (1.0 - abar_prev) * (1.0 - betas).sqrt() / (1.0 - abar)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return _gather(self.sqrt_abar, t, x0) * x0 + _gather(self.sqrt_one_minus_abar, t, x0) * noise

    def q_posterior(self, x0, x_t, t):
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = _gather(self.posterior_c1, t, x_t) * x0 + _gather(self.posterior_c2, t, x_t) * x_t
        return mean, _gather(self.posterior_log_var, t, x_t)

    def p_mean_logvar(self, eps: torch.Tensor, v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """The model's p(x_{t-1} | x_t) from its eps and variance-interpolation outputs
        (no clipping, as in training)."""
        min_log = _gather(self.posterior_log_var, t, x_t)
        max_log = _gather(torch.log(self.betas), t, x_t)
        frac = (v + 1.0) / 2.0
        log_var = frac * max_log + (1.0 - frac) * min_log
        x0_hat = _gather(self.sqrt_recip_abar, t, x_t) * x_t - _gather(self.sqrt_recipm1_abar, t, x_t) * eps
        mean, _ = self.q_posterior(x0_hat, x_t, t)
        return mean, log_var

    def vb_bits(self, x0, x_t, t, eps, v) -> torch.Tensor:
        """(N,) L_vb term of each sample in bits/dim: KL for t > 0, decoder NLL at t = 0."""
        true_mean, true_log_var = self.q_posterior(x0, x_t, t)
        mean, log_var = self.p_mean_logvar(eps, v, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def __call__(self, model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, **cond) -> dict:
        """x0 (N, C, H, W) data in [-1, 1], t (N,) int64, noise like x0.

        Returns {"loss", "mse", "vb"}, each (N,) per sample (average them for the step).
        """
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, t, **cond)                                     # (N, C or 2C, H, W)
        c = x0.shape[1]
        eps = out[:, :c]
        mse = mean_flat((noise - eps) ** 2)
        if not self.learn_sigma:
            return {"loss": mse, "mse": mse, "vb": torch.zeros_like(mse)}
        if out.shape[1] != 2 * c:
            raise UserError(f"learn_sigma: the model must return 2 x {c} channels, got {out.shape[1]}")
        # eps detached: the bound must not pull the mean away from the MSE optimum
        vb = self.vb_bits(x0, x_t, t, eps.detach(), out[:, c:]) * (self.num_timesteps / 1000.0)
        return {"loss": mse + vb, "mse": mse, "vb": vb}
