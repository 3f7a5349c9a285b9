"""The sampler core shared by every model: loop, solvers, guidance, hooks, seeds, outputs."""
from .context import Hook, SamplingPlan, StepContext
from .generate import Generation, generate
from .guidance import apply_cfg
from .respace import respaced_betas, space_timesteps
from .sampler import SampleResult, sample
from .seeding import class_labels, initial_noise, sample_generators
from .solvers import SAMPLERS, NoiseSchedule, Solver, build_solver

__all__ = [
    "Hook", "SamplingPlan", "StepContext", "Generation", "generate", "apply_cfg", "respaced_betas",
    "space_timesteps", "SampleResult", "sample", "class_labels", "initial_noise", "sample_generators",
    "SAMPLERS", "NoiseSchedule", "Solver", "build_solver",
]
