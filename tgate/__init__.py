"""T-GATE (Liu et al. 2024): cache attention outputs once they converge; stop CFG after the gate step."""
from .apply import apply_tgate, is_gated, remove_tgate
from .config import TGateConfig
from .hook import TGateHook
from .schedule import PLAIN, Action, StepActions, check_schedule, gate_actions, gate_table
from .state import TGateState

__all__ = ["Action", "PLAIN", "StepActions", "TGateConfig", "TGateHook", "TGateState", "apply_tgate",
           "check_schedule", "gate_actions", "gate_table", "is_gated", "remove_tgate"]
