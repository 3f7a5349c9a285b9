"""The Gradio page: pick a pair, the stitching fraction, T-GATE, sampler and steps; Generate and Sweep.

Handlers never let an exception reach Gradio: a setting a person can fix, missing weights or a
pair not in this build come back as a message in the page's status line; anything else is
logged with its traceback on the console and shown as a one-line error. The app keeps serving.
"""
from __future__ import annotations

import html
import inspect
import logging

import gradio as gr

from .backend import DemoBackend, DemoError
from .pairs import DEFAULT_PAIR, PAIRS, SLOT_LABELS, get_pair
from .report import gallery_items, generate_summary, sweep_figure, sweep_table
from .settings import (
    PIPELINE_SAMPLERS,
    PRECISIONS,
    SAMPLERS,
    SettingsError,
    check_number,
    parse_fractions,
    parse_settings,
)

log = logging.getLogger(__name__)

CSS = """
#status .demo-error { color: #b91c1c; font-weight: 600; }
#status .demo-ok { color: #15803d; }
"""

# system fonts only: the default theme would ask a web font service, which an offline machine cannot reach
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])

INTRO = """# T-Stitch and T-GATE: speed against quality
A small denoiser runs the first fraction of the sampling steps and the large one the rest
(**T-Stitch**); attention outputs are cached once they settle and guidance stops at the gate
step (**T-GATE**). **Generate** samples with your settings and reports the sampling time, the denoiser
MACs and the speed-up against the large model alone; **Sweep** runs a few fractions and plots
quality and time against the fraction."""

# the handlers' progress defaults (Gradio recognises a progress parameter by its gr.Progress default)
GENERATE_PROGRESS = gr.Progress(track_tqdm=True)
SWEEP_PROGRESS = gr.Progress(track_tqdm=True)


def _status(message: str, ok: bool) -> str:
    css = "demo-ok" if ok else "demo-error"
    prefix = "" if ok else "Error: "
    return f'<p class="{css}">{html.escape(prefix + message)}</p>'


def _pair_note(pair) -> str:
    unavailable = pair.availability_error()
    hints = "; ".join(f"{SLOT_LABELS[s].split(' (')[0]}: {h}" for s, h in pair.defaults_hint.items())
    text = pair.note + (f"\n\nBlank weights mean: {hints}." if hints else "")
    return f"**Not available:** {unavailable}" if unavailable else text


def with_progress(method, num_inputs: int, progress: gr.Progress):
    """method(*values, progress=...) as a click handler with `num_inputs` positional inputs then `progress`.

    Gradio hands a progress tracker only to a parameter it finds among the plain positional ones (it stops
    at `*values`), so the handler gets an explicit signature: inputs v0..v{n-1}, then progress."""
    def handler(*args):
        *values, tracker = args if len(args) == num_inputs + 1 else (*args, progress)
        return method(*values, progress=tracker)

    params = [inspect.Parameter(f"v{i}", inspect.Parameter.POSITIONAL_OR_KEYWORD) for i in range(num_inputs)]
    params.append(inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=progress))
    handler.__signature__ = inspect.Signature(params)
    handler.__name__ = getattr(method, "__name__", "handler")
    return handler


