"""A sampling run through a diffusers pipeline (model configs with `kind: pipeline`).

The pipeline's own `__call__` samples (text encoding, denoising loop, decoding); this module
loads it from `model.source` (a hub id or a local `save_pretrained` folder), applies the
`accel.pipeline` entries, calls it with the prompts, and writes the same files as a native
run. Like `run.py` it imports no technique package: each `accel.pipeline` entry names its
functions by `_target_` (e.g. `tstitch.stitch_pipeline`, `tgate.apply_tgate`):

    accel:
      pipeline:
        tstitch:
          _target_: tstitch.stitch_pipeline   # called as _target_(pipe, **the other keys)
          remove: tstitch.unstitch_pipeline   # called as remove(pipe) after the run (optional)
          check: tstitch.check_stitch_settings  # called as check(**the other keys) before loading (optional)
          small: nota-ai/bk-sdm-tiny
          ratio: 0.4

Values that are themselves `{_target_: ...}` nodes are built first (e.g. `config:
{_target_: tgate.TGateConfig, gate_step: 10}`), so bad settings fail before any loading.
Sample k uses its own generator seeded `seed + k` (diffusers draws each row's noise from
its generator), so images do not depend on the batch size.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from diffusion.compile import CompileStats, compile_denoiser
from diffusion.errors import UserError
from diffusion.finite import check_finite_latents
from diffusion.outputs import save_grid, save_json, save_npz, save_sample_pngs
from diffusion.seeding import sample_generators
from runs.config_keys import config_keys_of
from runs.generate import check_counts
from runs.speed import Speed
from runs.techniques import check_techniques, label, ordered

log = logging.getLogger(__name__)

INPUT_KINDS = ("prompt", "image")  # what one sample is conditioned on: a text prompt, or an image (SVD)


def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _build(value):
    """Nested `{_target_: ...}` dicts called (depth first); other values as they are."""
    if isinstance(value, dict):
        value = {k: _build(v) for k, v in value.items()}
        if "_target_" in value:
            return get_method(value.pop("_target_"))(**value)
        return value
    if isinstance(value, list):
        return [_build(v) for v in value]
    return value


class PipelineAccel:
    """One `accel.pipeline` entry: `apply(pipe, **settings)` before the run, `remove(pipe)` after;
    settings checked on construction (`check(**settings)`, nested targets built)."""

    def __init__(self, name: str, node):
        entry = dict(_plain(node))
        if "_target_" not in entry:
            raise UserError(f"accel.pipeline.{name}: needs a `_target_` (the function that applies it to a pipeline)")
        self.name = name
        self.apply_fn = get_method(entry.pop("_target_"))
        remove, check = entry.pop("remove", None), entry.pop("check", None)
        self.remove_fn = get_method(remove) if remove else None
        self.settings = _build(entry)
        if check:
            get_method(check)(**self.settings)

    def apply(self, pipe):
        self.apply_fn(pipe, **self.settings)

    def remove(self, pipe):
        if self.remove_fn is not None:
            self.remove_fn(pipe)


def build_pipeline_accels(cfg: DictConfig) -> list[PipelineAccel]:
    """The run's `accel.pipeline` entries, settings built (and so checked) without a pipeline, in the
    techniques' order (runs.techniques.ORDER: T-Stitch's denoiser first, then the techniques that hook it)."""
    check_techniques(cfg, pipeline=True)  # technique x model refusals, one line each
    built = []
    for name, node in ordered(cfg.accel.get("pipeline")):
        with config_keys_of(node):  # `gate_step=...` -> `accel.tgate.gate_step=...`
            built.append(PipelineAccel(name, node))
    return built


def sample_inputs(cfg: DictConfig, root: Path | None = None) -> list:
    """(num_samples,) the prompt (or conditioning image path) of every sample, used cyclically."""
    kind = cfg.model.get("input", "prompt")
    if kind not in INPUT_KINDS:
        raise UserError(f"model.input={kind!r}: must be one of {INPUT_KINDS}")
    key = "prompts" if kind == "prompt" else "images"
    values, path = cfg.get(key), cfg.get(f"{key}_file")
    if values is not None and path is not None:
        raise UserError(f"give {key}=[...] or {key}_file=PATH, not both")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{key}_file={str(path)!r}: no such file (one {kind} per line)")
        values = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    values = [str(v) for v in (values or [])]
    if not values:
        raise UserError(f"model {cfg.model.name!r} samples from {kind}s: give {key}=[...] or {key}_file=PATH "
                         f"(one {kind} per line), e.g. {key}='[\"an astronaut riding a horse\"]'")
    return [values[k % len(values)] for k in range(cfg.num_samples)]


# pipeline call arguments the run sets per batch: a model.call entry for them would break the count
RUNNER_CALL_KEYS = ("num_images_per_prompt", "prompt", "image", "generator", "output_type")


def call_arguments(cfg: DictConfig) -> dict:
    """The pipeline call's settings: model.call, with sampler.steps / sampler.cfg_scale when set."""
    args = dict(_plain(cfg.model.get("call") or {}))
    for key in RUNNER_CALL_KEYS:  # the run makes one image per sample and names it by its index
        if key in args and not (key == "num_images_per_prompt" and args[key] == 1):
            raise UserError(f"model.call.{key}={args[key]!r}: set by the run itself (one image per sample, "
                            "num_samples and batch_size count them); remove it from model.call")
    steps, scale = cfg.sampler.get("steps"), cfg.sampler.get("cfg_scale")
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise UserError(f"sampler.steps={steps!r}: must be an integer >= 1 (or null: the model's default)")
        args["num_inference_steps"] = steps
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale) or scale < 0:
            raise UserError(f"sampler.cfg_scale={scale!r}: must be a number >= 0 (or null: the model's default)")
        args["guidance_scale"] = float(scale)
    if cfg.get("negative_prompt") is not None:
        args["negative_prompt"] = str(cfg.negative_prompt)
    size = cfg.model.get("image_size")
    if size is not None and cfg.model.get("input", "prompt") == "prompt":
        args.setdefault("height", int(size))
        args.setdefault("width", int(size))
    return args


