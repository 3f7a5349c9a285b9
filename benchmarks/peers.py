"""Ours against diffusers on one DiT, same weights, labels and noise: the rows of scripts/bench_peers.py.

(a) diffusers' DiTTransformer2DModel holding our weights (dit.convert), driven by our sampler: the
    like-for-like row (only its timestep frequencies differ: diffusers divides by half - 1)
(b) diffusers' DiTPipeline as a user runs it: its own DDIM spacing, loop and scheduler steps on the
    doubled batch; its VAE decode is timed apart and left out of the row's time
(c) ours, eager, fp32          (d) ours, compile=regional
(e) ours in bf16, eager and with compile=regional
(f) T-Stitch: DiT-S/2 for the first `ratio` of the steps, then the model; eager and compiled, in
    `stitch_precision` (fp32, tf32 or bf16: on a GPU, the fastest plain setting)
On CUDA two more rows: ours in tf32, eager and compiled (on a CPU tf32 is fp32 bit for bit).

Every row samples the same `batch_size` images (class labels and per-sample noise from the seed)
with DDIM and guidance on all four latent channels (guided_channels=null, what diffusers does).
Rows are timed round-robin (repeat 1 of every row, then repeat 2, ...): a drift of the machine hits
all of them; the median of each row is reported. Compiled rows run copies of the eager rows' models
(same weights), compiled in place; an eager row never runs through compiled code (torch.compile's
"force_eager" stance was measured 2.5% slower than a plain module, which would flatter compile).
"""
from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

from diffusion.compile import COMPILE_BACKENDS, CompileStats, compile_denoiser
from diffusion.errors import UserError
from diffusion.precision import tf32_matmuls
from diffusion.random_weights import fill_zero_init_layers
from diffusion.sampler import sample
from diffusion.seeding import initial_noise, sample_generators
from diffusion.solvers import build_solver
from dit import build_dit
from dit.convert import official_to_diffusers
from tstitch import TStitchHook


class DiffusersDenoiser(torch.nn.Module):
    """diffusers' DiT behind our denoiser interface model(x, t, y) -> (B, 2C, H, W)."""

    def __init__(self, model: DiTTransformer2DModel):
        super().__init__()
        self.model = model

    def forward(self, x, t, y):
        return self.model(x, timestep=t, class_labels=y).sample


@dataclass
class Row:
    key: str                       # a, b, c, ...
    label: str
    # samples the batch: (final latents (B, C, H, W), seconds inside the call not to count: (b)'s VAE decode)
    run: Callable[[], tuple[torch.Tensor, float]]
    models: list = field(default_factory=list)  # the networks the row runs (their weights count in its memory)
    precision: str = "fp32"        # TF32 on (tf32) or off (fp32) for the row's matmuls, on CUDA
    seconds: list[float] = field(default_factory=list)
    extra_seconds: list[float] = field(default_factory=list)  # what was left out of `seconds` ((b): VAE decode)
    latents: torch.Tensor | None = None
    peak_bytes: int | None = None  # CUDA: the row's weights + the most its run allocated on top
    compile_seconds: float = 0.0
    compile_counts: dict = field(default_factory=dict)  # compiled_graphs, recompiles, recompile_limit_hit


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_dit(name: str, latent: int, device: torch.device) -> torch.nn.Module:
    """`name` with pretrained=false's random weights (non-zero outputs), float32, eval."""
    model = build_dit(name, input_size=latent)
    fill_zero_init_layers(model)
    return model.to(device).eval()


def random_sd_vae(arch: dict, device: torch.device) -> AutoencoderKL:
    return AutoencoderKL(**arch).to(device).eval()


