"""T-Stitch (Pan et al. 2024): small denoiser for the early steps, large for the rest."""
from .compat import check_stitchable, describe
from .hook import TStitchHook
from .pipeline import (
                       check_stitch_settings,
                       get_tstitch_pipeline,
                       get_tstitch_pipepline,
                       is_stitched,
                       stitch_pipeline,
                       unstitch_pipeline,
)
from .pipeline_compat import check_denoiser_pair
from .rules import RULES, TIMESTEP_FORMS, check_rule, models_for_steps
from .schedule import model_per_step, resolve_fractions, step_boundaries, steps_per_model
from .stitched import StitchedDenoiser

__all__ = ["RULES", "StitchedDenoiser", "TIMESTEP_FORMS", "TStitchHook", "check_denoiser_pair", "check_rule",
           "check_stitch_settings", "check_stitchable", "describe", "get_tstitch_pipeline", "get_tstitch_pipepline",
           "is_stitched", "model_per_step", "models_for_steps", "resolve_fractions", "step_boundaries",
           "steps_per_model", "stitch_pipeline", "unstitch_pipeline"]
