"""The demo's click handlers get Gradio's progress tracker (Gradio looks for it only among plain
positional parameters, so a bare `*values` handler never receives one)."""
import pytest

gr = pytest.importorskip("gradio")
from gradio.helpers import special_args  # noqa: E402

from demo.app import GENERATE_PROGRESS, DemoApp, build_app, with_progress  # noqa: E402


def test_with_progress_exposes_the_tracker_and_passes_it_on():
    calls = []

    def method(*values, progress=None):
        calls.append((values, progress))
        return "ok"

    handler = with_progress(method, 3, GENERATE_PROGRESS)
    inputs, progress_index, _, _ = special_args(handler, inputs=[1, 2, 3])
    assert progress_index == 3 and inputs == [1, 2, 3, GENERATE_PROGRESS]
    tracker = object()
    assert handler(1, 2, 3, tracker) == "ok" and calls[-1] == ((1, 2, 3), tracker)
    handler(1, 2, 3)  # called without one: the default
    assert calls[-1] == ((1, 2, 3), GENERATE_PROGRESS)
    # what the wrapper is for: Gradio finds no progress parameter behind *values
    assert special_args(DemoApp.generate, inputs=[0, 1, 2])[1] is None


def test_the_page_wires_generate_and_sweep_with_a_progress_tracker():
    app = build_app()
    handlers = {fn.fn.__name__: fn.fn for fn in app.fns.values() if fn.fn is not None}
    for name in ("generate", "sweep"):
        assert special_args(handlers[name])[1] is not None, name
