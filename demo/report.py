"""What the page shows: numbers as text, images for the gallery, the sweep as a plot and a table."""
from __future__ import annotations

import numpy as np
from PIL import Image

from .backend import GenerateResult, SweepPoint

MIN_DISPLAY_SIDE = 96   # 8x8 digits are blown up (nearest neighbour) so that a person can see them


def gallery_items(images: np.ndarray, labels: np.ndarray, show_labels: bool) -> list[tuple[Image.Image, str]]:
    """(N, H, W, 3) uint8 -> [(PIL image, caption)], small images enlarged by a whole factor."""
    factor = max(1, -(-MIN_DISPLAY_SIDE // images.shape[1]))
    items = []
    for k, (image, label) in enumerate(zip(images, labels, strict=True)):
        picture = Image.fromarray(image)
        if factor > 1:
            picture = picture.resize((image.shape[1] * factor, image.shape[0] * factor), Image.NEAREST)
        items.append((picture, f"class {int(label)}" if show_labels else f"#{k}"))
    return items


def format_macs(macs: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if macs >= scale:
            return f"{macs / scale:.2f} {unit}"
    return f"{macs:.0f}"


def generate_summary(result: GenerateResult) -> str:
    """Markdown: sampling time, steps per model, MACs, speed-up against the large model alone."""
    run, ref = result.run, result.large_alone
    m = run.metrics
    steps = ", ".join(f"{name} {n}" for name, n in m["steps_per_model"].items())
    accel = m.get("accel", "")
    return "\n".join([
        f"**Sampling time: {run.sampling_seconds:.2f} s** for {m['num_images']} images "
        f"({m['images_per_second']:.1f} images/s; "
        f"the whole click {run.wall_seconds:.1f} s with loading and MACs counting)",
        "",
        f"- steps per model: {steps} of {m['steps']} ({m['sampler']}, guidance {m['cfg_scale']:g}, accel `{accel}`)",
        f"- denoiser MACs per image: **{format_macs(run.macs_per_image)}** "
        f"({result.large_name} alone: {format_macs(ref.macs_per_image)}, **{result.macs_speedup:.2f}x** fewer)",
        f"- speed-up against {result.large_name} alone: **{result.time_speedup:.2f}x** measured "
        f"({ref.sampling_seconds:.2f} s alone, timed once per setting on {m['device']})",
    ])


def sweep_table(points: list[SweepPoint]) -> str:
    base = next((p for p in points if p.fraction == 0.0), None)
    lines = ["| small fraction | steps per model | classifier agreement | sampling s | MACs / image | vs large alone |",
             "|---|---|---|---|---|---|"]
    for p in points:
        steps = " / ".join(str(n) for n in p.steps_per_model.values())
        acc = f"{p.accuracy:.3f}" if p.accuracy is not None else "-"
        speed = f"{base.sampling_seconds / max(p.sampling_seconds, 1e-9):.2f}x" if base else "-"
        lines.append(f"| {p.fraction:g} | {steps} | {acc} | {p.sampling_seconds:.2f} "
                     f"| {format_macs(p.macs_per_image)} | {speed} |")
    return "\n".join(lines)


def sweep_figure(points: list[SweepPoint]):
    """Quality (where measured) and sampling time against the small-model fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = [p.fraction for p in points]
    has_quality = any(p.accuracy is not None for p in points)
    fig, axes = plt.subplots(1, 2 if has_quality else 1, figsize=(9 if has_quality else 5, 3.2), squeeze=False)
    axes = axes[0]
    if has_quality:
        axes[0].plot(fractions, [p.accuracy for p in points], "o-", color="tab:green")
        axes[0].set_ylabel("classifier agreement")
        axes[0].set_ylim(0, 1.02)
    time_ax = axes[-1]
    time_ax.plot(fractions, [p.sampling_seconds for p in points], "o-", color="tab:blue")
    time_ax.set_ylabel("sampling time (s)")
    time_ax.set_ylim(bottom=0)
    for ax in axes:
        ax.set_xlabel("fraction of steps on the small model")
        ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0, 1, 0.9))   # room at the top for the page's label over the plot
    plt.close(fig)   # gradio renders the figure object; keep pyplot's registry from growing per click
    return fig
