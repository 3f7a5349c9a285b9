"""A sampling run from a composed Hydra config (configs/sample.yaml): check, build, sample, write.

Models and hooks are built through their configs' `_target_` (e.g. `dit.build_dit`,
`tstitch.TStitchHook`), so this module never imports a model or technique package.

`accel` lists techniques (runs/techniques.py: one config file each, combined by list,
`accel=[tstitch,tgate]`): their hooks (`accel.hooks`) are applied in runs.techniques.ORDER,
and T-Stitch's denoisers (`accel.models`) run before `model`, in order.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import torch
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from diffusion.checkpoint_files import checkpoint_setting
from diffusion.compile import CompileStats
from diffusion.context import SamplingPlan
from diffusion.errors import UserError
from diffusion.macs import count_macs, count_sampling_macs
from diffusion.outputs import save_json
from diffusion.random_weights import fill_zero_init_layers
from diffusion.sampler import check_cfg_scale
from diffusion.seeding import class_labels
from diffusion.solvers import NoiseSchedule, build_solver, check_solver_args
from diffusion.vae import load_first_stage
from runs.collect import RankResult, combine, first_steps, write_folder_outputs
from runs.config_keys import config_keys_of
from runs.devices import check_device
from runs.distributed import Dist, batches_for_rank
from runs.folder_lock import claim_folder
from runs.generate import check_counts, generate
from runs.resume import SampleFolder, grid_batches, samples_config
from runs.speed import Speed
from runs.techniques import check_techniques, label, ordered, stitched_models

log = logging.getLogger(__name__)

# keys of a model config that describe how to sample it, not how to build it
SAMPLING_KEYS = ("image_size", "guided_channels", "cond_key", "latent_factor")


def call_target(node, **extra):
    """Call a config node's `_target_` with its keys and `extra` (errors reach the user unwrapped,
    unlike hydra's instantiate, which wraps them)."""
    kwargs = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    target = get_method(kwargs.pop("_target_"))
    with config_keys_of(node):
        return target(**kwargs, **extra)


def model_configs(cfg: DictConfig) -> list[DictConfig]:
    """The run's denoiser configs in the order they run: accel.models... (T-Stitch's), then model."""
    return list(stitched_models(cfg.accel).values()) + [cfg.model]


def model_keys(cfg: DictConfig) -> list[str]:
    """The config keys of model_configs(cfg) as a user sets them: accel.models.<name>... (the family's partner,
    `${family.stitch.small}`, is set as family.stitch.small), then model."""
    keys = []
    for k in stitched_models(cfg.accel):
        node = cfg.accel.models._get_node(k)
        raw = str(node._value()) if node._is_interpolation() else ""
        keys.append(raw[2:-1] if raw.startswith("${") and raw.endswith("}") else f"accel.models.{k}")
    return keys + ["model"]


def model_names(configs) -> list[str]:
    """Display names, made unique ("DiT-S/2", "DiT-S/2#2") for metrics keys."""
    names = []
    for c in configs:
        name, k = str(c.name), 2
        while name in names:
            name, k = f"{c.name}#{k}", k + 1
        names.append(name)
    return names


def check_config(cfg: DictConfig) -> torch.Tensor:
    """Every check that needs no model, before any work; returns the class labels."""
    check_techniques(cfg, pipeline=False)  # technique x model refusals (DeepCache on a DiT, no partner, ...)
    for c in model_configs(cfg):
        if c.get("count_only", False):  # e.g. model=sdxl: an architecture for scripts/count_macs.py
            raise UserError(f"model {c.name!r} is an architecture config for scripts/count_macs.py only; "
                             "scripts/sample.py samples class-conditional models (DiT) for now")
        if c.get("kind") == "pipeline":  # e.g. a pipeline partner beside a native model
            raise UserError(f"accel={label(cfg.accel)} adds {c.name!r}, a diffusers pipeline model, to "
                             f"{cfg.model.name!r}, a native model; stitch native models of one latent space")
    check_counts(cfg.num_samples, cfg.batch_size)
    check_cfg_scale(cfg.sampler.cfg_scale)
    check_solver_args(cfg.sampler.name, cfg.sampler.steps, cfg.sampler.get("eta", 0.0), cfg.sampler.get("spacing"),
                      cfg.schedule.num_train_timesteps)
    labels = cfg.labels if cfg.labels is None else list(cfg.labels)
    return class_labels(cfg.seed, cfg.num_samples, cfg.model.num_classes, labels)


