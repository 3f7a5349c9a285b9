"""How models make their attention modules findable without importing a technique.

A model marks each attention module with `is_cross_attention` (the attribute name
diffusers' `Attention` already uses), so T-GATE can tell self- from cross-attention
in native models and diffusers models alike.
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
