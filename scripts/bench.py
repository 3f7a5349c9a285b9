"""T-Stitch speed: measured sampling time per small-model fraction against the ideal.

python scripts/bench.py                      # DiT-S/2 -> DiT-XL/2, 10 DDIM steps, batch 1
python scripts/bench.py device=cuda batch_size=8 steps=100
"""
import json
import logging
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from benchmarks.tstitch import check_ratios, format_table, time_ratios
from diffusion.compile import CompileStats
from diffusion.outputs import save_json
from diffusion.random_weights import fill_zero_init_layers
from diffusion.solvers import build_solver
from dit import build_dit
from runs.devices import check_device
from runs.script import hydra_errors, job_errors
from runs.speed import Speed

log = logging.getLogger(__name__)


@hydra_errors  # an unknown config or a bad override: one `error: ...` line, exit status 2
@hydra.main(config_path="../configs", config_name="bench", version_base="1.3")
@job_errors  # bad settings, a folder in use, a full disk: one `error: ...` line
def main(cfg: DictConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = check_device(cfg.device)
    speed = Speed.from_config(cfg, device)
    check_ratios(cfg.ratios)  # before the models are built
    latent = cfg.image_size // 8
    torch.manual_seed(0)
    small, large = (build_dit(name, input_size=latent) for name in (cfg.small, cfg.large))
    for model in (small, large):  # random weights as pretrained=false draws them: outputs that depend on the input
        fill_zero_init_layers(model)
        speed.compile_model(speed.cast(model.to(device)))
    solver = build_solver(cfg.sampler, cfg.steps, learned_variance=True)
    with speed.matmuls():
        with CompileStats() as compiled:  # one region per model: the limit never mixes variants
            rows = time_ratios(small, large, solver, list(cfg.ratios), latent_shape=(4, latent, latent),
                               batch_size=cfg.batch_size, cfg_scale=cfg.cfg_scale, repeats=cfg.repeats,
                               warmup=cfg.warmup, device=device, model_dtype=speed.dtype)
    table = format_table(rows, cfg.small, cfg.large)
    threads = torch.get_num_threads()
    print(f"\n{cfg.small} -> {cfg.large}, {cfg.image_size}px, {cfg.sampler} x{cfg.steps}, batch {cfg.batch_size}, "
          f"cfg {cfg.cfg_scale}, {speed.precision}, compile={speed.compile}, {device} ({threads} threads), "
          f"median of {cfg.repeats}\n{table}")
    if speed.compile != "none":
        print(f"{compiled.graphs} graphs, {compiled.recompiles} recompiles, "
              f"recompile limit hit: {compiled.limit_hits > 0}")
    out = Path(HydraConfig.get().runtime.output_dir) / "bench.json"
    save_json({"rows": rows, "device": str(device), "threads": threads, **speed.as_metrics(),
               **compiled.as_metrics(),
               "config": json.loads(json.dumps(
        {k: (list(v) if k == "ratios" else v) for k, v in cfg.items() if k != "hydra"}))}, out)
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
