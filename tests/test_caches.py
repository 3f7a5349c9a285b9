"""diffusers' six caches on the native DiT (caches/): what our harness adds to diffusers' hooks.

On the shipped digits pair (trained: a random DiT's residuals would not say whether a cache skips),
20 DDIM steps, 4 samples: each cache skips work, repeats itself, and leaves the plain model bitwise
when removed; state is reset per trajectory; T-GATE's gate and T-Stitch's switch; MagCache's files.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from caches import (
    FasterCacheHook,
    FirstBlockCacheHook,
    MagCacheHook,
    PABHook,
    SeaCacheHook,
    TaylorSeerHook,
)
from diffusion import NoiseSchedule, build_solver, sample
from diffusion.errors import UserError
from dit import build_dit
from tgate import TGateHook
from tstitch import TStitchHook

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20


@pytest.fixture(scope="module")
def pair():
    def load(size, depth, hidden, heads):
        arch = {"depth": depth, "hidden_size": hidden, "num_heads": heads, "patch_size": 2}
        return build_dit("digits", input_size=8, num_classes=10, in_channels=1, arch=arch,
                         ckpt=ROOT / f"checkpoints/digits/digits_{size}.pt").eval()
    return load("s", 4, 64, 2), load("l", 8, 128, 4)


def solver():
    return build_solver("ddim", STEPS, NoiseSchedule())


def run(models, hooks=(), seed=0, n=4):
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 1, 8, 8, generator=gen)
    y = torch.arange(n) % 10
    return sample(models, solver(), noise, {"y": y}, {"y": torch.full_like(y, 10)}, cfg_scale=1.5,
                  hooks=list(hooks), progress=False).latents


@pytest.fixture(scope="module")
def calibration(pair, tmp_path_factory):
    """A MagCache calibration of the digits pair at 20 steps (the large model alone, then stitched)."""
    path = tmp_path_factory.mktemp("cal") / "digits20.json"
    small, large = pair
    for models, extra in (([large], []), ([small, large], [TStitchHook(ratio=0.4)])):
        hook = MagCacheHook(calibration=str(path), calibrate=True)
        hooks = [*extra, hook]
        for h in hooks:
            h.attach(models, ["S", "L"][-len(models):], solver())
        run(models, hooks)
        for h in hooks:
            h.detach()
    return path


CACHES = {
    "first_block_cache": lambda cal: FirstBlockCacheHook(threshold=0.2),
    "taylorseer": lambda cal: TaylorSeerHook(),
    "mag_cache": lambda cal: MagCacheHook(calibration=str(cal)),
    "faster_cache": lambda cal: FasterCacheHook(),
    "pab": lambda cal: PABHook(),
    "sea_cache": lambda cal: SeaCacheHook(),
}


def attach(hooks, models, names):
    for h in hooks:
        h.attach(models, names, solver())


def detach(hooks):
    for h in hooks:
        h.detach()


@pytest.mark.parametrize("name", sorted(CACHES))
def test_each_cache_skips_work_repeats_itself_and_leaves_the_model_plain(pair, calibration, name):
    _, large = pair
    plain = run([large])
    hook = CACHES[name](calibration)
    attach([hook], [large], ["L"])
    first, second = run([large], [hook]), run([large], [hook])
    detach([hook])
    assert plain.abs().max() > 0.1
    assert not torch.equal(first, plain)                 # the cache acted
    assert torch.equal(first, second)                    # state reset per trajectory
    assert torch.equal(run([large]), plain)              # removed: the plain model, bitwise
    assert not hasattr(large, "_diffusers_hook") and "forward" not in large.blocks[0].__dict__
    m = hook.metrics([1], 8)
    plain_passes = 2 * 8 * STEPS * 4 / 4                 # 2 CFG rows x 8 blocks x steps, per image (x2 calls / 8)
    if name in ("pab", "faster_cache"):
        assert m["cache_attention_computed_per_image"] < plain_passes
    else:
        assert m["cache_blocks_computed_per_image"] < plain_passes
    # close to plain (the digits pair's 8x8 latents are in [-1, 1])
    assert (first - plain).abs().mean() < 0.2


@pytest.mark.parametrize("name", sorted(CACHES))
def test_a_later_trajectory_equals_a_fresh_one(pair, calibration, name):
    """Batch 2 of a run (hook state from batch 1) equals batch 1 of a run started at its seed."""
    _, large = pair
    hook = CACHES[name](calibration)
    attach([hook], [large], ["L"])
    run([large], [hook], seed=1)
    later = run([large], [hook], seed=2)
    detach([hook])
    fresh_hook = CACHES[name](calibration)
    attach([fresh_hook], [large], ["L"])
    fresh = run([large], [fresh_hook], seed=2)
    detach([fresh_hook])
    assert torch.equal(later, fresh)


def test_without_the_reset_diffusers_state_leaks_into_the_next_trajectory(pair, monkeypatch):
    """What `start` fixes: TaylorSeer's step counter and factors carry over when nobody resets them."""
    _, large = pair
    hook = TaylorSeerHook()
    attach([hook], [large], ["L"])
    monkeypatch.setattr(hook, "reset_model", lambda index: None)  # neither at start nor at end
    first, second = run([large], [hook]), run([large], [hook])
    detach([hook])
    assert not torch.equal(first, second)


