"""A run's speed settings (`precision`, `compile`, `compile_backend`, `compile_mode`), resolved once and applied to
the networks it builds: scripts/sample.py's run and the benchmarks share them."""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from diffusion.compile import check_compile, compile_denoiser, resolve_compile_mode
from diffusion.precision import compute_dtype, resolve_precision, tf32_matmuls


@dataclass(frozen=True)
class Speed:
    precision: str  # resolved: fp32 | tf32 | bf16 | fp16
    compile: str = "none"
    backend: str = "inductor"
    device: torch.device = torch.device("cpu")
    compile_mode: str = "default"  # resolved: reduce-overhead on a CPU is default (diffusion.compile)

    @classmethod
    def from_config(cls, cfg, device: torch.device) -> Speed:
        """From a config's top-level keys (precision, compile, compile_backend, compile_mode); bad values
        raise here."""
        mode, backend = cfg.get("compile", "none"), cfg.get("compile_backend", "inductor")
        compile_mode = cfg.get("compile_mode", "default")
        check_compile(mode, backend, compile_mode)
        precision = resolve_precision(cfg.get("precision", "auto"), device)
        if mode != "none":
            compile_mode = resolve_compile_mode(compile_mode, device)
        return cls(precision, mode, backend, torch.device(device), compile_mode)

    @property
    def dtype(self) -> torch.dtype:
        """The networks' type; the sampler keeps latents, guidance and the solver in float32."""
        return compute_dtype(self.precision)

    def cast(self, model: nn.Module) -> nn.Module:
        """The network in the run's type, in place (built in float32 first, so bf16 weights are the
        float32 ones rounded)."""
        return model.to(self.dtype)

    def compile_model(self, model: nn.Module) -> nn.Module:
        """torch.compile per `compile`, in place and lazy: the first forwards compile."""
        compile_denoiser(model, self.compile, self.backend, self.compile_mode)
        return model

    def matmuls(self) -> AbstractContextManager:
        """TF32 switched per precision for the block (CUDA only)."""
        return tf32_matmuls(self.precision, self.device)

    def as_metrics(self) -> dict:
        return {"precision": self.precision, "compile": self.compile, "compile_mode": self.compile_mode}
