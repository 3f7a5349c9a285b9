"""The sampling loop: one function over any denoiser(s), solver, guidance and hooks.

In the spirit of k-diffusion's samplers: a plain function, per-step callback, no
model knowledge. A denoiser is `model(x, t, **cond) -> out`, where `out` is the noise
prediction in the first C channels (C = channels of x), optionally followed by more
channels (DiT's learned variance).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from diffusion.errors import UserError

from .context import Hook, SamplingPlan, StepContext
from .guidance import apply_cfg
from .solvers import Solver


@dataclass
class SampleResult:
    latents: torch.Tensor  # (B, C, H, W) final x_0
    steps_per_model: list[int]  # steps each denoiser ran, by model index
    evals_per_model: list[int]  # forward rows per sample each denoiser ran (a guided step counts 2)


def check_cfg_scale(cfg_scale) -> float:
    if (isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)) or not math.isfinite(cfg_scale)
            or cfg_scale < 0):
        raise UserError(f"cfg_scale={cfg_scale!r}: must be a finite number >= 0 (1 = no guidance)")
    return float(cfg_scale)


def _cat_cond(a: dict, b: dict) -> dict:
    """Stack two conditioning dicts along the batch (cond rows first, as official DiT)."""
    return {k: torch.cat([a[k], b[k]]) for k in a}


def _cast_floats(cond: dict | None, dtype: torch.dtype | None) -> dict | None:
    """Floating conditioning tensors (text context) in the network's type; labels stay integers."""
    if dtype is None or cond is None:
        return cond
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in cond.items()}


def network_output(out: torch.Tensor) -> torch.Tensor:
    """A network's output as the sampler works on it: float32, whatever type the network ran in
    (guidance and the solver update in bf16 would round every step's latents)."""
    return out.float()


@torch.no_grad()
def sample(
    denoisers: Callable | Sequence[Callable],
    solver: Solver,
    noise: torch.Tensor,
    cond: dict,
    uncond: dict | None = None,
    *,
    cfg_scale: float = 1.0,
    guided_channels: int | None = None,
    hooks: Sequence[Hook] = (),
    generators: list[torch.Generator] | None = None,
    callback: Callable[[StepContext, torch.Tensor], None] | None = None,
    progress: bool = True,
    model_dtype: torch.dtype | None = None,
) -> SampleResult:
    """Run the solver from `noise` (B, C, H, W) to x_0.

    cond / uncond: keyword tensors for the denoiser, batch B each; guidance runs the
    two as one 2B batch while cfg_scale != 1 and no hook has turned it off.
    generators: B per-sample generators for stochastic solvers (DDPM, DDIM eta > 0).
    model_dtype: the type the denoisers' weights are in (precision=bf16/fp16): each step's
    input is cast to it and the output back to float32, so the latents, the guidance
    combination and the solver stay float32 (None: inputs go in as they are).
    """
    models = list(denoisers) if isinstance(denoisers, Sequence) else [denoisers]
    cfg_scale = check_cfg_scale(cfg_scale)
    use_cfg = cfg_scale != 1.0
    if use_cfg and uncond is None:
        raise UserError("cfg_scale != 1 needs the unconditional inputs (uncond)")
    B, C = noise.shape[:2]
    device = noise.device

    scheduler = solver.scheduler
    sched_steps, model_steps = solver.reset()
    n = len(sched_steps)
    plan = SamplingPlan(n, len(models), B, cfg_scale, use_cfg, tuple(model_steps.tolist()))
    model_t = model_steps.to(device)  # (n,) moved once: no per-step host->device copies
    cond, uncond = _cast_floats(cond, model_dtype), _cast_floats(uncond, model_dtype)
    both = _cat_cond(cond, uncond) if use_cfg else None
    counts, evals = [0] * len(models), [0] * len(models)

    for hook in hooks:
        hook.start(plan)
    x = noise * solver.init_noise_sigma
    for i in tqdm(range(n), desc=f"{solver.name} x{n}", disable=not progress, leave=False):
        step_t = sched_steps[i]
        ctx = StepContext(i=i, n=n, t=model_t[i].expand(B), timestep=float(step_t), guidance=use_cfg)
        for hook in hooks:
            hook.step(ctx)
        model = models[ctx.model_index]
        x_in = scheduler.scale_model_input(x, step_t)
        if model_dtype is not None:
            x_in = x_in.to(model_dtype)
        if ctx.guidance:
            out = network_output(model(torch.cat([x_in, x_in]), torch.cat([ctx.t, ctx.t]), **both))
            out_cond, out_uncond = out.chunk(2)
            out = apply_cfg(out_cond, out_uncond, cfg_scale, eps_channels=C, guided_channels=guided_channels)
        else:
            branch = cond if ctx.branch == "cond" else uncond
            out = network_output(model(x_in, ctx.t, **branch))
        if not solver.learned_variance:
            out = out[:, :C]  # solvers other than learned-range DDPM take eps only
        x = scheduler.step(out, step_t, x, generator=generators, **solver.step_kwargs).prev_sample
        counts[ctx.model_index] += 1
        evals[ctx.model_index] += 2 if ctx.guidance else 1
        if callback is not None:
            callback(ctx, x)
    for hook in hooks:
        hook.end()
    return SampleResult(x, counts, evals)
