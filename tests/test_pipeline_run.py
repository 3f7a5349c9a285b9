"""scripts/sample.py on diffusers pipelines (model configs with kind: pipeline), with tiny
pipeline folders saved offline: files, per-sample seeds, T-Stitch through accel.pipeline, bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from runs.run import run_from_config

import tiny_sd as t
from conftest import CONFIGS

ROOT = CONFIGS.parent
PROMPTS = ["a squirrel in the park", "a red car"]
EVENTS = []  # what the probe accel entry saw, in order


def probe_apply(pipe, tag):
    EVENTS.append(("apply", tag, type(pipe).__name__))


def probe_remove(pipe):
    EVENTS.append(("remove", type(pipe).__name__))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny SD pipeline folder, the same pipeline with a smaller UNet, and that UNet alone."""
    root = tmp_path_factory.mktemp("pipelines")
    small = t.sd_unet(seed=7, widths=(8, 16))
    t.sd_pipeline(seed=0).save_pretrained(root / "large")
    t.sd_pipeline(seed=0, unet=small).save_pretrained(root / "small_pipe")
    small.save_pretrained(root / "small_unet")
    return root


def _overrides(folders, *extra, source="large"):
    return ["model=sd15", "sampler=pipeline", f"model.source={folders / source}", "model.image_size=16",
            "sampler.steps=4", "num_samples=3", "batch_size=2", f"prompts={json.dumps(PROMPTS)}", "progress=false",
            "num_threads=1", "device=cpu", *extra]


