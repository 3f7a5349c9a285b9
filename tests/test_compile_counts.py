"""torch.compile's real counts (dynamo's own records) and a graph set that does not grow with the steps:
one compiled region per model, T-GATE's decisions outside the compiled code, the batch dimension dynamic;
the recompile limit reported when it is hit; compile_mode; regional compile of diffusers transformers
that list no `_repeated_blocks` (SD3, PixArt, Flux)."""
from __future__ import annotations

import logging

import pytest
import torch

from runs.run import run_from_config

REGIONAL = ["compile=regional", "compile_backend=aot_eager"]  # aot_eager: the same graphs, compiled in seconds
# the shipped digits pair (real weights: real trajectories), few samples
DIGITS = ["+exp=digits_stitch_0.4", "num_samples=4", "batch_size=4", "progress=false"]
THREE = ["accel=[tstitch,tgate]", "+model@accel.models.base=digits_s",
         "accel.models.base.name=DiT-digits-S-again", "accel.tstitch.fractions=[0.3,0.3,0.4]"]
# S -> S (another model object, so its own compiled region) -> L
TECHNIQUES = {  # each technique's default settings (T-GATE's gate_step 15: past the end at 10 steps)
    "tgate": ["accel=tgate"],
    "tgate_keep_guidance": ["accel=tgate", "accel.tgate.gate_step=${sampler.steps}"],
    "tstitch": [],
    "tstitch_tgate": ["accel=[tstitch,tgate]"],
    "three_models_tgate": THREE,
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _counts(metrics) -> tuple:
    return metrics["compiled_graphs"], metrics["recompiles"], metrics["recompile_limit_hit"]


def _counts_at(compose_sample, tmp_path, extra, steps_list) -> dict:
    counts = {}
    for steps in steps_list:
        torch._dynamo.reset()
        metrics = run_from_config(compose_sample(*DIGITS, *extra, *REGIONAL, f"sampler.steps={steps}"),
                                  tmp_path / str(steps))
        counts[steps] = _counts(metrics)
    return counts


@pytest.mark.slow
@pytest.mark.parametrize("technique", sorted(TECHNIQUES))
def test_real_counts_do_not_depend_on_the_steps(compose_sample, tmp_path, technique):
    counts = _counts_at(compose_sample, tmp_path, TECHNIQUES[technique], (10, 20, 50))
    assert counts[10] == counts[20] == counts[50], counts
    assert counts[10][0] >= 2 and counts[10][2] is False


def test_three_stitched_models_with_tgate_stay_under_the_limit(compose_sample, tmp_path):
    """Three models, T-GATE's gate reached at 20 steps but not at 10: the same graphs, no recompile."""
    counts = _counts_at(compose_sample, tmp_path, THREE, (10, 20))
    assert counts[10] == counts[20], counts
    graphs, recompiles, hit = counts[20]
    # per model: the block before and after the gated attention, the attention itself
    assert (graphs, recompiles, hit) == (9, 0, False)


def test_a_lowered_limit_is_hit_and_said_once(compose_sample, tmp_path, caplog):
    """One image per batch: after the gate the batch is 1, which dynamo specialises (a recompile); with
    recompile_limit=1 that recompile is refused and the run says so."""
    one = [*DIGITS, "accel=tgate", "accel.tgate.gate_step=5", "sampler.steps=8", "num_samples=1", "batch_size=1",
           *REGIONAL]
    free = run_from_config(compose_sample(*one), tmp_path / "free")
    assert free["recompiles"] >= 1 and free["recompile_limit_hit"] is False
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=1), caplog.at_level(logging.WARNING, "diffusion.compile"):
        limited = run_from_config(compose_sample(*one), tmp_path / "limited")
    assert limited["recompile_limit_hit"] is True and limited["recompiles"] < free["recompiles"]
    warnings = [r for r in caplog.records if r.name == "diffusion.compile" and "recompile_limit" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()


def test_gated_compiled_digits_equal_gated_eager_and_differ_from_plain(compose_sample, tmp_path, run_latents):
    gated = [*DIGITS, "accel=[tstitch,tgate]", "sampler.steps=20", "accel.tgate.gate_step=10"]
    run_from_config(compose_sample(*gated), tmp_path / "eager")
    compiled = run_from_config(compose_sample(*gated, *REGIONAL), tmp_path / "compiled")
    run_from_config(compose_sample(*DIGITS, "sampler.steps=20"), tmp_path / "plain")
    eager, latents = run_latents(tmp_path / "eager"), run_latents(tmp_path / "compiled")
    assert compiled["compiled_graphs"] >= 2
    assert (latents - eager).abs().max() < 1e-5
    assert (run_latents(tmp_path / "plain") - eager).abs().max() > 1e-3


def test_compile_mode_is_recorded_and_reduce_overhead_on_a_cpu_runs_as_default(compose_sample, tmp_path, caplog):
    common = [*DIGITS, "accel=none", "sampler.steps=4", *REGIONAL]
    autotune = run_from_config(compose_sample(*common, "compile_mode=max-autotune"), tmp_path / "autotune")
    assert autotune["compile_mode"] == "max-autotune"
    with caplog.at_level(logging.WARNING, "diffusion.compile"):
        cpu = run_from_config(compose_sample(*common, "compile_mode=reduce-overhead"), tmp_path / "cpu")
    assert cpu["compile_mode"] == "default"
    assert any("reduce-overhead needs CUDA" in r.getMessage() for r in caplog.records)


def test_an_unknown_compile_mode_is_refused_before_any_work(compose_sample, tmp_path):
    with pytest.raises(ValueError, match=r"compile_mode='fast': allowed values are default, reduce-overhead, "
                                         r"max-autotune"):
        run_from_config(compose_sample(*DIGITS, "compile_mode=fast"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_kept_tensors_are_cloned_only_under_cuda_graphs(monkeypatch):
    import diffusion.compile as compile_module

    t = torch.ones(2)
    assert compile_module.kept(t) is t
    monkeypatch.setattr(compile_module, "_cuda_graphs", True)
    copy = compile_module.kept(t)
    assert copy is not t and torch.equal(copy, t)
