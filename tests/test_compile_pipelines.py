"""compile=regional on diffusers transformers that list no `_repeated_blocks` (SD3, PixArt; Flux lists its
own): their blocks compiled through our name table, one region per model, with T-GATE and T-Stitch; the
compiled images equal the eager ones of the same technique, which differ from the plain ones."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion.compile import CompiledForward, CompileStats
from runs.pipeline_run import compile_pipeline
from tgate import TGateConfig, apply_tgate, remove_tgate
from tstitch import stitch_pipeline, unstitch_pipeline

import tiny_mmdit as m
import tiny_pipelines as t

# latents, not images: a random-weight pipeline's images differ by little between variants
MMDIT_CALL = dict(height=m.IMAGE_SIZE, width=m.IMAGE_SIZE, output_type="latent", max_sequence_length=m.MAX_TOKENS)
PIXART_CALL = dict(output_type="latent", height=16, width=16, use_resolution_binning=False, clean_caption=False,
                   max_sequence_length=8)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _images(pipe, steps=6, **call):
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red fox", num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **call).images
    return torch.as_tensor(out).float()


def _blocks(model, name):
    return [b for b in model.modules() if type(b).__name__ == name]


def _eager_then_compiled(build, apply, call):
    """Images of (plain, technique eager, technique compiled) from three pipelines of the same weights,
    and the compiled pipeline (its denoiser)."""
    plain = _images(build(), **call)
    eager_pipe = build()
    apply(eager_pipe)
    eager = _images(eager_pipe, **call)
    pipe = build()
    apply(pipe)
    compile_pipeline(pipe, "regional", "aot_eager")
    with CompileStats() as stats:
        compiled = _images(pipe, **call)
    return plain, eager, compiled, pipe, stats


def _check(plain, eager, compiled, stats):
    assert stats.graphs >= 1 and stats.limit_hits == 0
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    # measured: compiled equals eager bitwise; the technique moves the latents by 1.6e-4 (tiny PixArt, T-GATE)
    # to 0.3 (stitched SD3 / Flux)
    assert rel(compiled, eager) < 1e-6
    assert rel(plain, eager) > 5e-5  # the technique acts


def test_pixart_with_tgate_compiles_its_basic_transformer_blocks():
    config = TGateConfig(gate_step=3, sp_interval=2, fi_interval=1, warm_up=1, branch="cond")
    plain, eager, compiled, pipe, stats = _eager_then_compiled(
        lambda: t.pixart_alpha(seed=0), lambda p: apply_tgate(p, config), PIXART_CALL)
    blocks = _blocks(pipe.transformer, "BasicTransformerBlock")
    assert blocks and all(isinstance(b.forward, CompiledForward) for b in blocks)
    _check(plain, eager, compiled, stats)
    remove_tgate(pipe)


def test_sd3_with_tgate_truncation_compiles_its_joint_blocks():
    config = TGateConfig(gate_step=3, cache_attention=False, branch="cond")
    plain, eager, compiled, pipe, stats = _eager_then_compiled(
        lambda: m.sd3_pipeline(seed=0), lambda p: apply_tgate(p, config), MMDIT_CALL)
    blocks = _blocks(pipe.transformer, "JointTransformerBlock")
    assert blocks and all(isinstance(b.forward, CompiledForward) for b in blocks)
    _check(plain, eager, compiled, stats)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_stitched_mmdit_pipelines_compile_each_model_regionally(family):
    if family == "sd3":
        build, small, names = m.sd3_pipeline, lambda: m.sd3_transformer(seed=7, num_layers=1), ["JointTransformerBlock"]
    else:
        build, small = m.flux_pipeline, lambda: m.flux_transformer(seed=7, num_layers=1)
        names = ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
    plain, eager, compiled, pipe, stats = _eager_then_compiled(
        lambda: build(seed=0), lambda p: stitch_pipeline(p, small(), ratio=0.5), MMDIT_CALL)
    for model in pipe.transformer.models:
        for name in names:
            blocks = _blocks(model, name)
            assert blocks and all(isinstance(b.forward, CompiledForward) for b in blocks)
    _check(plain, eager, compiled, stats)
    unstitch_pipeline(pipe)


def test_sd_unet_with_deep_cache_compiles_and_equals_eager():
    """DeepCache's part replays sit inside the U-Net's compiled blocks: their decision stays eager."""
    from deep_cache import apply_deep_cache

    import tiny_sd

    call = dict(output_type="latent", height=32, width=32)
    plain, eager, compiled, pipe, stats = _eager_then_compiled(
        lambda: tiny_sd.sd_pipeline(0), lambda p: apply_deep_cache(p, cache_interval=3, cache_branch_id=0), call)
    assert any(isinstance(b.forward, CompiledForward) for b in pipe.unet.modules() if "forward" in vars(b))
    _check(plain, eager, compiled, stats)


def test_sd35_through_the_configs_compiles_regionally(compose_sample, tmp_path):
    """`model=sd35_large sampler=pipeline compile=regional` on a tiny saved SD3 pipeline, with T-GATE's
    guidance truncation: the same images as eager, the joint blocks compiled, the limit not hit."""
    import json

    from PIL import Image

    from runs.run import run_from_config

    m.sd3_pipeline(seed=0).save_pretrained(tmp_path / "sd3")
    common = ["model=sd35_large", "sampler=pipeline", f"model.source={tmp_path / 'sd3'}", "model.dtype=float32",
              "model.image_size=16", "sampler.steps=4", "num_samples=2", "batch_size=2",
              f"prompts={json.dumps(['a red fox', 'a blue car'])}", "progress=false", "num_threads=1", "device=cpu",
              "accel=tgate", "accel.tgate.gate_step=2"]
    eager = run_from_config(compose_sample(*common), tmp_path / "eager")
    compiled = run_from_config(compose_sample(*common, "compile=regional", "compile_backend=aot_eager"),
                               tmp_path / "compiled")
    assert eager["compiled_graphs"] == 0 and compiled["compiled_graphs"] >= 1
    assert compiled["recompile_limit_hit"] is False and compiled["compile_mode"] == "default"
    for k in range(2):
        a, b = (np.asarray(Image.open(tmp_path / run / f"{k:06d}.png")) for run in ("eager", "compiled"))
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
