"""The caches on tiny PixArt, SD3 and Flux pipelines (caches.pipelines): run or refuse in one line,
repeat themselves across calls, and leave the stock pipeline when removed."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from caches.pipelines import apply_cache, remove_cache
from diffusion.errors import UserError
from runs.run import run_from_config

import tiny_mmdit as m
import tiny_pipelines as tp

PIXART = dict(prompt="a photo of a cat", negative_prompt="blurry", num_inference_steps=8, guidance_scale=4.5,
              height=16, width=16, output_type="latent", use_resolution_binning=False, clean_caption=False)
MMDIT = dict(prompt=m.PROMPT, height=m.IMAGE_SIZE, width=m.IMAGE_SIZE, output_type="latent",
             max_sequence_length=m.MAX_TOKENS, num_inference_steps=8)


def _pixart():
    pipe = tp.pixart_alpha(0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


PIPES = {"pixart": (_pixart, PIXART), "sd3": (lambda: m.sd3_pipeline(0), MMDIT),
         "flux": (lambda: m.flux_pipeline(0), MMDIT)}
SETTINGS = {"first_block_cache": {"threshold": 0.5}}
REFUSED = {("sd3", "first_block_cache"): "context_pre_only", ("sd3", "sea_cache"): "context_pre_only",
           ("flux", "sea_cache"): "packed into tokens", ("flux", "faster_cache"): "guidance-distilled"}
# SeaCache runs on PixArt but its budget is not reached in 8 steps of a random model: it computes every step
RUNS_PLAIN = {("pixart", "sea_cache")}


@pytest.fixture(scope="module")
def pipes():
    return {name: make() for name, (make, _) in PIPES.items()}


def call(pipes, name):
    return pipes[name](**PIPES[name][1], generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("pipe_name", sorted(PIPES))
@pytest.mark.parametrize("cache", ["first_block_cache", "taylorseer", "faster_cache", "pab", "sea_cache", "mag_cache"])
def test_cache_on_a_pipeline_repeats_itself_or_refuses_in_one_line(pipes, pipe_name, cache):
    pipe = pipes[pipe_name]
    plain = call(pipes, pipe_name)
    if cache == "mag_cache" or (pipe_name, cache) in REFUSED:
        with pytest.raises(UserError, match=REFUSED.get((pipe_name, cache), "calibration per pipeline")) as error:
            apply_cache(pipe, cache, **SETTINGS.get(cache, {}))
        assert "\n" not in str(error.value)
        assert type(pipe).__name__ == type(pipe).__mro__[0].__name__ and not hasattr(type(pipe), "_cache_handle")
        return
    handle = apply_cache(pipe, cache, **SETTINGS.get(cache, {}))
    try:
        first, second = call(pipes, pipe_name), call(pipes, pipe_name)
        counts = handle.hook.metrics(None, 1)
    finally:
        remove_cache(pipe)
    assert torch.equal(first, second)                     # reset per call: the second call is the first
    assert torch.equal(call(pipes, pipe_name), plain)     # removed: the stock pipeline, bitwise
    assert plain.abs().max() > 0
    if (pipe_name, cache) in RUNS_PLAIN:
        assert torch.equal(first, plain)
    else:
        assert not torch.equal(first, plain)
        plain_passes = counts["cache_counts_per_model"][next(iter(counts["cache_counts_per_model"]))]["rows_asked"]
        work = counts["cache_counts_per_model"][next(iter(counts["cache_counts_per_model"]))]
        assert work["block_rows"] < plain_passes * 4 or work["attention_rows"] < work["block_rows"] * 2 \
            or work["rows_taken"] < work["rows_asked"]


def test_a_cache_through_the_configs_on_a_pixart_folder(compose_sample, tmp_path_factory, tmp_path):
    folder = tp.save_tiny("pixart_alpha", tmp_path_factory.mktemp("tiny"))
    base = ["model=pixart_alpha", "sampler=pipeline", f"model.source={folder}", "model.image_size=16",
            "sampler.steps=6", "num_samples=2", "batch_size=2", f"prompts={json.dumps(['a cat', 'a dog'])}",
            "progress=false", "num_threads=1", "device=cpu", "model.text_length=8",
            "+model.call.use_resolution_binning=false", "+model.call.clean_caption=false"]
    metrics = run_from_config(compose_sample(*base, "accel=taylorseer", "accel.taylorseer.disable_cache_before_step=2",
                                             "accel.taylorseer.cache_interval=2"), tmp_path / "ts")
    assert metrics["accel"] == "taylorseer"
    run_from_config(compose_sample(*base), tmp_path / "plain")
    a, b = (np.load(tmp_path / x / "samples.npz")["arr_0"] for x in ("ts", "plain"))
    assert np.abs(a.astype(int) - b.astype(int)).max() > 0
    with pytest.raises(UserError, match="mag_cache on diffusers pipelines"):
        run_from_config(compose_sample(*base, "accel=mag_cache"), tmp_path / "mc")
