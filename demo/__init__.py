"""Interactive demo (Gradio): the speed/quality trade-off of T-Stitch and T-GATE, one click at a time.

    python scripts/demo.py            # http://127.0.0.1:7860

`demo.backend` composes and runs (no Gradio needed), `demo.app` builds the page; `gradio`
comes with the optional extra: pip install -e ".[demo]".
"""
from .backend import DemoBackend, DemoError
from .pairs import PAIRS, ModelPair, get_pair
from .settings import Settings, SettingsError, parse_settings

__all__ = ["DemoBackend", "DemoError", "PAIRS", "ModelPair", "get_pair", "Settings", "SettingsError", "parse_settings"]
