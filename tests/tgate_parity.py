"""Parity cases for `pipe.tgate(...)`: run the same way by our package and by tgate 1.0.0.

`run_case(tgate_module, name, folder)` loads the tiny pipeline saved under `folder`,
applies the case's loader from `tgate_module` and returns the latents of one
`pipe.tgate(...)` call. Our test calls it with our `tgate`; `python
tests/tgate_reference_run.py NAME FOLDER OUT` calls it in a subprocess whose
PYTHONPATH holds only the reference package (both packages are called `tgate`).
"""
from __future__ import annotations

import torch

from tiny_pipelines import load_tiny, svd_image

# a schedule that exercises every action in 8 steps: warm-up compute (0), self-attention
# cache (1, 2) and reuse, the CFG-mean cache at gate_step - 1 (3), one branch from 4 on
# with self-attention cached at even steps and reused at odd ones
GATE = dict(gate_step=4, sp_interval=2, fi_interval=2, warm_up=1)
TEXT = dict(prompt="a photo of a cat", negative_prompt="blurry", num_inference_steps=8, guidance_scale=6.0,
            height=32, width=32, output_type="latent")
PIXART = dict(prompt="a photo of a cat", negative_prompt="blurry", num_inference_steps=8, guidance_scale=4.5,
              height=16, width=16, output_type="latent", use_resolution_binning=False, clean_caption=False)

CASES = {
    "sd": ("sd", "TgateSDLoader", {}, {**TEXT, **GATE}),
    # a gate past the last of the 8 steps: no gate, guidance at every step, but self-attention still
    # cached at warm_up and reused between sp_interval steps (what the docs say gate_step >= steps means)
    "sd_gate_past_end": ("sd", "TgateSDLoader", {}, {**TEXT, **GATE, "gate_step": 20}),
    "sdxl": ("sdxl", "TgateSDXLLoader", {}, {**TEXT, **GATE}),
    "pixart_alpha": ("pixart_alpha", "TgatePixArtAlphaLoader", {}, {**PIXART, **GATE}),
    "pixart_sigma": ("pixart_sigma", "TgatePixArtSigmaLoader", {}, {**PIXART, **GATE}),
    "svd": ("svd", "TgateSVDLoader", {}, dict(height=16, width=16, num_frames=2, num_inference_steps=6,
                                               min_guidance_scale=1.0, max_guidance_scale=3.0, output_type="latent",
                                               gate_step=3, sp_interval=2, fi_interval=2, warm_up=1)),
    # the DeepCache loaders' own defaults (sp_interval=1, warm_up=0); full U-Net every 2nd step
    "sd_deepcache": ("sd", "TgateSDDeepCacheLoader", dict(cache_interval=2, cache_branch_id=0),
                     {**TEXT, "gate_step": 5}),
    "sdxl_deepcache": ("sdxl", "TgateSDXLDeepCacheLoader", dict(cache_interval=3, cache_branch_id=1),
                       {**TEXT, "gate_step": 4}),
    # LCM: no CFG batch (the U-Net takes a guidance embedding), caches keep their shape; gate at
    # step 1 as tgate's README does (later LCM steps barely use the model's prediction)
    "sdxl_lcm": ("sdxl_lcm", "TgateSDXLLoader", {}, dict(prompt="a photo of a cat", num_inference_steps=4,
                                                         guidance_scale=4.0, height=32, width=32,
                                                         output_type="latent", gate_step=1, sp_interval=1,
                                                         fi_interval=2, warm_up=0, lcm=True)),
}


def call_arguments(name: str) -> dict:
    """The keyword arguments of the case's call, with a fresh seeded generator (and SVD's image)."""
    kind, _, _, call = CASES[name]
    call = dict(call, generator=torch.Generator().manual_seed(0))
    if kind == "svd":
        call["image"] = svd_image()
    return call


def output_latents(output) -> torch.Tensor:
    return output.frames if hasattr(output, "frames") else output.images


def run_case(tgate_module, name: str, folder, pipe=None) -> torch.Tensor:
    kind, loader, loader_kwargs, _ = CASES[name]
    pipe = load_tiny(kind, folder) if pipe is None else pipe
    pipe = getattr(tgate_module, loader)(pipe, **loader_kwargs)
    with torch.no_grad():
        return output_latents(pipe.tgate(**call_arguments(name)))
