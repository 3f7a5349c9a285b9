"""T-GATE's schedule against tables written out by hand from the reference README settings."""
import pytest

from tgate import Action, TGateConfig, TGateHook, gate_actions, gate_table

C, K, M, R = Action.COMPUTE, Action.CACHE, Action.CACHE_CFG_MEAN, Action.REUSE

# SD-XL, 25 steps, g10 sp5 fi1 wu2: self-attention computed at 0, 1; cached at the warm-up
# step 2 and at 5 (5 % 5 == 0); reused at 3, 4, 6, 7, 8; step 9 caches the CFG means;
# from 10 on one branch, cross-attention reused, self-attention recomputed every step.
SDXL_SELF = [C, C, K, R, R, K, R, R, R, M] + [K] * 15
SDXL_CROSS = [C] * 9 + [M] + [R] * 15
SDXL_GUIDED = [True] * 10 + [False] * 15

# PixArt, 25 steps, g15 sp3 fi1 wu2: cached at 2, 3, 6, 9, 12 (multiples of 3 after the
# warm-up), reused at 4, 5, 7, 8, 10, 11, 13; means at 14; one branch from 15 on.
PIXART_SELF = [C, C, K, K, R, R, K, R, R, K, R, R, K, R, M] + [K] * 10
PIXART_CROSS = [C] * 14 + [M] + [R] * 10
PIXART_GUIDED = [True] * 15 + [False] * 10


def _columns(table):
    return [a.self_attn for a in table], [a.cross_attn for a in table], [a.guidance for a in table]


def test_sdxl_readme_setting():
    table = gate_table(25, gate_step=10, sp_interval=5, fi_interval=1, warm_up=2)
    assert _columns(table) == (SDXL_SELF, SDXL_CROSS, SDXL_GUIDED)
    assert [s for s, a in enumerate(table) if a.self_attn is R] == [3, 4, 6, 7, 8]


def test_pixart_readme_setting():
    table = gate_table(25, gate_step=15, sp_interval=3, fi_interval=1, warm_up=2)
    assert _columns(table) == (PIXART_SELF, PIXART_CROSS, PIXART_GUIDED)
    assert [s for s, a in enumerate(table) if a.self_attn is R] == [4, 5, 7, 8, 10, 11, 13]


def test_fidelity_interval_reuses_between_refreshes():
    table = gate_table(8, gate_step=3, sp_interval=1, fi_interval=2, warm_up=0)
    # s=0 is the warm-up cache, 1 cached (1 % 1 == 0), 2 = g-1 means, then cached on even steps
    assert [a.self_attn for a in table] == [K, K, M, R, K, R, K, R]
    assert [a.cross_attn for a in table] == [C, C, M, R, R, R, R, R]


def test_lcm_setting_keeps_shapes_and_never_guides():
    table = gate_table(4, gate_step=1, sp_interval=1, fi_interval=1, warm_up=0, lcm=True)
    assert _columns(table) == ([K, K, K, K], [K, R, R, R], [False] * 4)


def test_gate_past_the_last_step_is_plain_cross_attention_and_full_guidance():
    table = gate_table(10, gate_step=11, sp_interval=1, fi_interval=1, warm_up=0)
    assert all(a.cross_attn is C and a.guidance for a in table)
    # with sp_interval 1 self-attention is cached but never reused: gating is off
    assert all(a.self_attn in (C, K) for a in table)


def test_config_without_cfg_batch_caches_the_output_itself():
    config = TGateConfig(gate_step=3, sp_interval=1, warm_up=0)
    assert config.actions(2, use_cfg=True).self_attn is M
    assert config.actions(2, use_cfg=False).self_attn is K  # cfg_scale 1: no halves to average


@pytest.mark.parametrize("kwargs,message", [
    (dict(gate_step=0), r"tgate gate_step=0: must be an integer >= 1"),
    (dict(gate_step=-3), r"tgate gate_step=-3: must be an integer >= 1"),
    (dict(gate_step=2.5), r"tgate gate_step=2.5: must be an integer >= 1"),
    (dict(sp_interval=0), r"tgate sp_interval=0: must be an integer >= 1"),
    (dict(fi_interval=0), r"tgate fi_interval=0: must be an integer >= 1"),
    (dict(fi_interval=True), r"tgate fi_interval=True: must be an integer >= 1"),
    (dict(warm_up=-1), r"tgate warm_up=-1: must be an integer >= 0"),
    (dict(lcm="yes"), r"tgate lcm='yes': must be true or false"),
    (dict(branch="both"), r"tgate branch='both': must be one of \('cond', 'uncond'\)"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TGateConfig(**kwargs)
    with pytest.raises(ValueError, match=message):
        TGateHook(**kwargs)


def test_bad_step_is_refused():
    with pytest.raises(ValueError, match=r"step s=-1: must be an integer >= 0"):
        gate_actions(-1, 10, 5, 1, 2)


def test_lcm_with_a_guidance_batch_is_refused():
    config = TGateConfig(gate_step=1, sp_interval=1, warm_up=0, lcm=True)
    config.check_guidance(use_cfg=False)
    with pytest.raises(ValueError, match=r"lcm=true, but this run uses classifier-free guidance.*cfg_scale=1"):
        config.check_guidance(use_cfg=True)