def check_pipeline_config(cfg: DictConfig) -> tuple[list, dict, list[PipelineAccel]]:
    """Every check that needs no pipeline: (inputs per sample, call arguments, accel entries)."""
    if cfg.sampler.name != "pipeline":
        raise UserError(f"model {cfg.model.name!r} is a diffusers pipeline, sampled with its own scheduler: "
                         f"use sampler=pipeline (sampler.scheduler=<diffusers class> swaps it), not "
                         f"sampler={cfg.sampler.name}, which drives native models")
    if not cfg.pretrained:
        raise UserError("pretrained=false: pipelines load their weights from model.source (a hub id or a local "
                         "folder); random weights are for native models")
    if not cfg.model.get("source"):
        raise UserError(f"model {cfg.model.name!r}: model.source must name a hub id or a local pipeline folder")
    check_counts(cfg.num_samples, cfg.batch_size)
    inputs = sample_inputs(cfg)
    args = call_arguments(cfg)
    accels = build_pipeline_accels(cfg)
    return inputs, args, accels


def pipeline_dtype(name: str | None, precision: str, device: torch.device) -> torch.dtype:
    """The pipeline's torch_dtype from `model.dtype` and the `precision` setting (not resolved).

    precision=auto keeps model.dtype (its auto: float16 on CUDA, float32 elsewhere); bf16 / fp16 /
    fp32 / tf32 set the type (tf32 and fp32: float32), and an explicit model.dtype that disagrees is
    refused rather than silently overridden."""
    explicit = None
    if name not in (None, "auto"):
        explicit = getattr(torch, str(name), None)
        if not isinstance(explicit, torch.dtype) or not explicit.is_floating_point:
            raise UserError(f"model.dtype={name!r}: use auto, float32, float16 or bfloat16")
    if precision == "auto":
        return explicit or (torch.float16 if device.type == "cuda" else torch.float32)
    wanted = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    if explicit is not None and explicit != wanted:
        raise UserError(f"precision={precision} runs the pipeline in {str(wanted).removeprefix('torch.')}, but "
                         f"model.dtype={name}: set model.dtype=auto (or precision=auto to keep model.dtype)")
    return wanted