def build_hooks(cfg: DictConfig) -> list:
    """The accel hooks from their settings alone, so bad settings fail before any model is built; in the
    techniques' order (runs.techniques.ORDER), whatever the order of the accel list."""
    return [call_target(node) for _, node in ordered(cfg.accel.get("hooks"))]


def build_denoiser(model_cfg: DictConfig, input_size: int, pretrained: bool, device: torch.device | str,
                   keep_zero_init: bool = False):
    """Call the model config's `_target_` builder with its build keys.

    pretrained=False means random weights: any `ckpt` of the config is ignored, and the layers the
    model's init zeroes (DiT's adaLN-Zero) are drawn small and non-zero from torch's global stream,
    so the output depends on the input (diffusion/random_weights.py). keep_zero_init: keep the
    model's own init instead (training starts from it).
    """
    build_cfg = {k: v for k, v in OmegaConf.to_container(model_cfg, resolve=True).items() if k not in SAMPLING_KEYS}
    if not pretrained and "ckpt" in build_cfg:
        build_cfg["ckpt"] = None
    model = call_target(build_cfg, input_size=input_size, pretrained=pretrained)
    if not pretrained and not keep_zero_init:
        fill_zero_init_layers(model)
    return model.to(device).eval()


def _forward_macs(model, cond_key: str, latent_shape: tuple[int, int, int], rows: int) -> dict[str, int]:
    """MACs of one forward of a `meta` model at `rows` batch rows."""
    x, t = torch.zeros(rows, *latent_shape, device="meta"), torch.zeros(rows, device="meta")
    y = torch.zeros(rows, dtype=torch.long, device="meta")
    return count_macs(lambda: model(x, t, **{cond_key: y}))


def run_macs(cfg: DictConfig, configs, names, latent_shape: tuple[int, int, int], solver) -> tuple[list[int], int]:
    """Denoiser MACs (all ops): one plain forward at batch 1 per model, and one image over
    the whole run, CFG rows included.

    Counted on `meta` copies (built once, no weights, no memory) with a fresh set of the
    run's hooks, so hooks that skip work inside a model (T-GATE's attention reuse) are
    counted as they act, not estimated.
    """
    with torch.device("meta"):
        models = [build_denoiser(c, latent_shape[-1], pretrained=False, device="meta") for c in configs]
    keys = [c.get("cond_key", "y") for c in configs]
    # one forward at batch 1 per model, before any hook acts
    per_forward = [_forward_macs(m, k, latent_shape, 1)["macs_all"] for m, k in zip(models, keys, strict=True)]
    hooks = build_hooks(cfg)
    for hook in hooks:
        hook.attach(models, names, solver)
    scale = float(cfg.sampler.cfg_scale)
    _, model_steps = solver.reset()  # the run's model timesteps (T-Stitch's timestep rule reads them)
    plan = SamplingPlan(solver.num_steps, len(models), 1, scale, scale != 1.0, tuple(model_steps.tolist()))

    def count_step(ctx, rows: int) -> dict[str, int]:
        return _forward_macs(models[ctx.model_index], keys[ctx.model_index], latent_shape, rows)

    try:
        return per_forward, count_sampling_macs(count_step, plan, hooks)["macs_all"]
    finally:
        for hook in hooks:
            hook.detach()


def stitch_rule(cfg: DictConfig, num_models: int) -> dict:
    """For metrics.json: the T-Stitch rule that split the steps (accel.tstitch.rule), when models are stitched."""
    if num_models < 2:
        return {}
    return {"tstitch_rule": OmegaConf.select(cfg, "accel.tstitch.rule", default="index"),
            "tstitch_timestep_form": OmegaConf.select(cfg, "accel.tstitch.timestep_form", default="dit")}


