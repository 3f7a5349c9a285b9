"""How models make their attention modules findable without importing a technique.

A model marks each attention module with `is_cross_attention` (the attribute name
diffusers' `Attention` already uses), so T-GATE can tell self- from cross-attention
in native models and diffusers models alike.

MM-DiT models (SD3 / SD3.5) have a third kind: joint attention, where image and text
tokens attend to each other in one softmax. diffusers builds it as an `Attention` with
`is_cross_attention=False` and the text projected in through `added_kv_proj_dim`; it is
neither self- nor cross-attention, and `is_joint_attention` tells it apart.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch.nn as nn


def mark_attention(module: nn.Module, cross: bool) -> nn.Module:
    """Tag `module` as a self- (cross=False) or cross-attention (cross=True) module."""
    module.is_cross_attention = cross
    return module


def find_attention(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield (qualified name, module) for every marked attention module of `model`."""
    for name, module in model.named_modules():
        if isinstance(getattr(module, "is_cross_attention", None), bool):
            yield name, module


def is_joint_attention(module: nn.Module) -> bool:
    """Whether `module` attends over image and text tokens together (SD3's MM-DiT blocks): not marked
    as cross-attention, yet it takes a second token stream through its added key/value projections."""
    return getattr(module, "is_cross_attention", None) is False and \
        getattr(module, "added_kv_proj_dim", None) is not None
