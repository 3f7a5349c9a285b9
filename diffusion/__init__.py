"""The sampling core: what models (dit/, ldm/) and techniques (tgate/, tstitch/, deep_cache/) build on.

The loop (`sample`), solvers and respacing, guidance, the step context and hook protocol, seeds,
attention marking, MACs counting, precision and compile, random weights, the first stage, safe
checkpoint reading, atomic outputs and errors. It imports no model, technique, job or training code.
"""
from .context import Hook, SamplingPlan, StepContext
from .guidance import apply_cfg
from .respace import respaced_betas, space_timesteps
from .sampler import SampleResult, sample
from .seeding import class_labels, initial_noise, sample_generators
from .solvers import SAMPLERS, NoiseSchedule, Solver, build_solver

__all__ = [
    "Hook", "SamplingPlan", "StepContext", "apply_cfg", "respaced_betas",
    "space_timesteps", "SampleResult", "sample", "class_labels", "initial_noise", "sample_generators",
    "SAMPLERS", "NoiseSchedule", "Solver", "build_solver",
]