def _direct(folder, k, steps=4):
    """Sample k as the pipeline makes it when called alone with generator seed 0 + k."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPTS[k % 2], num_inference_steps=steps, guidance_scale=7.5, height=16, width=16, output_type="np",
               generator=torch.Generator().manual_seed(k)).images[0]
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def _pngs(folder):
    from PIL import Image

    return [np.asarray(Image.open(folder / f"{k:06d}.png")) for k in range(3)]


def test_sample_script_runs_a_pipeline_folder_and_writes_the_native_files(folders, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "scripts/sample.py", *_overrides(folders), f"hydra.run.dir={out}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    assert {"000000.png", "000001.png", "000002.png", "grid.png", "samples.npz", "metrics.json",
            "prompts.json"} <= names
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 3 and metrics["steps"] == 4 and metrics["pipeline"] == "StableDiffusionPipeline"
    assert metrics["sampling_seconds"] > 0 and metrics["steps_per_model"] is None
    npz = np.load(out / "samples.npz")
    assert npz["arr_0"].shape == (3, 16, 16, 3) and list(npz["arr_1"]) == [0, 1, 0]
    # sample k is the pipeline's own output for prompt k % 2 and generator seed + k, whatever the batching
    pngs = _pngs(out)
    for k in range(3):
        assert (pngs[k] == _direct(folders / "large", k)).all()
        assert (npz["arr_0"][k] == pngs[k]).all()


def test_images_do_not_depend_on_the_batch_size(compose_sample, folders, tmp_path):
    run_from_config(compose_sample(*_overrides(folders, "batch_size=1")), tmp_path / "b1")
    run_from_config(compose_sample(*_overrides(folders, "batch_size=3")), tmp_path / "b3")
    assert all((a == b).all() for a, b in zip(_pngs(tmp_path / "b1"), _pngs(tmp_path / "b3"), strict=True))


def test_stitched_run_ends_equal_the_plain_runs_and_the_split_is_recorded(compose_sample, folders, tmp_path):
    stitch = ["accel=tstitch", f"family.stitch.small.source={folders / 'small_unet'}"]
    metrics = run_from_config(compose_sample(*_overrides(folders, *stitch, "accel.tstitch.ratio=0.5")),
                              tmp_path / "mid")
    assert metrics["steps_per_model"] == {str(folders / "small_unet"): 2, "large": 2} or \
        list(metrics["steps_per_model"].values()) == [2, 2]
    assert metrics["accel"] == "tstitch" and metrics["pipeline"] == "StableDiffusionPipeline"
    run_from_config(compose_sample(*_overrides(folders)), tmp_path / "large")
    run_from_config(compose_sample(*_overrides(folders, source="small_pipe")), tmp_path / "small")
    # a whole pipeline folder as the small model: its unet/ is used
    stitch_pipe = ["accel=tstitch", f"family.stitch.small.source={folders / 'small_pipe'}"]
    run_from_config(compose_sample(*_overrides(folders, *stitch_pipe, "accel.tstitch.ratio=0")), tmp_path / "r0")
    run_from_config(compose_sample(*_overrides(folders, *stitch, "accel.tstitch.ratio=1")), tmp_path / "r1")
    for k, (r0, large) in enumerate(zip(_pngs(tmp_path / "r0"), _pngs(tmp_path / "large"), strict=True)):
        assert (r0 == large).all(), k
    for k, (r1, small) in enumerate(zip(_pngs(tmp_path / "r1"), _pngs(tmp_path / "small"), strict=True)):
        assert (r1 == small).all(), k
    mid, large = _pngs(tmp_path / "mid"), _pngs(tmp_path / "large")
    assert not all((a == b).all() for a, b in zip(mid, large, strict=True))


def test_accel_pipeline_entries_are_applied_before_and_removed_after(compose_sample, folders, tmp_path):
    EVENTS.clear()
    probe = ["+accel.pipeline.probe._target_=test_pipeline_run.probe_apply", "+accel.pipeline.probe.tag=x",
             "+accel.pipeline.probe.remove=test_pipeline_run.probe_remove",
             "accel=tstitch", f"family.stitch.small.source={folders / 'small_unet'}"]
    run_from_config(compose_sample(*_overrides(folders, *probe)), tmp_path / "out")
    # entries apply in runs.techniques.ORDER (tstitch, then techniques it does not know), removed in reverse
    assert EVENTS == [("apply", "x", "TStitchStableDiffusionPipeline"), ("remove", "TStitchStableDiffusionPipeline")]


@pytest.mark.parametrize("extra, message", [
    (["sampler=ddim"], r"model 'SD-1.5' is a diffusers pipeline, sampled with its own scheduler: use sampler=pipeline"),
    (["prompts=null"], r"model 'SD-1.5' samples from prompts: give prompts=\[...\] or prompts_file=PATH"),
    (["prompts=null", "prompts_file=/nonexistent/p.txt"], r"prompts_file='/nonexistent/p.txt': no such file"),
    (["+accel.hooks.probe._target_=tstitch.TStitchHook"], r"accel=probe: probe acts on the native sampler only"),
    (["pretrained=false"], r"pretrained=false: pipelines load their weights from model.source"),
    (["model.source=/nonexistent/sd"], r"model.source='/nonexistent/sd': no such folder"),
    (["sampler.steps=0"], r"sampler.steps=0: must be an integer >= 1"),
    (["accel=tstitch", "accel.tstitch.ratio=1.5"], r"^accel.tstitch.ratio=1.5: the small model's fraction"),
    (["accel=tgate", "accel.tgate.gate_step=0"], r"^accel.tgate.gate_step=0: must be an integer >= 1"),
    (["+model.call.num_images_per_prompt=2"], r"model.call.num_images_per_prompt=2: set by the run itself"),
])
def test_bad_input_fails_before_anything_is_loaded_or_written(compose_sample, folders, tmp_path, extra, message):
    cfg = compose_sample(*_overrides(folders, *extra))
    with pytest.raises(ValueError, match=message):
        run_from_config(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_prompts_file_is_read_one_prompt_per_line(compose_sample, folders, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n")
    run_from_config(compose_sample(*_overrides(folders, "prompts=null", f"prompts_file={path}")), tmp_path / "f")
    saved = json.loads((tmp_path / "f" / "prompts.json").read_text())
    assert saved == {"inputs": PROMPTS, "per_sample": [0, 1, 0]}


def test_svd_samples_from_conditioning_images_and_writes_frames_side_by_side(compose_sample, tmp_path):
    from PIL import Image

    folder, image = tmp_path / "svd", tmp_path / "cond.png"
    t.svd_pipeline(seed=0).save_pretrained(folder)
    Image.fromarray((np.random.RandomState(0).rand(16, 16, 3) * 255).astype(np.uint8)).save(image)
    cfg = compose_sample("model=svd", "sampler=pipeline", f"model.source={folder}", "model.load.variant=null",
                         "model.call.num_inference_steps=2", "model.call.height=16", "model.call.width=16",
                         "+model.call.num_frames=3", "model.call.decode_chunk_size=3",
                         f"images=[{image}]", "num_samples=2", "batch_size=1", "progress=false", "device=cpu")
    metrics = run_from_config(cfg, tmp_path / "out")
    npz = np.load(tmp_path / "out" / "samples.npz")
    assert npz["arr_0"].shape == (2, 16, 3 * 16, 3)  # 3 frames of 16x16, side by side
    assert metrics["pipeline"] == "StableVideoDiffusionPipeline" and metrics["num_images"] == 2
    assert not (npz["arr_0"][0] == npz["arr_0"][1]).all()  # seeds 0 and 1
    with pytest.raises(ValueError, match=r"model 'SVD-XT' samples from images: give images=\[...\]"):
        run_from_config(compose_sample("model=svd", "sampler=pipeline", f"model.source={folder}"), tmp_path / "x")


def test_tgate_on_a_pipeline_through_the_configs_equals_apply_tgate(compose_sample, folders, tmp_path):
    from diffusers import StableDiffusionPipeline

    from tgate import TGateConfig, apply_tgate

    gate = ["accel=tgate", "accel.tgate.gate_step=2", "accel.tgate.sp_interval=1", "accel.tgate.warm_up=0"]
    metrics = run_from_config(compose_sample(*_overrides(folders, *gate)), tmp_path / "gated")
    assert metrics["accel"] == "tgate"
    pipe = StableDiffusionPipeline.from_pretrained(folders / "large", safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    apply_tgate(pipe, TGateConfig(gate_step=2, sp_interval=1, fi_interval=1, warm_up=0, branch="uncond"))
    gated = _pngs(tmp_path / "gated")
    for k in range(3):
        out = pipe(PROMPTS[k % 2], num_inference_steps=4, guidance_scale=7.5, height=16, width=16, output_type="np",
                   generator=torch.Generator().manual_seed(k)).images[0]
        assert (gated[k] == (np.clip(out, 0, 1) * 255).round().astype(np.uint8)).all(), k
    plain = [_direct(folders / "large", k) for k in range(3)]
    assert not all((a == b).all() for a, b in zip(gated, plain, strict=True))  # the gate acted


def test_stitched_and_gated_pipeline_run(compose_sample, folders, tmp_path):
    both = ["accel=[tstitch,tgate]", f"family.stitch.small.source={folders / 'small_unet'}", "accel.tstitch.ratio=0.5",
            "accel.tgate.gate_step=2", "accel.tgate.sp_interval=1", "accel.tgate.warm_up=0"]
    metrics = run_from_config(compose_sample(*_overrides(folders, *both)), tmp_path / "both")
    assert list(metrics["steps_per_model"].values()) == [2, 2]
    stitched = ["accel=tstitch", f"family.stitch.small.source={folders / 'small_unet'}", "accel.tstitch.ratio=0.5"]
    run_from_config(compose_sample(*_overrides(folders, *stitched)), tmp_path / "stitched")
    assert not all((a == b).all() for a, b in zip(_pngs(tmp_path / "both"), _pngs(tmp_path / "stitched"), strict=True))


def test_precision_sets_the_pipeline_dtype_and_a_disagreeing_model_dtype_is_refused(compose_sample, folders, tmp_path):
    bf16 = run_from_config(compose_sample(*_overrides(folders, "precision=bf16")), tmp_path / "bf16")
    auto = run_from_config(compose_sample(*_overrides(folders)), tmp_path / "auto")
    assert (bf16["precision"], bf16["dtype"]) == ("bf16", "bfloat16")
    assert (auto["precision"], auto["dtype"]) == ("fp32", "float32")  # model.dtype=auto on a CPU
    assert not all((a == b).all() for a, b in zip(_pngs(tmp_path / "bf16"), _pngs(tmp_path / "auto"), strict=True))
    with pytest.raises(ValueError, match=r"precision=bf16 runs the pipeline in bfloat16, but model.dtype=float16"):
        run_from_config(compose_sample(*_overrides(folders, "precision=bf16", "model.dtype=float16")), tmp_path / "x")
    with pytest.raises(ValueError, match=r"precision='half': allowed values are auto, fp32"):
        run_from_config(compose_sample(*_overrides(folders, "precision=half")), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_regional_compile_of_a_pipeline_is_its_unets_compile_repeated_blocks(compose_sample, folders, tmp_path):
    torch._dynamo.reset()
    eager = run_from_config(compose_sample(*_overrides(folders)), tmp_path / "eager")
    compiled = run_from_config(compose_sample(*_overrides(folders, "compile=regional", "compile_backend=aot_eager")),
                               tmp_path / "compiled")
    torch._dynamo.reset()
    assert compiled["compile"] == "regional" and compiled["compiled_graphs"] >= 1 and eager["compiled_graphs"] == 0
    assert all((a == b).all() for a, b in zip(_pngs(tmp_path / "compiled"), _pngs(tmp_path / "eager"), strict=True))


def test_a_pipeline_batch_with_nan_stops_the_run_before_it_is_written(compose_sample, folders, tmp_path, monkeypatch):
    """Sample 1's image comes out NaN (as an fp16 overflow would): the run stops naming it, writes none of
    its batch's PNGs and no done marker; the plain run of the same config writes them."""
    from diffusers import UNet2DConditionModel

    from diffusion.finite import NonFiniteSamplesError

    cfg = compose_sample(*_overrides(folders))
    run_from_config(cfg, tmp_path / "plain")
    assert (tmp_path / "plain" / "000001.png").is_file()

    real_forward = UNet2DConditionModel.forward

    def nan_in_sample_1(self, sample, *args, **kwargs):
        out = real_forward(self, sample, *args, **kwargs)
        noise = out[0] if isinstance(out, tuple) else out.sample
        noise[1::2] = float("nan")  # rows of sample 1 in the CFG batch [uncond 0, uncond 1, cond 0, cond 1]
        return out

    monkeypatch.setattr(UNet2DConditionModel, "forward", nan_in_sample_1)
    with pytest.raises(NonFiniteSamplesError, match=r"samples \[1\] came out NaN/inf .*SD-1.5"):
        run_from_config(cfg, tmp_path / "nan")
    assert not list((tmp_path / "nan").glob("0*.png")) and not (tmp_path / "nan" / "done").exists()
