"""`precision`: the number type the networks run in, and the TF32 switch.

fp32   float32, TF32 off (also cuDNN's, which PyTorch leaves on by default)
tf32   float32 weights and activations, TF32 tensor cores for matmuls and convolutions on CUDA, as
       the official DiT sampling scripts run (`--tf32`, default on); on a CPU there are no TF32
       units and nothing is switched: tf32 is fp32 bit for bit
bf16   the networks (denoisers, first stage) are cast to bfloat16 (weights cast, not autocast)
fp16   likewise float16
auto   tf32 on CUDA, fp32 elsewhere

Only the networks change type: noise, the guidance combination, the solver update and the latents
between steps stay float32 (the sampler casts each network input and output; diffusion/sampler.py).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from diffusion.errors import UserError

PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """`precision` as the run will use it on `device` (auto resolved); refuses what the device cannot run."""
    if precision not in PRECISIONS:
        raise UserError(f"precision={precision!r}: allowed values are {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if precision == "auto":
        return "tf32" if device.type == "cuda" else "fp32"
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError(f"precision=bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                         "use fp16, tf32 or fp32")
    if device.type == "cuda" and precision == "tf32" and torch.cuda.get_device_capability(device)[0] < 8:
        raise UserError(f"precision=tf32: {torch.cuda.get_device_name(device)} has no TF32 units (they came with "
                         "Ampere, compute capability 8.0); use fp32 or fp16")
    return precision


def compute_dtype(precision: str) -> torch.dtype:
    """The type the networks run in for a resolved precision."""
    return _DTYPES[precision]


@contextmanager
def tf32_matmuls(precision: str, device: torch.device):
    """TF32 for CUDA matmuls and cuDNN convolutions on for tf32 (and bf16/fp16, whose few float32
    matmuls may as well), off for fp32, for the block; the previous flags are restored after.
    Nothing is touched off CUDA."""
    if torch.device(device).type != "cuda":
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    previous = matmul.allow_tf32, cudnn.allow_tf32
    matmul.allow_tf32 = cudnn.allow_tf32 = precision != "fp32"
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = previous
