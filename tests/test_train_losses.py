"""The ADM training loss: its pieces against their definitions."""
import math

import numpy as np
import pytest
import torch

from training.losses import DiffusionLoss, discretized_gaussian_log_likelihood, normal_kl


def test_discretized_likelihood_sums_to_one_over_the_256_levels():
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)           # the 8-bit values in [-1, 1]
    for mean, log_scale in ((0.1, math.log(0.3)), (-0.9, math.log(0.05)), (0.0, math.log(2.0))):
        logp = discretized_gaussian_log_likelihood(levels, torch.tensor(mean, dtype=torch.float64),
                                                   torch.tensor(log_scale, dtype=torch.float64))
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_vb_is_zero_for_the_true_eps_and_posterior_variance():
    """eps_hat = eps and v = -1 (frac 0: the posterior variance) make p equal to q: KL = 0."""
    loss = DiffusionLoss()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 1, 8, 8, generator=gen) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([1, 5, 50, 200, 400, 600, 800, 999])
    x_t = loss.q_sample(x0, t, noise)
    vb = loss.vb_bits(x0, x_t, t, noise, torch.full_like(x0, -1.0))
    assert vb.abs().max().item() < 1e-4
    # a wrong variance (the upper bound beta_t) costs something where beta_t and the posterior
    # variance differ, i.e. early; late in the chain the two bounds meet
    wrong = loss.vb_bits(x0, x_t, t, noise, torch.ones_like(x0))
    assert (wrong[:3] > 1e-4).all() and (wrong[1:] <= wrong[:-1]).all()


def test_normal_kl_matches_torch_distributions():
    m1, m2 = torch.tensor([0.3, -1.0]), torch.tensor([0.0, 0.5])
    lv1, lv2 = torch.tensor([-1.0, 0.2]), torch.tensor([0.4, -2.0])
    p = torch.distributions.Normal(m1, (0.5 * lv1).exp())
    q = torch.distributions.Normal(m2, (0.5 * lv2).exp())
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), torch.distributions.kl_divergence(p, q))


def test_loss_pieces_and_mse_only_without_learned_sigma():
    calls = []

    def model(x, t, y):
        calls.append(t)
        return torch.cat([torch.zeros_like(x), torch.zeros_like(x)], dim=1)  # eps_hat = 0, v = 0

    x0 = torch.zeros(4, 1, 8, 8)
    noise = torch.ones_like(x0)
    out = DiffusionLoss()(model, x0, torch.tensor([0, 10, 100, 999]), noise, y=torch.zeros(4, dtype=torch.long))
    np.testing.assert_allclose(out["mse"].numpy(), 1.0)                   # (1 - 0)^2
    torch.testing.assert_close(out["loss"], out["mse"] + out["vb"])
    plain = DiffusionLoss(learn_sigma=False)(lambda x, t, y: torch.zeros_like(x), x0, torch.tensor([3, 4, 5, 6]),
                                             noise, y=torch.zeros(4, dtype=torch.long))
    assert torch.equal(plain["loss"], plain["mse"]) and not plain["vb"].any()
    with pytest.raises(ValueError, match="2 x 1 channels"):
        DiffusionLoss()(lambda x, t, y: x, x0, torch.tensor([3, 4, 5, 6]), noise, y=torch.zeros(4, dtype=torch.long))