def compile_pipeline(pipe, mode: str, backend: str, compile_mode: str = "default") -> None:
    """compile=regional: each denoiser's repeated blocks (its class's `_repeated_blocks`, or our table
    diffusion.compile.REPEATED_BLOCKS for SD3, PixArt, DiT), one compiled region per model (the stitched
    models too); full: each denoiser whole. In place, lazy."""
    if mode == "none":
        return
    denoiser = _denoiser(pipe)
    models = getattr(denoiser, "models", None)  # a stitched denoiser holds several
    for model in (list(models) if isinstance(models, torch.nn.ModuleList) else [denoiser]):
        compile_denoiser(model, mode, backend, compile_mode)


def load_pipeline(model_cfg: DictConfig, scheduler: str | None, device: torch.device, precision: str = "auto"):
    """`pipeline_class.from_pretrained(source)` with the config's components and dtype, on `device`."""
    dtype = pipeline_dtype(model_cfg.get("dtype", "auto"), precision, device)
    source = str(model_cfg.source)
    local = Path(source)
    if (local.is_absolute() or source.startswith(".")) and not local.is_dir():
        raise UserError(f"model.source={source!r}: no such folder")
    kwargs = dict(_plain(model_cfg.get("load") or {}))
    for name, node in (_plain(model_cfg.get("components")) or {}).items():
        node = dict(node)
        node.setdefault("torch_dtype", dtype)
        kwargs[name] = _build(node)
    cls = get_method(model_cfg.get("pipeline_class") or "diffusers.DiffusionPipeline")
    pipe = cls.from_pretrained(source, torch_dtype=dtype, **kwargs)
    scheduler = scheduler or model_cfg.get("scheduler")
    if scheduler:
        pipe.scheduler = get_method(scheduler).from_config(pipe.scheduler.config)
    return pipe.to(device)


def _to_uint8(images) -> np.ndarray:
    """Pipeline output (output_type="np": (B, H, W, 3) floats in [0, 1]; videos (B, F, H, W, 3))
    -> (B, H, W', 3) uint8, a video's frames side by side."""
    images = np.asarray(images)
    if images.ndim == 5:
        images = np.concatenate(list(images.transpose(1, 0, 2, 3, 4)), axis=2)
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def _load_image(path: str):
    from PIL import Image

    if not Path(path).is_file():
        raise UserError(f"conditioning image {path!r}: no such file")
    return Image.open(path).convert("RGB")


def _denoiser(pipe):
    for name in ("unet", "transformer"):
        if getattr(pipe, name, None) is not None:
            return getattr(pipe, name)
    return None


def run_pipeline_from_config(cfg: DictConfig, out_dir: str | Path, device: torch.device) -> dict:
    """Sample `cfg.num_samples` images through the model's pipeline into out_dir; returns the metrics."""
    inputs, args, accels = check_pipeline_config(cfg)
    speed = Speed.from_config(cfg, device)  # bad precision / compile values fail here, before loading
    precision = cfg.get("precision", "auto")
    pipeline_dtype(cfg.model.get("dtype", "auto"), precision, device)  # a disagreeing model.dtype too
    kind = cfg.model.get("input", "prompt")
    images_in = {p: _load_image(p) for p in set(inputs)} if kind == "image" else None
    pipe = load_pipeline(cfg.model, cfg.sampler.get("scheduler"), device, precision)
    pipe.set_progress_bar_config(disable=not cfg.progress)
    with speed.matmuls():
        return _sample_pipeline(cfg, pipe, inputs, args, accels, images_in, out_dir, device, speed)