@pytest.mark.parametrize("name", ["first_block_cache", "taylorseer", "mag_cache", "sea_cache", "pab"])
def test_tgate_halving_the_batch_opens_a_fresh_context(pair, calibration, name):
    """After the gate one branch runs at B rows: the cache continues in a context of its own ("cond"),
    empty, and is reset at T-GATE's refresh steps; repeatable and different from T-GATE alone."""
    _, large = pair
    names = []
    import caches.harness as harness
    real = harness._set_cache_context

    def spy(module, context):
        if context is not None:
            names.append(context.name)
        real(module, context)

    tgate = TGateHook(gate_step=10, sp_interval=1, warm_up=0, branch="cond")
    attach([tgate], [large], ["L"])
    alone = run([large], [tgate])
    hook = CACHES[name](calibration)
    attach([hook], [large], ["L"])
    harness._set_cache_context = spy
    try:
        a, b = run([large], [tgate, hook]), run([large], [tgate, hook])
    finally:
        harness._set_cache_context = real
    detach([hook, tgate])
    assert torch.equal(a, b) and not torch.equal(a, alone)
    if hook.uses_contexts:
        assert names[:10] == ["cfg"] * 10 and names[10:20] == ["cond"] * 10


def test_faster_cache_refuses_guidance_truncation(pair):
    _, large = pair
    tgate, hook = TGateHook(gate_step=10, sp_interval=1, warm_up=0, branch="cond"), FasterCacheHook()
    attach([tgate, hook], [large], ["L"])
    try:
        with pytest.raises(UserError, match="faster_cache needs both CFG branches"):
            run([large], [tgate, hook])
    finally:
        detach([hook, tgate])


@pytest.mark.parametrize("name", sorted(CACHES))
def test_with_tstitch_each_model_keeps_its_own_cache(pair, calibration, name):
    small, large = pair
    stitch, hook = TStitchHook(ratio=0.4), CACHES[name](calibration)
    attach([stitch, hook], [small, large], ["S", "L"])
    a, b = run([small, large], [stitch, hook]), run([small, large], [stitch, hook])
    counts = hook.metrics([1, 1], 4)["cache_counts_per_model"]
    detach([stitch, hook])
    assert torch.equal(a, b)
    # steps x CFG rows x calls
    assert counts["S"]["rows_asked"] == 8 * 8 * 2 and counts["L"]["rows_asked"] == 12 * 8 * 2
    # the large model's state is its own: the first state it meets is empty (the small model's contexts
    # live in the small model's hooks), so it computes its first step in full
    owned = [{id(h) for _, h in hook_owned} for hook_owned in hook._owned] if hook._owned else None
    assert owned is None or not (owned[0] & owned[1])


def test_large_model_starts_empty_at_the_switch(pair):
    """FirstBlockCache: the large model's first step (the switch) computes all its blocks."""
    small, large = pair
    stitch, hook = TStitchHook(ratio=0.4), FirstBlockCacheHook(threshold=10.0)  # would skip every step it could
    attach([stitch, hook], [small, large], ["S", "L"])
    run([small, large], [stitch, hook], n=1)
    counts = hook.metrics([1, 1], 1)["cache_counts_per_model"]
    detach([stitch, hook])
    # with a threshold no change reaches, only each model's first step runs all blocks, later ones block 0
    assert counts["S"]["block_rows"] == 2 * (4 + 7 * 1)
    assert counts["L"]["block_rows"] == 2 * (8 + 11 * 1)


