"""Train a class-conditional denoiser from a composed configs/train.yaml, in the spirit of DiT's train.py.

AdamW (constant lr, no weight decay by default), an EMA copy updated every step, label
dropout inside the model (its `class_dropout_prob`, what classifier-free guidance needs),
the ADM loss with learned variance (training.losses), checkpoints every `ckpt_every` steps
into <out_dir>/checkpoints/<step:07d>.pt, resume from one of them.

Every random draw of step s (batch indices, timesteps, noise, label dropout, flips) comes
from seeds keyed (seed, s), so a run resumed at step s continues exactly as the
uninterrupted run would have: same batches, same noise, same weights.
Models are built through their config's `_target_` (as runs.run does): no model import here.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from data.datasets import StepBatchSampler
from diffusion.checkpoint_files import checkpoint_setting
from diffusion.errors import MissingFileError, UserError
from diffusion.outputs import save_json
from diffusion.solvers import NoiseSchedule
from diffusion.vae import load_first_stage
from runs.devices import check_device
from runs.folder_lock import claim_folder
from runs.run import build_denoiser, call_target, cpu_threads
from training.checkpointing import (
    checkpoint_name,
    export_state,
    latest_checkpoint,
    load_train_state,
    save_checkpoint,
    train_state,
)
from training.ema import ema_decay_at, make_ema, update_ema
from training.losses import DiffusionLoss

log = logging.getLogger(__name__)


def step_seed(seed: int, step: int) -> int:
    """One 63-bit seed per (seed, step), independent of every other step's."""
    return int(np.random.default_rng([int(seed), int(step), 1]).integers(2**63 - 1))


