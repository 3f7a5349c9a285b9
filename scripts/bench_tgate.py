"""T-GATE speed: measured sampling time, plain vs gated, against the MACs' prediction.

python scripts/bench_tgate.py                        # DiT-XL/2 256px, 10 DDIM steps, g5 sp2 fi2 wu1
python scripts/bench_tgate.py device=cuda batch_size=8 steps=50 tgate.gate_step=25
python scripts/bench_tgate.py compile=regional       # also the eager rows, in the same run: compiled / eager ratios
"""
import copy
import logging
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from benchmarks.tgate import predicted_macs, time_gating
from diffusion.compile import CompileStats
from diffusion.outputs import save_json
from diffusion.random_weights import fill_zero_init_layers
from diffusion.solvers import build_solver
from dit import build_dit
from runs.config_keys import config_keys_of
from runs.devices import check_device
from runs.script import hydra_errors, job_errors
from runs.speed import Speed
from tgate.hook import TGateHook

log = logging.getLogger(__name__)


@hydra_errors  # an unknown config or a bad override: one `error: ...` line, exit status 2
@hydra.main(config_path="../configs", config_name="bench_tgate", version_base="1.3")
@job_errors  # bad settings, a folder in use, a full disk: one `error: ...` line
def main(cfg: DictConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = check_device(cfg.device)
    speed = Speed.from_config(cfg, device)
    latent = cfg.image_size // 8
    settings = OmegaConf.to_container(cfg.tgate)
    with config_keys_of(cfg.tgate):  # `gate_step=0: ...` -> `tgate.gate_step=0: ...`
        TGateHook(**settings)  # the gate setting checked before any model is built
    with torch.device("meta"):
        macs = predicted_macs(build_dit(cfg.denoiser, input_size=latent), cfg.image_size, cfg.steps,
                              cfg.cfg_scale != 1, settings)
    torch.manual_seed(0)
    model = build_dit(cfg.denoiser, input_size=latent)
    fill_zero_init_layers(model)  # random weights as pretrained=false draws them: attention that matters
    model = speed.cast(model.to(device).eval())
    eager = copy.deepcopy(model) if speed.compile != "none" else None  # same weights, never compiled
    model = speed.compile_model(model)
    solver = build_solver(cfg.sampler, cfg.steps, learned_variance=True)
    timing = dict(latent_shape=(4, latent, latent), batch_size=cfg.batch_size, cfg_scale=cfg.cfg_scale,
                  repeats=cfg.repeats, warmup=cfg.warmup, device=device, model_dtype=speed.dtype)
    with speed.matmuls():
        with CompileStats() as compiled:  # one region per model: the limit never mixes it with other runs
            times = time_gating(model, solver, settings, **timing)
        eager_times = time_gating(eager, solver, settings, **timing) if eager is not None else None
    measured, predicted = times["baseline"] / times["gated"], macs["baseline"] / macs["gated"]
    threads = torch.get_num_threads()
    gate = " ".join(f"{k}={v}" for k, v in settings.items())
    print(f"\n{cfg.denoiser}, {cfg.image_size}px, {cfg.sampler} x{cfg.steps}, batch {cfg.batch_size}, "
          f"cfg {cfg.cfg_scale}, "
          f"T-GATE {gate}, {speed.precision}, compile={speed.compile}, {device} ({threads} threads), "
          f"median of {cfg.repeats}\n"
          f"| | time (s) | MACs per image (G, all ops) |\n|---|---|---|\n"
          f"| baseline | {times['baseline']:.2f} | {macs['baseline'] / 1e9:.1f} |\n"
          f"| T-GATE | {times['gated']:.2f} | {macs['gated'] / 1e9:.1f} |\n"
          f"measured speed-up {measured:.3f}x, MACs-predicted {predicted:.3f}x, "
          f"measured / predicted = {measured / predicted:.1%}")
    if eager_times is not None:
        print(f"| eager baseline | {eager_times['baseline']:.2f} | |\n| eager T-GATE | {eager_times['gated']:.2f} | |\n"
              f"compiled / eager: baseline {eager_times['baseline'] / times['baseline']:.3f}x, "
              f"T-GATE {eager_times['gated'] / times['gated']:.3f}x; {compiled.graphs} graphs, "
              f"{compiled.recompiles} recompiles, recompile limit hit: {compiled.limit_hits > 0}")
    out = Path(HydraConfig.get().runtime.output_dir) / "bench.json"
    save_json({"times": times, "macs": macs, "measured_speedup": measured, "predicted_speedup": predicted,
               "eager_times": eager_times, **compiled.as_metrics(),
               "device": str(device), "threads": threads, **speed.as_metrics(),
               "config": OmegaConf.to_container(cfg)}, out)
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