def test_mag_cache_calibration_file_and_errors(pair, calibration, tmp_path):
    table = json.loads(calibration.read_text())
    assert table["steps"] == STEPS and set(table["models"]) == {"L", "S"}
    assert table["models"]["L"][0] is None and all(r is not None for r in table["models"]["L"][1:])
    with pytest.raises(UserError, match=r"accel.mag_cache.calibration='nope'.*calibrate=true"):
        MagCacheHook(calibration="nope")
    hook = MagCacheHook(calibration=str(calibration))
    with pytest.raises(UserError, match="has no ratios for XL"):
        hook.attach([pair[1]], ["XL"], solver())


def test_registry_api_is_where_we_pinned_it():
    """diffusers' private API we build on (pyproject pins diffusers>=0.42,<0.43): fail loudly if it moves."""
    from diffusers.hooks import _helpers, faster_cache, hooks, mag_cache, pyramid_attention_broadcast
    from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS, _ATTENTION_CLASSES

    registry = _helpers.TransformerBlockRegistry
    registry._register()
    assert isinstance(registry._registry, dict) and "blocks" in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS
    assert _ATTENTION_CLASSES
    fields = _helpers.TransformerBlockMetadata.__dataclass_fields__
    assert {"return_hidden_states_index", "return_encoder_hidden_states_index", "hidden_states_argument_name",
            "_cached_parameter_indices"} <= set(fields)
    assert callable(hooks._set_cache_context) and "sigma" in hooks.CacheContext.__dataclass_fields__
    assert callable(pyramid_attention_broadcast._apply_pyramid_attention_broadcast_on_attention_class)
    assert callable(faster_cache._apply_faster_cache_on_attention_class)
    assert callable(mag_cache.nearest_interp)


def test_our_dit_block_is_registered_by_its_marker(pair):
    from diffusers.hooks._helpers import TransformerBlockRegistry

    from caches.registry import register_native_blocks

    _, large = pair
    register_native_blocks(large)
    meta = TransformerBlockRegistry.get(type(large.blocks[0]))
    assert meta.hidden_states_argument_name == "x" and meta.return_encoder_hidden_states_index is None


@pytest.mark.parametrize("hook, message", [
    (lambda: FirstBlockCacheHook(threshold=-1), "accel.first_block_cache.threshold=-1"),
    (lambda: TaylorSeerHook(cache_interval=0), "accel.taylorseer.cache_interval=0"),
    (lambda: PABHook(spatial_skip=None, cross_skip=None), "accel.pab"),
    (lambda: SeaCacheHook(residual_order=2), "accel.sea_cache.residual_order=2"),
    (lambda: FasterCacheHook(spatial_range=[1]), "accel.faster_cache.spatial_range"),
])
def test_bad_settings_fail_in_one_line(hook, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        hook()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["taylorseer", "first_block_cache"])
def test_recompiles_do_not_grow_with_the_steps_under_regional_compile(name):
    """compile=regional (aot_eager): the harness and the counters add no per-step guard (counts are
    tensors added in place, not Python ints read in the compiled block)."""
    from diffusion.compile import CompileStats, compile_denoiser
    from dit.models import DiT

    from conftest import randomize

    counts = []
    for steps in (10, 20):
        torch._dynamo.reset()
        model = randomize(DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=3, num_heads=2,
                              num_classes=10).eval())
        run_solver = build_solver("ddim", steps, NoiseSchedule())
        hook = CACHES[name](None)
        hook.attach([model], ["m"], run_solver)
        compile_denoiser(model, "regional", "aot_eager")
        with CompileStats() as stats:
            sample(model, run_solver, torch.randn(2, 1, 8, 8), {"y": torch.tensor([1, 2])},
                   {"y": torch.tensor([10, 10])}, cfg_scale=1.5, hooks=[hook], progress=False)
        hook.detach()
        counts.append(stats.recompiles)
    torch._dynamo.reset()
    assert counts[0] == counts[1] and counts[0] < 8, counts
