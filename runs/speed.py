"""A run's speed settings (`precision`, `compile`, `compile_backend`), resolved once and applied to
the networks it builds: scripts/sample.py's run and the benchmarks share them."""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from diffusion.compile import check_compile, compile_denoiser
from diffusion.precision import compute_dtype, resolve_precision, tf32_matmuls


@dataclass(frozen=True)
class Speed:
    precision: str  # resolved: fp32 | tf32 | bf16 | fp16
    compile: str = "none"
    backend: str = "inductor"
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_config(cls, cfg, device: torch.device) -> Speed:
        """From a config's top-level keys (precision, compile, compile_backend); bad values raise here."""
        mode, backend = cfg.get("compile", "none"), cfg.get("compile_backend", "inductor")
        check_compile(mode, backend)
        return cls(resolve_precision(cfg.get("precision", "auto"), device), mode, backend, torch.device(device))

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
        compile_denoiser(model, self.compile, self.backend)
        return model

    def matmuls(self) -> AbstractContextManager:
        """TF32 switched per precision for the block (CUDA only)."""
        return tf32_matmuls(self.precision, self.device)

    def as_metrics(self) -> dict:
        return {"precision": self.precision, "compile": self.compile}
