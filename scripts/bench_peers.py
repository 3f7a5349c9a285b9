"""Ours against diffusers on DiT (same weights, labels, noise): seconds per image, speed-ups, differences.

python scripts/bench_peers.py                                  # DiT-S/2 and DiT-XL/2 at 256, DDIM 10, batch 1
python scripts/bench_peers.py device=cuda steps=50 batch_size=8 stitch_precision=bf16
"""
import logging
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from benchmarks.peers import build_rows, check_settings, table, time_rows
from diffusion.outputs import save_json
from runs.devices import check_device
from runs.script import hydra_errors, job_errors

log = logging.getLogger(__name__)


@hydra_errors  # an unknown config or a bad override: one `error: ...` line, exit status 2
@hydra.main(config_path="../configs", config_name="bench_peers", version_base="1.3")
@job_errors  # bad settings, a folder in use, a full disk: one `error: ...` line
def main(cfg: DictConfig) -> None:
    check_settings(cfg)  # every setting and model name before the first measurement (also the callback's check)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = check_device(cfg.device)
    out = Path(HydraConfig.get().runtime.output_dir)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    report, results = [], {}
    for model in cfg.models:
        rows = build_rows(model, cfg.small, image_size=cfg.image_size, steps=cfg.steps, cfg_scale=cfg.cfg_scale,
                          batch_size=cfg.batch_size, ratio=cfg.ratio, vae_arch=OmegaConf.to_container(cfg.vae.arch),
                          seed=cfg.seed, device=device, backend=cfg.compile_backend,
                          stitch_precision=cfg.stitch_precision)
        time_rows(rows, repeats=cfg.repeats, warmup=cfg.warmup, device=device)
        text, records = table(rows, cfg.batch_size)
        decode = next((r["vae_decode_seconds_per_image"] for r in records if "vae_decode_seconds_per_image" in r), None)
        head = (f"### {model}, {cfg.image_size}px, DDIM {cfg.steps}, cfg {cfg.cfg_scale}, batch {cfg.batch_size}, "
                f"{name}, torch {torch.__version__}, median of {cfg.repeats}")
        note = (f"(b) left out its VAE decode ({decode:.3f} s / image); its DDIM spacing (diffusers' `leading`) "
                "differs from ours (ADM's), and it runs the scheduler on the doubled batch, so its latents differ.")
        report.append(f"{head}\n\n{text}\n\n{note}\n")
        print(f"\n{report[-1]}", flush=True)
        results[model] = records
        del rows
        # written after each model: a late failure keeps the tables measured so far
        (out / "bench_peers.md").write_text("\n".join(report))
        save_json({"device": name, "torch": torch.__version__, "tables": results,
                   "config": OmegaConf.to_container(cfg, resolve=True)}, out / "bench_peers.json")
        log.info("wrote %s and %s (%d of %d models)", out / "bench_peers.md", out / "bench_peers.json",
                 len(results), len(cfg.models))


if __name__ == "__main__":
    main()