def _int_at_least(key: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError.setting(key, value, f"must be an integer >= {low}")


def check_settings(cfg, folder=None, key=None) -> None:
    """Every setting of scripts/bench_peers.py (configs/bench_peers.yaml), before the first measurement,
    each named as typed (`steps=0`, `models=[...]`). folder, key: the run folder and its setting (unused:
    the form of the run-folder callback's check)."""
    from dit import DiT_models
    from dit.models import dit_config
    from runs.devices import check_device

    models = list(cfg.models) if not isinstance(cfg.models, str) else None
    if not models:
        raise UserError.setting("models", cfg.models, f"must be a non-empty list of DiT names: {', '.join(DiT_models)}")
    shown = "[" + ", ".join(str(m) for m in models) + "]"
    for name in [*models, cfg.small]:
        if name not in DiT_models:
            key, value = ("models", shown) if name in models else ("small", name)
            raise UserError.setting(key, value, f"unknown DiT model {name}; allowed: {', '.join(DiT_models)}")
    ratio = cfg.ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
        raise UserError.setting("ratio", ratio, "the small model's share of the steps: a number in [0, 1]")
    if cfg.stitch_precision not in ("fp32", "tf32", "bf16"):
        raise UserError.setting("stitch_precision", cfg.stitch_precision, "allowed values are fp32, tf32, bf16")
    _int_at_least("steps", cfg.steps, 1)
    _int_at_least("batch_size", cfg.batch_size, 1)
    _int_at_least("repeats", cfg.repeats, 1)
    _int_at_least("warmup", cfg.warmup, 0)
    _int_at_least("seed", cfg.seed, 0)
    if cfg.threads is not None:
        _int_at_least("threads", cfg.threads, 1)
    _int_at_least("image_size", cfg.image_size, 8)
    for name in {*models, cfg.small}:
        patch = dit_config(name)["patch_size"]
        if cfg.image_size % (8 * patch):
            raise UserError.setting("image_size", cfg.image_size, f"must be a multiple of {8 * patch} (the VAE's 8 "
                                                                  f"times {name}'s patch size {patch})")
    scale = cfg.cfg_scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale < 1:
        raise UserError.setting("cfg_scale", scale, "must be a number >= 1 (the rows run guided)")
    if cfg.compile_backend not in COMPILE_BACKENDS:
        raise UserError.setting("compile_backend", cfg.compile_backend, f"allowed: {', '.join(COMPILE_BACKENDS)}")
    check_device(cfg.device)


def build_rows(name: str, small_name: str, *, image_size: int, steps: int, cfg_scale: float, batch_size: int,
               ratio: float, vae_arch: dict, seed: int, device: torch.device, backend: str,
               stitch_precision: str = "fp32") -> list[Row]:
    """The rows for model `name` (T-Stitch rows with `small_name` unless it is the model itself)."""
    if stitch_precision not in ("fp32", "tf32", "bf16"):
        raise UserError(f"stitch_precision={stitch_precision!r}: allowed values are fp32, tf32, bf16")
    latent = image_size // 8
    torch.manual_seed(seed)
    ours = random_dit(name, latent, device)
    dsd, dconfig = official_to_diffusers(ours.state_dict())
    theirs = DiTTransformer2DModel(**dconfig)
    theirs.load_state_dict(dsd)
    theirs = theirs.to(device).eval()
    bf16 = copy.deepcopy(ours).to(torch.bfloat16)
    small = random_dit(small_name, latent, device) if small_name != name else None
    if small is not None and stitch_precision == "bf16":
        small = small.to(torch.bfloat16)

    def compiled(model):  # a copy with the same weights, compile=regional (lazy: the warm-up compiles)
        twin = copy.deepcopy(model)
        compile_denoiser(twin, "regional", backend)
        return twin

    ours_c, bf16_c = compiled(ours), compiled(bf16)
    small_c = compiled(small) if small is not None else None

    solver = build_solver("ddim", steps, learned_variance=True)
    gens = lambda: sample_generators(seed, range(batch_size), device)  # noqa: E731 - fresh per run
    labels = torch.arange(batch_size, device=device) * 97 % 1000
    null = torch.full_like(labels, 1000)

    def ours_run(models, hooks=(), dtype=None):
        def run():
            g = gens()
            noise = initial_noise(g, (4, latent, latent), device)
            return sample(models, solver, noise, {"y": labels}, {"y": null}, cfg_scale=cfg_scale,
                          guided_channels=None, hooks=list(hooks), generators=g, progress=False,
                          model_dtype=dtype).latents, 0.0
        return run

    pipe = DiTPipeline(transformer=theirs, vae=random_sd_vae(vae_arch, device),
                       scheduler=DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                               clip_sample=False))
    pipe.set_progress_bar_config(disable=True)

    def pipeline_run():
        captured, decode = {}, pipe.vae.decode

        def timed_decode(z, *args, **kwargs):
            _sync(device)
            start = time.perf_counter()
            captured["latents"] = z.float() * pipe.vae.config.scaling_factor
            out = decode(z, *args, **kwargs)
            _sync(device)
            captured["seconds"] = time.perf_counter() - start
            return out

        pipe.vae.decode = timed_decode
        try:
            pipe(class_labels=labels.tolist(), num_inference_steps=steps, guidance_scale=cfg_scale,
                 generator=gens(), output_type="np")
        finally:
            del pipe.vae.decode
        return captured["latents"], captured["seconds"]

    stitch = [TStitchHook(ratio=ratio)]
    rows = [
        Row("a", "diffusers DiTTransformer2DModel, our sampler", ours_run([DiffusersDenoiser(theirs)]), [theirs]),
        Row("b", "diffusers DiTPipeline (loop only)", pipeline_run, [theirs, pipe.vae]),
        Row("c", "ours, eager fp32", ours_run([ours]), [ours]),
        Row("d", "ours, compile=regional", ours_run([ours_c]), [ours_c]),
        Row("e", "ours, bf16", ours_run([bf16], dtype=torch.bfloat16), [bf16]),
        Row("e+", "ours, bf16 + compile=regional", ours_run([bf16_c], dtype=torch.bfloat16), [bf16_c]),
    ]
    if device.type == "cuda":
        rows += [Row("c-tf32", "ours, eager tf32", ours_run([ours]), [ours], precision="tf32"),
                 Row("d-tf32", "ours, tf32 + compile=regional", ours_run([ours_c]), [ours_c], precision="tf32")]
    if small is not None:
        large, large_c = (bf16, bf16_c) if stitch_precision == "bf16" else (ours, ours_c)
        dtype = torch.bfloat16 if stitch_precision == "bf16" else None
        where = "" if stitch_precision == "fp32" else f", {stitch_precision}"
        rows += [Row("f", f"T-Stitch {ratio} ({small_name} first){where}, eager",
                     ours_run([small, large], stitch, dtype), [small, large], precision=stitch_precision),
                 Row("f+", f"T-Stitch {ratio} ({small_name} first){where}, compiled",
                     ours_run([small_c, large_c], stitch, dtype), [small_c, large_c], precision=stitch_precision)]
    return rows