@contextmanager
def cpu_threads(n: int | None):
    """torch's CPU thread count set to n (None: left alone) for the block, then restored.

    For tiny models a second thread buys little and, with another process on one of two cores,
    cost 6x here (the digits main job: 67 s of sampling with 2 threads, 10.5 s with 1).
    """
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_from_config(cfg: DictConfig, out_dir: str | Path, dist: Dist | None = None) -> dict:
    """Sample `cfg.num_samples` images into out_dir; returns the metrics written there.

    Resumes: samples already in out_dir are kept and only the missing ones are made; a folder
    marked done does nothing. dist (runs.distributed): this process's share of a run
    over several processes (default: a single process). The folder is locked for the run
    (runs.folder_lock: a second run into it is refused).
    """
    dist = dist or Dist()
    with claim_folder(out_dir, "out_dir", dist), cpu_threads(cfg.get("num_threads")):
        if cfg.model.get("kind") == "pipeline":  # diffusers pipelines (SD, SD-XL, PixArt, ...): their own module
            if dist is not None and dist.world_size > 1:
                raise UserError("text/image pipelines (model kind: pipeline) run in one process for now, without "
                                 "resume; launch them without torchrun/accelerate (or split the prompts over jobs)")
            from runs.pipeline_run import run_pipeline_from_config
            return run_pipeline_from_config(cfg, out_dir, check_device(cfg.device))
        return _run_from_config(cfg, out_dir, dist)


def _run_from_config(cfg: DictConfig, out_dir: str | Path, dist: Dist) -> dict:
    labels = check_config(cfg)
    device = dist.device(check_device(cfg.device))
    speed = Speed.from_config(cfg, device)  # precision resolved (auto -> tf32 on CUDA, fp32 on CPU), compile checked
    # --- resume (runs/resume.py): read-only checks before any work ---
    folder = SampleFolder(out_dir, cfg.num_samples, image_size=int(cfg.model.image_size))
    folder_config = samples_config(cfg, precision=speed.precision)
    folder.check_config(folder_config)
    if dist.on_main(folder.is_done):  # rank 0 decodes the PNGs on disk once
        log.info("%s already holds the %d samples (done marker): nothing to do", out_dir, cfg.num_samples)
        return folder.previous_metrics()
    # --- end resume ---
    with speed.matmuls():
        return _sample_into_folder(cfg, folder, folder_config, labels, device, speed, dist)


