"""The `device` setting: auto, cpu, cuda[:N], mps, checked against this machine before any work."""
from __future__ import annotations

import torch

from diffusion.errors import UserError

DEVICES = "auto, cpu, cuda, cuda:<index>, mps"


def check_device(name) -> torch.device:
    """device=...: auto, cpu, cuda[:N] (when CUDA is there), mps (when MPS is there)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(str(name))
    except (RuntimeError, ValueError):
        raise UserError.setting("device", name, f"not a device; allowed: {DEVICES}") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError.setting("device", name, f"not supported here; allowed: {DEVICES}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError.setting("device", name, "CUDA is not available here; use device=cpu or device=auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError.setting("device", name, f"this machine has {torch.cuda.device_count()} CUDA device(s): "
                                                    f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError.setting("device", name, "MPS is not available here; use device=cpu or device=auto")
    return device