def _weight_bytes(models) -> int:
    return sum(p.numel() * p.element_size() for m in models for p in m.parameters())


def _once(row: Row, device: torch.device) -> float:
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    with tf32_matmuls("tf32" if row.precision == "tf32" else "fp32", device):
        _sync(device)
        start = time.perf_counter()
        latents, left_out = row.run()
        _sync(device)
        seconds = time.perf_counter() - start - left_out
    if left_out:
        row.extra_seconds.append(left_out)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - before + _weight_bytes(row.models)
        row.peak_bytes = max(row.peak_bytes or 0, peak)
    if row.latents is None:
        row.latents = latents.float().cpu()
    return seconds


@torch.no_grad()
def time_rows(rows: list[Row], *, repeats: int, warmup: int, device: torch.device) -> None:
    """Warm each row up (compiling happens here, timed apart), then time them round-robin."""
    for row in rows:
        with CompileStats() as compiled:
            for _ in range(warmup):
                _once(row, device)
        row.compile_seconds = compiled.seconds
        row.compile_counts = {k: v for k, v in compiled.as_metrics().items() if k != "compile_seconds"}
        row.extra_seconds.clear()
    for _ in range(repeats):
        for row in rows:
            row.seconds.append(_once(row, device))


def table(rows: list[Row], batch_size: int) -> tuple[str, list[dict]]:
    """Markdown table and its records: seconds per image, speed-up over (a), max |latent difference|
    from (c), peak memory, compile seconds."""
    per_image = {r.key: statistics.median(r.seconds) / batch_size for r in rows}
    reference = next(r for r in rows if r.key == "c").latents
    records = []
    lines = ["| row | | s / image | speed-up over (a) | max abs diff from (c) | peak memory (GiB) | compile s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        diff = (r.latents - reference).abs().max().item()
        memory = f"{r.peak_bytes / 2**30:.2f}" if r.peak_bytes is not None else "n/a (CPU)"
        record = {"row": r.key, "label": r.label, "seconds_per_image": per_image[r.key],
                  "speedup_over_a": per_image["a"] / per_image[r.key], "max_abs_diff_from_c": diff,
                  "peak_bytes": r.peak_bytes, "compile_seconds": r.compile_seconds, **r.compile_counts,
                  "runs": r.seconds}
        if r.extra_seconds:
            record["vae_decode_seconds_per_image"] = statistics.median(r.extra_seconds) / batch_size
        records.append(record)
        compile_text = f"{r.compile_seconds:.1f}" if r.compile_seconds else "-"
        lines.append(f"| ({r.key}) | {r.label} | {per_image[r.key]:.3f} | {record['speedup_over_a']:.2f}x "
                     f"| {diff:.2e} | {memory} | {compile_text} |")
    return "\n".join(lines), records