def _sample_into_folder(cfg: DictConfig, folder: SampleFolder, folder_config: dict, labels: torch.Tensor,
                        device: torch.device, speed: Speed, dist: Dist) -> dict:
    out_dir = folder.dir
    image_size = int(cfg.model.image_size)
    hooks = build_hooks(cfg)
    configs = model_configs(cfg)
    names = model_names(configs)

    # random weights (pretrained=false) are drawn from the seed, so such runs repeat too
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if cfg.vae.get("_target_"):  # e.g. vae=vq_f8: an LDM's own first stage, from its checkpoint
            with checkpoint_setting("vae.ckpt"):
                stage = call_target(cfg.vae, pretrained=cfg.pretrained, device=device)
        else:
            stage = load_first_stage(cfg.vae, pretrained=cfg.pretrained, device=device)
        if image_size % stage.factor:
            raise UserError(f"model.image_size={image_size} must be a multiple of the VAE's downsampling factor "
                            f"{stage.factor}")
        latent_size = image_size // stage.factor
        models = []
        for key, c in zip(model_keys(cfg), configs, strict=True):
            with checkpoint_setting(f"{key}.ckpt"):  # read errors name the setting
                models.append(speed.cast(build_denoiser(c, latent_size, cfg.pretrained, device)))
    stage.to(speed.dtype)
    latent_channels = stage.latent_channels
    for name, model in zip(names, models, strict=True):
        if getattr(model, "in_channels", latent_channels) != latent_channels:
            raise UserError(f"model {name} takes {model.in_channels} latent channels, the VAE makes {latent_channels}")
    guided = cfg.model.get("guided_channels")
    if guided is not None and not 0 < guided <= latent_channels:
        raise UserError(f"model.guided_channels={guided}: must be in [1, {latent_channels}] "
                         f"(the latent has {latent_channels} channels) or null for all")
    latent_shape = (latent_channels, latent_size, latent_size)

    solver = build_solver(
        cfg.sampler.name, cfg.sampler.steps, NoiseSchedule(**cfg.schedule),
        learned_variance=bool(cfg.model.get("learn_sigma", False)),
        eta=cfg.sampler.get("eta", 0.0), spacing=cfg.sampler.get("spacing"),
    )
    for hook in hooks:
        hook.attach(models, names, solver)
    macs_per_forward, macs_per_image = run_macs(cfg, configs, names, latent_shape, solver)
    for model in models:  # in place and lazy: the first forwards compile (timed apart, below)
        speed.compile_model(model)

    # --- scale-out and resume: rank 0 claims the folder, the missing batches are dealt over ranks ---
    missing = dist.broadcast(folder.prepare(folder_config) if dist.is_main else None)
    batches = batches_for_rank(grid_batches(missing, cfg.batch_size), dist)
    log.info("sampling %d of %d images (rank %d of %d: %d batches) with %s, %s x%d, accel=%s, %s, compile=%s, "
             "on %s into %s", len(missing), cfg.num_samples, dist.rank, dist.world_size, len(batches),
             " -> ".join(names), cfg.sampler.name, solver.num_steps, label(cfg.accel), speed.precision, speed.compile,
             device, out_dir)
    try:
        with CompileStats() as compiled:
            result = generate(
                models, solver, stage.decode,
                latent_shape=latent_shape, labels=labels,
                null_label=cfg.model.num_classes, seed=cfg.seed, batch_size=cfg.batch_size, device=device,
                cfg_scale=cfg.sampler.cfg_scale, guided_channels=cfg.model.get("guided_channels"),
                hooks=hooks, cond_key=cfg.model.get("cond_key", "y"), out_dir=folder.dir, progress=cfg.progress,
                batches=batches, keep_images=False, model_dtype=speed.dtype, model_names=names,
            )
    finally:
        for hook in hooks:
            hook.detach()
    result.sampling_seconds -= compiled.seconds  # compiling happened inside the first forwards: reported apart
    results = dist.gather(RankResult.of(result))  # also the barrier: every rank's PNGs are on disk
    metrics = None
    if dist.is_main:
        num_images = write_folder_outputs(folder, labels.numpy(), cfg.get("grid_by_label", False), cfg.get("grid_max"))
        steps = first_steps(results)
        if steps is None:  # nothing was missing: the folder's earlier run counted them
            steps_per_model = (folder.previous_metrics() or {}).get("steps_per_model")
        else:
            steps_per_model = dict(zip(names, steps, strict=True))
        metrics = {
            **combine(results),
            "num_images": num_images,
            "steps": solver.num_steps,
            "steps_per_model": steps_per_model,
            **stitch_rule(cfg, len(models)),
            # denoiser MACs: one forward at batch 1 per model; per image over the run as the hooks acted
            # (CFG rows included)
            "macs_per_forward": dict(zip(names, macs_per_forward, strict=True)),
            "macs_per_image": macs_per_image,
            "sampler": cfg.sampler.name,
            "cfg_scale": float(cfg.sampler.cfg_scale),
            "accel": label(cfg.accel),  # every listed technique, in the order applied: tstitch+tgate
            "seed": int(cfg.seed),
            "device": str(device),
            "image_size": image_size,
            **speed.as_metrics(),  # precision resolved (auto -> fp32 / tf32), compile mode
            **compiled.as_metrics(),  # this process's compile seconds (not in sampling_seconds), graphs, recompiles
        }
        for hook in hooks:  # caches (caches/): the work really done, counted in this run
            if hasattr(hook, "metrics"):
                metrics.update(hook.metrics(macs_per_forward, len(missing)))
        save_json(metrics, folder.dir / "metrics.json")
        folder.mark_done({"num_generated_last_run": metrics["num_generated"]})
        log.info("%d images in the folder, %d made in %.2f s of sampling (%.3f images/s over %d process(es)), "
                 "steps per model %s", num_images, metrics["num_generated"], metrics["sampling_seconds"],
                 metrics["images_per_second"], dist.world_size, steps_per_model)
    # --- end scale-out and resume ---
    return dist.broadcast(metrics)
