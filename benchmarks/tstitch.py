"""Timing stitched sampling against the ideal interpolation of the models' own times."""
from __future__ import annotations

import statistics

from diffusion.errors import UserError
from diffusion.timing import CPU, time_sampling
from tstitch.hook import TStitchHook
from tstitch.schedule import resolve_fractions, steps_per_model


def _time_once(models, solver, ratio, latent_shape, batch_size, cfg_scale, null_label, device, model_dtype) -> float:
    return time_sampling(models, solver, [TStitchHook(ratio=ratio)], latent_shape=latent_shape,
                         batch_size=batch_size, cfg_scale=cfg_scale, null_label=null_label, device=device,
                         model_dtype=model_dtype)


def check_ratios(ratios) -> list[float]:
    """The bench's small-model fractions, each checked to lie in [0, 1] (before any model is built)."""
    try:
        return [float(resolve_fractions(r, None)[0]) for r in ratios]
    except UserError as err:
        raise UserError.setting("ratios", list(ratios), f"every ratio must be a number in [0, 1] ({err})") from None


def time_ratios(small, large, solver, ratios, *, latent_shape, batch_size=1, cfg_scale=1.5, null_label=1000,
                repeats=3, warmup=1, device=CPU, model_dtype=None) -> list[dict]:
    """Median sampling time per small-model ratio, with the speed-ups it implies.

    Ratios are timed round-robin (repeat 1 of every ratio, then repeat 2, ...) so that a
    slow drift of the machine spreads over all of them. The ideal for ratio r is
    s * t(small only) + (1 - s) * t(large only), with s = round(r n) / n the small
    model's share of the n steps and both times measured here.
    """
    ratios = sorted(set([0.0, 1.0, *check_ratios(ratios)]))
    models = [small, large]
    times = {r: [] for r in ratios}
    for _ in range(warmup):  # each model alone: first calls pay one-off kernel set-up
        for r in (0.0, 1.0):
            _time_once(models, solver, r, latent_shape, batch_size, cfg_scale, null_label, device, model_dtype)
    for _ in range(repeats):
        for r in ratios:
            times[r].append(_time_once(models, solver, r, latent_shape, batch_size, cfg_scale, null_label, device,
                                       model_dtype))
    t_small, t_large = statistics.median(times[1.0]), statistics.median(times[0.0])
    rows = []
    for r in ratios:
        measured = statistics.median(times[r])
        steps = steps_per_model([r, 1 - r], solver.num_steps)
        share = steps[0] / solver.num_steps  # the small model's actual share of steps (= r when r*n is whole)
        ideal = share * t_small + (1 - share) * t_large
        rows.append({
            "ratio": r,
            "steps": steps,
            "seconds": measured,
            "ideal_seconds": ideal,
            "speedup": t_large / measured,
            "ideal_speedup": t_large / ideal,
            "time_vs_ideal": measured / ideal,
        })
    return rows


def format_table(rows, small_name: str, large_name: str) -> str:
    head = (f"| {small_name} fraction | steps {small_name}/{large_name} | time (s) | ideal time (s) "
            f"| speed-up | ideal speed-up | time / ideal |")
    lines = [head, "|" + "---|" * 7]
    for row in rows:
        lines.append(f"| {row['ratio']:.1f} | {row['steps'][0]}/{row['steps'][1]} | {row['seconds']:.2f} "
                     f"| {row['ideal_seconds']:.2f} | {row['speedup']:.2f}x | {row['ideal_speedup']:.2f}x "
                     f"| {row['time_vs_ideal']:.3f} |")
    return "\n".join(lines)
