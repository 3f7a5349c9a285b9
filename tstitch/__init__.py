"""T-Stitch (Pan et al. 2024): small denoiser for the early steps, large for the rest."""
from .compat import check_stitchable, describe
from .hook import TStitchHook
from .schedule import model_per_step, resolve_fractions, step_boundaries, steps_per_model

__all__ = ["TStitchHook", "check_stitchable", "describe", "model_per_step", "resolve_fractions",
           "step_boundaries", "steps_per_model"]
