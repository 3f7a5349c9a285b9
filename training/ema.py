"""Exponential moving average of a model's weights (DiT train.py keeps one, samples with it)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


def make_ema(model: nn.Module) -> nn.Module:
    """A frozen copy that starts equal to `model` (as DiT's train.py: update_ema(ema, model, decay=0))."""
    ema = copy.deepcopy(model).eval()
    return ema.requires_grad_(False)


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """The decay for the update after `step` steps. DiT uses a constant decay (400K steps make the
    initial weights vanish); with warmup, min(decay, (1 + step) / (10 + step)) (diffusers' EMAModel
    warm-up rule) lets short runs forget their random start: with a constant 0.999, 1,500 steps
    still hold 0.999^1500 = 22% of the initial weights."""
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (frozen ones included, they are equal)."""
    model_params = dict(model.named_parameters())
    for name, p in ema.named_parameters():
        p.mul_(decay).add_(model_params[name].detach(), alpha=1.0 - decay)