def check_train_config(cfg: DictConfig) -> None:
    for key in ("steps", "batch_size", "ckpt_every", "log_every"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{key}={value!r}: must be an integer >= 1")
    if not 0.0 <= float(cfg.ema_decay) < 1.0:
        raise UserError(f"ema_decay={cfg.ema_decay}: must be in [0, 1)")
    if not float(cfg.lr) > 0:
        raise UserError(f"lr={cfg.lr}: must be > 0")


def resume_path(cfg: DictConfig, out_dir: Path) -> Path | None:
    """resume: null (fresh), a checkpoint path, or `latest` (the newest in <out_dir>/checkpoints)."""
    if cfg.resume is None:
        return None
    if str(cfg.resume) == "latest":
        found = latest_checkpoint(out_dir / "checkpoints")
        if found is None:
            log.info("resume=latest: no checkpoint in %s yet, starting from step 0", out_dir / "checkpoints")
        return found
    path = Path(str(cfg.resume)).expanduser()
    if not path.is_file():
        raise MissingFileError(f"resume={cfg.resume!r}: no such checkpoint file")
    return path


class Encoder:
    """Images -> what the model denoises: themselves (pixel space) or scaled VAE latents (DiT: 0.18215)."""

    def __init__(self, vae_cfg, device):
        self.stage = load_first_stage(vae_cfg, pretrained=True, device=device)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        vae = self.stage.vae
        if vae is None:
            return x
        return vae.encode(x).latent_dist.sample() * vae.config.scaling_factor


def train(cfg: DictConfig, out_dir: str | Path) -> dict:
    """Run cfg.steps optimisation steps in total (counting resumed ones); returns a summary also
    written to <out_dir>/train_metrics.json. num_threads: small models on a busy CPU train ~20x
    faster (measured here) on one thread than on two fighting another process for a core.
    The run folder is locked for the run (runs.folder_lock: one run per folder)."""
    with claim_folder(out_dir), cpu_threads(cfg.get("num_threads")):
        return _train(cfg, out_dir)


def _earlier_losses(state: dict, out_dir: Path, start: int) -> tuple[list, list]:
    """(history, window) of the steps before `start`: from the checkpoint, or for checkpoints
    written before they kept it, the history in the run's train_metrics.json."""
    if "losses" in state:
        return [tuple(x) for x in state["losses"]["history"]], list(state["losses"]["window"])
    path = out_dir / "train_metrics.json"
    history = json.loads(path.read_text()).get("loss_history", []) if path.is_file() else []
    return [tuple(x) for x in history if x[0] <= start], []


def _train(cfg: DictConfig, out_dir: str | Path) -> dict:
    check_train_config(cfg)
    out_dir = Path(out_dir)
    device = check_device(cfg.device)
    dataset = call_target(cfg.data)
    image_size = int(cfg.model.image_size)
    if dataset.image_size != image_size:
        raise UserError(f"the data set makes {dataset.image_size}px images, model.image_size={image_size}")
    if dataset.num_classes != cfg.model.num_classes:
        raise UserError(f"the data set has {dataset.num_classes} classes, model.num_classes={cfg.model.num_classes}")
    encoder = Encoder(cfg.vae, device)
    factor = encoder.stage.factor
    channels = dataset.channels if encoder.stage.vae is None else encoder.stage.latent_channels
    if image_size % factor:
        raise UserError(f"model.image_size={image_size} must be a multiple of the VAE's factor {factor}")

    torch.manual_seed(int(cfg.seed))  # the initial weights
    model = build_denoiser(cfg.model, image_size // factor, pretrained=False, device=device,
                           keep_zero_init=True).train()
    if getattr(model, "in_channels", channels) != channels:
        raise UserError(f"the model takes {model.in_channels} channels, the data (after the VAE) has {channels}")
    ema = make_ema(model)
    opt = torch.optim.AdamW(model.parameters(), lr=float(cfg.lr), weight_decay=float(cfg.weight_decay))
    loss_fn = DiffusionLoss(NoiseSchedule(**cfg.schedule), learn_sigma=bool(cfg.model.get("learn_sigma", False)))
    cond_key = cfg.model.get("cond_key", "y")
    config = OmegaConf.to_container(cfg, resolve=True)

    start = 0
    window: list[float] = []  # recent losses for the progress bar and the log
    history = []              # (step, mean loss over the last log window)
    path = resume_path(cfg, out_dir)
    if path is not None:
        with checkpoint_setting("resume"):
            state = load_train_state(path)
        model.load_state_dict(state["model"], strict=True)
        ema.load_state_dict(state["ema"], strict=True)
        opt.load_state_dict(state["opt"])
        start = int(state["step"])
        history, window = _earlier_losses(state, out_dir, start)
        log.info("resumed from %s at step %d", path, start)
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("training %s (%d trainable parameters) on %d images, steps %d -> %d, batch %d, on %s, into %s",
             cfg.model.name, num_params, len(dataset), start, cfg.steps, cfg.batch_size, device, out_dir)

    batches = StepBatchSampler(len(dataset), cfg.batch_size, cfg.seed, start, cfg.steps)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=int(cfg.num_workers))
    flip = bool(getattr(dataset, "flip", False))
    t0, step = time.perf_counter(), start
    bar = tqdm(total=cfg.steps, initial=start, desc="train", disable=not cfg.progress, dynamic_ncols=True)
    for step, (x, y) in enumerate(loader, start=start):
        torch.manual_seed(step_seed(cfg.seed, step))  # t, noise, label dropout and flips of this step
        x, y = x.to(device), y.to(device)            # x (N, C, H, W) in [-1, 1], y (N,)
        if flip:
            x = torch.where(torch.rand(len(x), 1, 1, 1, device=device) < 0.5, x.flip(-1), x)
        z = encoder(x)                               # (N, C', h, w)
        t = torch.randint(0, loss_fn.num_timesteps, (len(z),), device=device)
        noise = torch.randn_like(z)
        losses = loss_fn(model, z, t, noise, **{cond_key: y})
        loss = losses["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_ema(ema, model, ema_decay_at(step, float(cfg.ema_decay), bool(cfg.ema_warmup)))

        done = step + 1
        window.append(loss.item())
        bar.update(1)
        if done % cfg.log_every == 0 or done == cfg.steps:
            mean = float(np.mean(window))
            history.append((done, mean))
            bar.set_postfix(loss=f"{mean:.4f}", mse=f"{losses['mse'].mean().item():.4f}",
                            vb=f"{losses['vb'].mean().item():.4f}")
            log.info("step %d loss %.4f (mean of the last %d steps)", done, mean, len(window))
            if done % cfg.log_every == 0:
                window.clear()  # (a last step off the log grid keeps it: a resumed run carries it on)
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            # the log on the grid and the losses since: a resumed run logs exactly what an uninterrupted one does
            on_grid = [h for h in history if h[0] % cfg.log_every == 0]
            saved = save_checkpoint(out_dir / "checkpoints" / checkpoint_name(done), train_state(
                model, ema, opt, done, config, {"history": on_grid, "window": window}))
            log.info("saved %s", saved)
    bar.close()
    seconds = time.perf_counter() - t0

    final = max(int(cfg.steps), start)  # a checkpoint past cfg.steps trains no further
    if cfg.export:
        exported = save_checkpoint(Path(str(cfg.export)).expanduser(), export_state(ema, final, config))
        log.info("exported the EMA weights to %s", exported)
    summary = {"steps": final, "resumed_from": start, "seconds": seconds,
               "steps_per_second": (final - start) / max(seconds, 1e-9), "parameters": num_params,
               "loss_history": history}
    save_json(summary, out_dir / "train_metrics.json")
    log.info("done: %d steps in %.1f s; last logged loss %s", final - start, seconds,
             f"{history[-1][1]:.4f}" if history else "n/a")
    return summary