class DemoApp:
    """The page's handlers over one backend (kept apart from the layout so tests can call them)."""

    def __init__(self, backend: DemoBackend):
        self.backend = backend

    def settings(self, pair_label, large, small, first_stage, fraction, tgate, gate_step, sp_interval,
                 fi_interval, warm_up, sampler, steps, cfg_scale, labels, prompt, seed, num_samples, random_weights,
                 precision="auto"):
        return parse_settings(
            pair_label, fraction=fraction, sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=seed,
            num_samples=num_samples, labels=labels, prompt=prompt, tgate=tgate, gate_step=gate_step,
            sp_interval=sp_interval, fi_interval=fi_interval, warm_up=warm_up,
            weights={"large": large, "small": small, "first_stage": first_stage}, random_weights=random_weights,
            precision=precision)

    def generate(self, *values, progress=GENERATE_PROGRESS):
        """-> (status html, gallery items, summary markdown)."""
        try:
            settings = self.settings(*values)
            result = self.backend.generate(settings, progress=lambda share, what: progress(share, desc=what))
        except (SettingsError, DemoError) as e:
            return _status(str(e), ok=False), gr.update(), gr.update()
        except Exception as e:  # noqa: BLE001 - the page must keep serving; the console gets the traceback
            log.exception("generate failed")
            return _status(f"{type(e).__name__}: {e}", ok=False), gr.update(), gr.update()
        run = result.run
        items = gallery_items(run.images, run.labels, settings.labels is not None)
        status = (f"Generated {len(run.images)} images in {run.sampling_seconds:.2f} s of sampling "
                  f"({result.time_speedup:.2f}x against {result.large_name} alone).")
        return _status(status, ok=True), items, generate_summary(result)

    def sweep(self, *values, progress=SWEEP_PROGRESS):
        """values: the Generate inputs, then the sweep fractions text and images per fraction.
        -> (status html, figure, table markdown)."""
        *generate_values, fractions_text, sweep_samples = values
        try:
            settings = self.settings(*generate_values)
            fractions = parse_fractions(fractions_text)
            n = check_number("images per fraction", sweep_samples, whole=True, low=1, high=1000)
            points = self.backend.sweep(settings, fractions, n, progress=lambda share, what: progress(share, desc=what))
        except (SettingsError, DemoError) as e:
            return _status(str(e), ok=False), gr.update(), gr.update()
        except Exception as e:  # noqa: BLE001
            log.exception("sweep failed")
            return _status(f"{type(e).__name__}: {e}", ok=False), gr.update(), gr.update()
        gate = f", T-GATE gate step {settings.gate_step}" if settings.tgate else ""
        status = f"Swept {len(points)} fractions ({n} images each, {settings.sampler} {settings.steps} steps{gate})."
        return _status(status, ok=True), sweep_figure(points), sweep_table(points)

    @staticmethod
    def pair_changed(pair_label):
        """New pair: its note, defaults and which of labels / prompt / weight boxes apply."""
        pair = get_pair(pair_label)
        text = pair.conditioning == "text"
        return (
            _pair_note(pair),
            *[gr.update(visible=slot in pair.weights, value="", placeholder=pair.defaults_hint.get(slot, ""))
              for slot in ("large", "small", "first_stage")],
            gr.update(value=pair.fraction), gr.update(value=pair.sampler), gr.update(value=pair.steps),
            gr.update(value=pair.cfg_scale), gr.update(value=pair.gate_step), gr.update(value=pair.sp_interval),
            gr.update(value=pair.fi_interval), gr.update(value=pair.warm_up),
            gr.update(visible=not text, value=pair.labels), gr.update(visible=text, value=pair.prompt),
            gr.update(value=pair.num_samples),
        )


