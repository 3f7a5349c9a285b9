"""Timing gated sampling against plain sampling, next to the speed-up the MACs predict."""
from __future__ import annotations

from omegaconf import OmegaConf

from diffusion.timing import CPU, time_with_and_without
from runs.count_macs import count_run
from tgate.hook import TGateHook


def predicted_macs(meta_model, image_size: int, steps: int, use_cfg: bool, settings: dict) -> dict:
    """All-ops MACs per image, plain and gated, counted with the real hook on a meta copy."""
    model_cfg = OmegaConf.create({"image_size": image_size, "name": "bench"})
    plain = count_run([meta_model], [model_cfg], steps, use_cfg)
    hook = TGateHook(**settings)
    hook.attach([meta_model], ["bench"], None)
    try:
        gated = count_run([meta_model], [model_cfg], steps, use_cfg, [hook])
    finally:
        hook.detach()
    return {"baseline": plain["macs_all"], "gated": gated["macs_all"]}


def time_gating(model, solver, settings: dict, *, latent_shape, batch_size=1, cfg_scale=4.0, null_label=1000,
                repeats=3, warmup=1, device=CPU, model_dtype=None) -> dict:
    """Median sampling time plain and gated, timed alternately so that drift hits both."""
    times = time_with_and_without([model], solver, TGateHook(**settings), latent_shape=latent_shape,
                                  batch_size=batch_size, cfg_scale=cfg_scale, null_label=null_label, repeats=repeats,
                                  warmup=warmup, device=device, model_dtype=model_dtype)
    return {"baseline": times["baseline"], "gated": times["hooked"],
            "runs": {"baseline": times["runs"]["baseline"], "gated": times["runs"]["hooked"]}}
