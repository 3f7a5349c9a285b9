"""A sampling run from a composed Hydra config (configs/sample.yaml): check, build, sample, write.

Models are built through their config's `_target_` (e.g. `dit.build_dit`), so this
module never imports a model package.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf

from .generate import check_counts, generate
from .outputs import save_grid, save_json, save_npz
from .sampler import check_cfg_scale
from .seeding import class_labels
from .solvers import NoiseSchedule, build_solver, check_solver_args
from .vae import decode_to_uint8, downsample_factor, load_vae

log = logging.getLogger(__name__)

# keys of a model config that describe how to sample it, not how to build it
SAMPLING_KEYS = ("image_size", "guided_channels", "cond_key")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available here; use device=cpu or device=auto")
    return device


def check_config(cfg: DictConfig) -> torch.Tensor:
    """Every check that needs no model, before any work; returns the class labels."""
    check_counts(cfg.num_samples, cfg.batch_size)
    check_cfg_scale(cfg.sampler.cfg_scale)
    check_solver_args(cfg.sampler.name, cfg.sampler.steps, cfg.sampler.get("eta", 0.0), cfg.sampler.get("spacing"))
    labels = cfg.labels if cfg.labels is None else list(cfg.labels)
    return class_labels(cfg.seed, cfg.num_samples, cfg.model.num_classes, labels)


def build_denoiser(model_cfg: DictConfig, input_size: int, pretrained: bool, device: torch.device | str):
    """Call the model config's `_target_` builder with its build keys (errors reach the user unwrapped)."""
    kwargs = {k: v for k, v in OmegaConf.to_container(model_cfg, resolve=True).items() if k not in SAMPLING_KEYS}
    builder = get_method(kwargs.pop("_target_"))
    return builder(**kwargs, input_size=input_size, pretrained=pretrained).to(device).eval()


def run_from_config(cfg: DictConfig, out_dir: str | Path) -> dict:
    """Sample `cfg.num_samples` images into out_dir; returns the metrics written there."""
    labels = check_config(cfg)
    device = resolve_device(cfg.device)
    image_size = int(cfg.model.image_size)

    # random weights (pretrained=false) are drawn from the seed, so such runs repeat too
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        vae = load_vae(cfg.vae.source, pretrained=cfg.pretrained, arch=cfg.vae.get("arch")).to(device)
        factor = downsample_factor(vae)
        if image_size % factor:
            raise ValueError(f"model.image_size={image_size} must be a multiple of the VAE's downsampling factor {factor}")
        latent_size = image_size // factor
        model = build_denoiser(cfg.model, latent_size, cfg.pretrained, device)
    latent_channels = vae.config.latent_channels
    if getattr(model, "in_channels", latent_channels) != latent_channels:
        raise ValueError(f"model {cfg.model.name} takes {model.in_channels} latent channels, "
                         f"the VAE makes {latent_channels}")

    solver = build_solver(
        cfg.sampler.name, cfg.sampler.steps, NoiseSchedule(**cfg.schedule),
        learned_variance=bool(cfg.model.get("learn_sigma", False)),
        eta=cfg.sampler.get("eta", 0.0), spacing=cfg.sampler.get("spacing"),
    )
    hooks = [instantiate(h) for h in cfg.accel.get("hooks", [])]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("sampling %d images of %s with %s x%d on %s into %s",
             cfg.num_samples, cfg.model.name, cfg.sampler.name, solver.num_steps, device, out_dir)
    result = generate(
        model, solver, lambda z: decode_to_uint8(vae, z),
        latent_shape=(latent_channels, latent_size, latent_size), labels=labels,
        null_label=cfg.model.num_classes, seed=cfg.seed, batch_size=cfg.batch_size, device=device,
        cfg_scale=cfg.sampler.cfg_scale, guided_channels=cfg.model.get("guided_channels"),
        hooks=hooks, cond_key=cfg.model.get("cond_key", "y"), out_dir=out_dir, progress=cfg.progress,
    )
    save_grid(result.images, out_dir / "grid.png")
    save_npz(result.images, result.labels, out_dir / "samples.npz")
    metrics = {
        "sampling_seconds": result.sampling_seconds,
        "decode_seconds": result.decode_seconds,
        "num_images": len(result.images),
        "images_per_second": len(result.images) / max(result.sampling_seconds, 1e-9),
        "steps": solver.num_steps,
        "steps_per_model": {cfg.model.name: result.steps_per_model[0]},
        "sampler": cfg.sampler.name,
        "cfg_scale": float(cfg.sampler.cfg_scale),
        "seed": int(cfg.seed),
        "device": str(device),
        "image_size": image_size,
    }
    save_json(metrics, out_dir / "metrics.json")
    log.info("%d images in %.2f s of sampling (%.3f images/s)", metrics["num_images"],
             metrics["sampling_seconds"], metrics["images_per_second"])
    return metrics
