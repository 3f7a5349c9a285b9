"""Run one classifier-free-guidance branch where the pipeline asks for both.

A diffusers pipeline batches the CFG branches as [uncond; cond] (2B rows) and combines
the denoiser's halves as `uncond + scale * (cond - uncond)`. After T-GATE's gate step
only one branch should run. Instead of changing the pipeline, a forward pre-hook on the
denoiser keeps one half of every batched input (B rows), and a forward hook hands the
pipeline that one output twice: `out + scale * (out - out)` is `out` exactly, so the
pipeline's own guidance arithmetic yields the single branch's prediction.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from diffusion.errors import UserError

HALVES = {"uncond": 0, "cond": 1}  # position of each branch in the pipelines' CFG batch


def _map_tensors(value, fn):
    """Apply fn to every tensor in value (nested tuples, lists, dicts, diffusers outputs)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, Mapping):  # dicts and diffusers' BaseOutput (an OrderedDict dataclass)
        mapped = {key: _map_tensors(item, fn) for key, item in value.items()}
        return mapped if type(value) is dict else type(value)(**mapped)
    if isinstance(value, tuple):
        return tuple(_map_tensors(item, fn) for item in value)
    if isinstance(value, list):
        return [_map_tensors(item, fn) for item in value]
    return value


def take_branch(args: tuple, kwargs: dict, rows: int, branch: str) -> tuple[tuple, dict]:
    """Keep one CFG half of every input whose first dimension is the CFG batch (`rows`).

    Inputs of another batch size (a 0-d timestep, a guidance embedding of B rows, flags)
    pass through unchanged.
    """
    if rows % 2:
        raise UserError(f"tgate: the denoiser's CFG batch has {rows} rows; expected an even number "
                         "([uncond; cond] halves)")
    half = rows // 2
    start = HALVES[branch] * half

    def pick(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.ndim >= 1 and tensor.shape[0] == rows:
            return tensor[start:start + half]  # (B, ...): a contiguous view of the chosen half
        return tensor

    return _map_tensors(args, pick), _map_tensors(kwargs, pick)


def repeat_branch(output, rows: int):
    """The one-branch output (B rows) twice, as the CFG batch (2B rows) the pipeline expects."""
    half = rows // 2

    def twice(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.ndim >= 1 and tensor.shape[0] == half:
            return torch.cat([tensor, tensor])
        return tensor

    return _map_tensors(output, twice)


def batch_rows(args: tuple, kwargs: dict) -> int:
    """Rows of the denoiser's sample input (diffusers names it `sample` or `hidden_states`)."""
    for key in ("sample", "hidden_states", "x"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key].shape[0]
    for value in args:
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    raise TypeError("tgate: denoiser called without a sample tensor")
