"""T-GATE (Liu et al. 2024): cache attention outputs once they converge; stop CFG after the gate step."""
from .apply import apply_tgate, is_gated, remove_tgate
from .config import TGateConfig
from .deepcache import DeepCacheConfig
from .hook import TGateHook
from .loaders import (
                      TgatePixArtAlphaLoader,
                      TgatePixArtSigmaLoader,
                      TgateSDDeepCacheLoader,
                      TgateSDLoader,
                      TgateSDXLDeepCacheLoader,
                      TgateSDXLLoader,
                      TgateSVDLoader,
)
from .pipelines import PipelineGate
from .schedule import PLAIN, Action, StepActions, check_schedule, gate_actions, gate_table
from .state import TGateState

__all__ = ["Action", "DeepCacheConfig", "PLAIN", "PipelineGate", "StepActions", "TGateConfig", "TGateHook",
           "TGateState", "TgatePixArtAlphaLoader", "TgatePixArtSigmaLoader", "TgateSDDeepCacheLoader",
           "TgateSDLoader", "TgateSDXLDeepCacheLoader", "TgateSDXLLoader", "TgateSVDLoader", "apply_tgate",
           "check_schedule", "gate_actions", "gate_table", "is_gated", "remove_tgate"]
