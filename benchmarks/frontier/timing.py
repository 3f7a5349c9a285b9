"""Sampling time of many runs, timed round-robin in one process.

Each point's run is built once (its models, solver and hooks, from its composed config, as
`runs.run` builds them) and then timed in turns: repeat 1 of every point, then repeat 2, ...,
so that the load of other processes on a shared machine spreads over all points instead of hitting
a few. Only the sampling loop is timed (`generate`'s `sampling_seconds`: no building, no decoding,
no writing), on the first `num_samples` samples of the run's own seeds and labels.

A config with `compile=regional` (the sweep's `timing.compile`) is built compiled as runs.run compiles
it (each model its own dynamo cache and recompile limit, diffusion.compile); the compiling happens in
the warm-up rounds, and what dynamo did (graphs, recompiles, compile seconds, limit hit) is recorded.
"""
from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from diffusion.compile import CompileStats
from diffusion.errors import UserError
from diffusion.solvers import NoiseSchedule, build_solver
from diffusion.vae import load_first_stage
from runs.devices import check_device
from runs.generate import generate
from runs.run import (
    build_denoiser,
    build_hooks,
    call_target,
    check_config,
    cpu_threads,
    model_configs,
    model_names,
)
from runs.speed import Speed


@dataclass
class TimedRun:
    """One point's run, built and hooked, ready to be timed again and again."""

    cfg: DictConfig
    models: list
    solver: object
    hooks: list
    latent_shape: tuple[int, int, int]
    labels: torch.Tensor  # (num_samples,) the first labels of the run
    device: torch.device

    def seconds(self, batch_size: int) -> float:
        """Seconds of the sampling loops for the run's first len(labels) samples."""
        result = generate(
            self.models, self.solver, lambda latents: latents.new_zeros(0).numpy(),  # no decoding
            latent_shape=self.latent_shape, labels=self.labels, null_label=int(self.cfg.model.num_classes),
            seed=int(self.cfg.seed), batch_size=batch_size, device=self.device,
            cfg_scale=self.cfg.sampler.cfg_scale, guided_channels=self.cfg.model.get("guided_channels"),
            hooks=self.hooks, cond_key=self.cfg.model.get("cond_key", "y"), progress=False, keep_images=False,
        )
        return result.sampling_seconds

    def close(self) -> None:
        for hook in self.hooks:
            hook.detach()


def build_timed_run(cfg: DictConfig, num_samples: int) -> TimedRun:
    """The run of `cfg` as runs.run builds it (same weights, solver, hooks), for its first num_samples."""
    labels = check_config(cfg)[:num_samples]
    device = check_device(cfg.device)
    hooks = build_hooks(cfg)
    configs = model_configs(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # as a run draws random weights (pretrained=false)
        if cfg.vae.get("_target_"):  # an LDM's own first stage
            stage = call_target(cfg.vae, pretrained=cfg.pretrained, device=device)
        else:
            stage = load_first_stage(cfg.vae, pretrained=cfg.pretrained, device=device)
        latent_size = int(cfg.model.image_size) // stage.factor
        models = [build_denoiser(c, latent_size, cfg.pretrained, device) for c in configs]
    solver = build_solver(cfg.sampler.name, cfg.sampler.steps, NoiseSchedule(**cfg.schedule),
                          learned_variance=bool(cfg.model.get("learn_sigma", False)),
                          eta=cfg.sampler.get("eta", 0.0), spacing=cfg.sampler.get("spacing"))
    for hook in hooks:
        hook.attach(models, model_names(configs), solver)
    speed = Speed.from_config(cfg, device)  # compile=none: nothing; regional: lazy, the first forwards compile
    for model in models:
        speed.compile_model(model)
    return TimedRun(cfg, models, solver, hooks, (stage.latent_channels, latent_size, latent_size), labels, device)


def time_round_robin(cfgs: Mapping[str, DictConfig], *, num_samples: int, batch_size: int, repeats: int,
                     warmup: int = 1, num_threads: int | None = 1, progress: bool = True) -> dict[str, dict]:
    """key -> {"seconds": median, "runs": [seconds of each repeat], compile_seconds, compiled_graphs, recompiles,
    recompile_limit_hit} for every config, timed in turns.

    warmup rounds (not recorded) come first: the first calls of a process pay one-off set-up costs."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise UserError(f"timing repeats={repeats!r}: must be an integer >= 1")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise UserError(f"timing warmup={warmup!r}: must be an integer >= 0")
    times: dict[str, list[float]] = {key: [] for key in cfgs}
    stats: dict[str, CompileStats] = {key: CompileStats() for key in cfgs}
    runs: dict[str, TimedRun] = {}
    with cpu_threads(num_threads):
        try:
            for key, cfg in cfgs.items():
                runs[key] = build_timed_run(cfg, num_samples)
            rounds = [(r, key) for r in range(warmup + repeats) for key in runs]
            for r, key in tqdm(rounds, desc="timing (round-robin)", disable=not progress):
                before = stats[key].seconds
                with stats[key]:  # the compiling of a compiled run (warm-up rounds) and any recompile later
                    seconds = runs[key].seconds(batch_size)
                seconds -= stats[key].seconds - before  # compiling is reported apart, as runs.run does
                if r >= warmup:
                    times[key].append(seconds)
        finally:
            for run in runs.values():
                run.close()
    return {key: {"seconds": statistics.median(t), "runs": t, **stats[key].as_metrics()} for key, t in times.items()}
