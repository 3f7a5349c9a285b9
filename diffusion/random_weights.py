"""Random weights whose outputs mean something (`pretrained=false`).

DiT's initialisation (adaLN-Zero, official and ours) zeroes every block's modulation and the
final layer: a freshly built DiT outputs exactly zero whatever x, t and y are, its blocks are
identities, and any two runs of such models (gated and plain, stitched and not) are equal by
construction. For sampling without weights (smoke tests, speed, comparisons) we keep the
model's own initialisation and then draw every zero-initialised layer small and non-zero, so
that the output depends on the input, the timestep, the class and every block.

Training keeps the model's own init: adaLN-Zero is what DiT is trained from.
"""
from __future__ import annotations

import torch
from torch import nn

# Measured on DiT-S/2 at 256px (x ~ N(0, 1)): output rms ~1 (like a noise prediction), and changing the
# class, the timestep or skipping one block moves the output by ~5-20% of its norm (0.02: 2-5%, so
# gated and plain runs differed by at most one grey level; 0.1: output rms 2-4).
ZERO_INIT_STD = 0.05


@torch.no_grad()
def fill_zero_init_layers(model: nn.Module, std: float = ZERO_INIT_STD) -> list[str]:
    """Draw the weight and bias of every layer whose weight is all zero from N(0, std^2), in place.

    "Zero-initialised layer": a module whose own learned `weight` is exactly zero (DiT's adaLN
    modulation Linears, its final Linear). Norm layers (weight 1) and layers with only a zero bias
    are left alone. Draws come from torch's global stream, in module order, so two models of the
    same architecture built one after another from one seed get different weights. Meta
    parameters (MACs counting) are skipped. Returns the names of the layers filled.
    """
    filled = []
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is None or not weight.requires_grad or weight.is_meta or weight.numel() == 0 or weight.any():
            continue
        for p in module.parameters(recurse=False):
            p.normal_(0.0, std)
        filled.append(name)
    return filled