def build_app(backend: DemoBackend | None = None) -> gr.Blocks:
    handlers = DemoApp(backend or DemoBackend())
    pair = PAIRS[DEFAULT_PAIR]
    with gr.Blocks(title="T-Stitch x T-GATE demo", analytics_enabled=False) as app:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=2, min_width=340):
                pair_box = gr.Dropdown([p.label for p in PAIRS.values()], value=pair.label, label="model pair",
                                       elem_id="pair")
                pair_note = gr.Markdown(_pair_note(pair), elem_id="pair_note")
                with gr.Accordion("weights (blank: the pair's default)", open=False):
                    weight_boxes = [gr.Textbox(label=SLOT_LABELS[slot], placeholder=pair.defaults_hint.get(slot, ""),
                                               visible=slot in pair.weights, elem_id=f"weights_{slot}")
                                    for slot in ("large", "small", "first_stage")]
                    random_weights = gr.Checkbox(False, label="random weights (no weights read: timing only)",
                                                 elem_id="random_weights")
                    precision = gr.Dropdown(list(PRECISIONS), value="auto", elem_id="precision",
                                            label="precision (auto: tf32 on CUDA, fp32 on CPU)")
                fraction = gr.Slider(0, 1, value=pair.fraction, step=0.05,
                                     label="T-Stitch: fraction of steps on the small model", elem_id="fraction")
                with gr.Group():
                    tgate = gr.Checkbox(False, label="T-GATE (cached attention, guidance stops at the gate step)",
                                        elem_id="tgate")
                    with gr.Row():
                        gate_step = gr.Number(pair.gate_step, label="gate step", precision=0, elem_id="gate_step")
                        sp_interval = gr.Number(pair.sp_interval, label="sp_interval", precision=0,
                                                elem_id="sp_interval")
                        fi_interval = gr.Number(pair.fi_interval, label="fi_interval", precision=0,
                                                elem_id="fi_interval")
                        warm_up = gr.Number(pair.warm_up, label="warm_up", precision=0, elem_id="warm_up")
                with gr.Row():
                    sampler = gr.Dropdown(list(SAMPLERS + PIPELINE_SAMPLERS), value=pair.sampler, label="sampler",
                                          elem_id="sampler")
                    steps = gr.Number(pair.steps, label="steps", precision=0, elem_id="steps")
                    cfg_scale = gr.Number(pair.cfg_scale, label="guidance scale", elem_id="cfg_scale")
                labels = gr.Textbox(pair.labels, label="class labels (comma-separated, used cyclically)",
                                    elem_id="labels")
                prompt = gr.Textbox(pair.prompt, label="prompt", visible=pair.conditioning == "text", elem_id="prompt")
                with gr.Row():
                    seed = gr.Number(0, label="seed", precision=0, elem_id="seed")
                    num_samples = gr.Number(pair.num_samples, label="images", precision=0, elem_id="num_samples")
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Accordion("fraction sweep", open=True):
                    with gr.Row():
                        sweep_fractions = gr.Textbox("0, 0.2, 0.4, 0.6, 0.8, 1", label="fractions",
                                                     elem_id="sweep_fractions")
                        sweep_samples = gr.Number(50, label="images per fraction", precision=0, elem_id="sweep_samples")
                    sweep_button = gr.Button("Sweep fractions", elem_id="sweep")
            with gr.Column(scale=3):
                status = gr.HTML("", elem_id="status")
                gallery = gr.Gallery(label="samples", columns=5, fit_columns=False, height=310, object_fit="contain",
                                     elem_id="gallery")
                summary = gr.Markdown("", elem_id="summary")
                plot = gr.Plot(label="quality and time against the fraction", elem_id="sweep_plot")
                table = gr.Markdown("", elem_id="sweep_table")

        inputs = [pair_box, *weight_boxes, fraction, tgate, gate_step, sp_interval, fi_interval, warm_up,
                  sampler, steps, cfg_scale, labels, prompt, seed, num_samples, random_weights, precision]
        generate_button.click(with_progress(handlers.generate, len(inputs), GENERATE_PROGRESS), inputs,
                              [status, gallery, summary], concurrency_limit=1)
        sweep_inputs = inputs + [sweep_fractions, sweep_samples]
        sweep_button.click(with_progress(handlers.sweep, len(sweep_inputs), SWEEP_PROGRESS), sweep_inputs,
                           [status, plot, table], concurrency_limit=1)
        pair_box.change(handlers.pair_changed, [pair_box],
                        [pair_note, *weight_boxes, fraction, sampler, steps, cfg_scale, gate_step, sp_interval,
                         fi_interval, warm_up, labels, prompt, num_samples])
    return app


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, share: bool = False, **kwargs):
    """Serve the page (blocks until stopped unless prevent_thread_lock=True is passed)."""
    return app.launch(server_name=host, server_port=port, share=share, theme=THEME, css=CSS,
                      ssr_mode=False, footer_links=[], **kwargs)
