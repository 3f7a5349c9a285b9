"""What the sampling loop tells hooks, and what hooks may decide, per step."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingPlan:
    """Fixed for one sampling run; handed to every hook's `start`."""

    num_steps: int
    num_models: int
    batch_size: int  # B: samples in this run (the CFG batch is 2B)
    cfg_scale: float
    use_cfg: bool  # both CFG branches run (until a hook turns guidance off)
    model_timesteps: tuple[float, ...]  # training-scale t of each step, on the host


@dataclass
class StepContext:
    """One step. The loop fills the first fields; hooks may change the decisions."""

    i: int  # step index, 0..n-1: hooks select steps by this, never by t on the device
    n: int
    t: torch.Tensor  # (B,) training-scale timesteps on the sampling device
    timestep: float  # the same step's timestep, as a host number
    # decisions
    model_index: int = 0  # which denoiser runs this step (T-Stitch)
    guidance: bool = True  # run both CFG branches; False: one branch at batch B
    branch: str = "cond"  # the branch that runs when guidance is off: "cond" or "uncond"
    attention: dict = field(default_factory=dict)  # per-step attention decisions (T-GATE)
    # feature caches (DeepCache) must recompute everything this step: set by a hook whose step
    # changes what a forward computes (T-GATE at gate_step - 1 and gate_step, as tgate's DeepCache loaders)
    refresh_features: bool = False


class Hook:
    """Base for sampler hooks; every method is optional.

    Hooks hold their own state and reset it in `start`, so one hook object can serve
    many sampling runs. `attach` is called once by whoever builds the run, before any
    sampling: a hook checks the denoisers there (and may wrap their modules, undone
    in `detach`).
    """

    def attach(self, models: list, names: list[str], solver) -> None:
        pass

    def detach(self) -> None:
        pass

    def start(self, plan: SamplingPlan) -> None:
        pass

    def step(self, ctx: StepContext) -> None:
        pass

    def end(self) -> None:
        pass
