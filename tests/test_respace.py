"""ADM respacing: the timestep sets DiT's numbers were sampled with."""
import numpy as np
import pytest

from diffusion.respace import respaced_betas, space_timesteps


def adm_space_timesteps(num_timesteps, count):
    """Our reading of guided-diffusion's respace.space_timesteps for one section "N"."""
    frac_stride = 1 if count <= 1 else (num_timesteps - 1) / (count - 1)
    cur_idx, taken = 0.0, []
    for _ in range(count):
        taken.append(round(cur_idx))
        cur_idx += frac_stride
    return set(taken)


@pytest.mark.parametrize("n", [10, 25, 50, 100, 250])
def test_space_timesteps_matches_adm(n):
    kept = space_timesteps(1000, str(n))
    assert kept == sorted(adm_space_timesteps(1000, n))
    assert len(kept) == n and kept[0] == 0 and kept[-1] == 999


def test_hundred_steps_are_not_an_even_stride():
    # DiT's "100" is round(k * 999 / 99), not 0, 10, ..., 990
    assert space_timesteps(1000, "100") == [round(k * 999 / 99) for k in range(100)]
    assert space_timesteps(1000, "100") != list(range(0, 1000, 10))
    assert space_timesteps(1000, "ddim100") == list(range(0, 1000, 10))


def test_sections_and_errors():
    assert space_timesteps(10, "2,3") == [0, 4, 5, 7, 9]  # sections [0,5) and [5,10)
    with pytest.raises(ValueError, match="cannot take 11 steps"):
        space_timesteps(10, "11")
    with pytest.raises(ValueError, match="integer stride"):
        space_timesteps(1000, "ddim999")


def test_respaced_chain_keeps_cumulative_alphas():
    betas = np.linspace(1e-4, 0.02, 1000)
    kept = space_timesteps(1000, "25")
    new = respaced_betas(betas, kept)
    np.testing.assert_allclose(np.cumprod(1 - new), np.cumprod(1 - betas)[kept], rtol=1e-12)