def _sample_pipeline(cfg: DictConfig, pipe, inputs, args, accels, images_in, out_dir, device, speed: Speed) -> dict:
    kind = cfg.model.get("input", "prompt")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("sampling %d images with the %s pipeline (%s), accel=%s, on %s into %s", cfg.num_samples,
             type(pipe).__name__, cfg.model.source, label(cfg.accel), device, out_dir)
    applied = []
    images, seconds, steps_per_model, stitch_rule, compiled = [], 0.0, None, {}, CompileStats()
    try:
        for accel in accels:
            accel.apply(pipe)
            applied.append(accel)
        compile_pipeline(pipe, speed.compile, speed.backend, speed.compile_mode)  # after the accels: stitched ones too
        starts = range(0, cfg.num_samples, cfg.batch_size)
        for start in tqdm(starts, desc="batches", disable=not cfg.progress or len(starts) == 1):
            indices = list(range(start, min(start + cfg.batch_size, cfg.num_samples)))
            batch = [inputs[k] for k in indices]
            conditioning = {"prompt": batch} if kind == "prompt" else {"image": [images_in[p] for p in batch]}
            generators = sample_generators(cfg.seed, indices, device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            with compiled:
                out = pipe(**conditioning, generator=generators, output_type="np", **args)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds += time.perf_counter() - t0
            raw = out.images if hasattr(out, "images") else out.frames  # (B, H, W, 3) or (B, F, H, W, 3) floats
            # NaN/inf anywhere in a sample (an overflow in fp16, bad weights): stop before its batch is written
            check_finite_latents(torch.as_tensor(np.asarray(raw)), indices, [str(cfg.model.name)])
            batch_images = _to_uint8(raw)
            save_sample_pngs(batch_images, indices, out_dir)
            images.append(batch_images)
            denoiser = _denoiser(pipe)
            if hasattr(denoiser, "steps_per_model"):  # a stitched denoiser: what ran in this call, by which rule
                steps_per_model = denoiser.steps_per_model()
                stitch_rule = {"tstitch_rule": denoiser.rule, "tstitch_timestep_form": denoiser.timestep_form}
    finally:
        for accel in reversed(applied):
            accel.remove(pipe)
    seconds -= compiled.seconds  # compiling happened inside the first calls: reported apart
    images = np.concatenate(images)
    save_grid(images, out_dir / "grid.png")
    prompt_index = {p: i for i, p in enumerate(dict.fromkeys(inputs))}
    save_npz(images, np.array([prompt_index[p] for p in inputs]), out_dir / "samples.npz")
    save_json({"inputs": list(dict.fromkeys(inputs)), "per_sample": [prompt_index[p] for p in inputs]},
              out_dir / f"{kind}s.json")
    metrics = {
        # the whole pipeline call: text encoding, the denoising loop and decoding (without compiling)
        "sampling_seconds": seconds,
        "num_images": len(images),
        "images_per_second": len(images) / max(seconds, 1e-9),
        "steps": args.get("num_inference_steps"),
        "cfg_scale": args.get("guidance_scale"),
        "steps_per_model": steps_per_model,
        **stitch_rule,
        "pipeline": type(pipe).__name__,
        "scheduler": type(pipe.scheduler).__name__,
        "source": str(cfg.model.source),
        "sampler": cfg.sampler.name,
        "accel": label(cfg.accel),  # every listed technique, in the order applied: tstitch+tgate
        "seed": int(cfg.seed),
        "device": str(device),
        "image_size": [int(images.shape[1]), int(images.shape[2])],
        **speed.as_metrics(),  # precision: the TF32 setting resolved (auto -> tf32 on CUDA); dtype: the pipeline's
        "dtype": str(_denoiser(pipe).dtype).removeprefix("torch."),
        **compiled.as_metrics(),
    }
    save_json(metrics, out_dir / "metrics.json")
    log.info("%d images in %.2f s of pipeline calls (%.3f images/s), steps per model %s", metrics["num_images"],
             seconds, metrics["images_per_second"], steps_per_model)
    return metrics
