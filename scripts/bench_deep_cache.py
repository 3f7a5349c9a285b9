"""DeepCache speed on the native LDM U-Net: measured sampling time, plain vs cached, and the MACs.

python scripts/bench_deep_cache.py                                  # LDM (T-Stitch's large U-Net), 20 steps, interval 3
python scripts/bench_deep_cache.py model=ldm_cin256_v2 deep_cache.cache_interval=5 device=cuda batch_size=8
"""
import logging
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from deep_cache import DeepCacheHook
from diffusion.compile import CompileStats
from diffusion.outputs import save_json
from diffusion.solvers import NoiseSchedule, build_solver
from diffusion.timing import time_with_and_without
from runs.config_keys import config_keys_of
from runs.count_macs import build_meta_denoiser, count_run
from runs.devices import check_device
from runs.run import build_denoiser
from runs.script import hydra_errors, job_errors
from runs.speed import Speed

log = logging.getLogger(__name__)


@hydra_errors  # an unknown config or a bad override: one `error: ...` line, exit status 2
@hydra.main(config_path="../configs", config_name="bench_deep_cache", version_base="1.3")
@job_errors  # bad settings, a folder in use, a full disk: one `error: ...` line
def main(cfg: DictConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = check_device(cfg.device)
    speed = Speed.from_config(cfg, device)
    latent = int(cfg.model.unet.image_size)
    shape = (int(cfg.model.unet.in_channels), latent, latent)
    settings = OmegaConf.to_container(cfg.deep_cache)
    with config_keys_of(cfg.deep_cache):  # `cache_interval=0: ...` -> `deep_cache.cache_interval=0: ...`
        DeepCacheHook(**settings)  # checked before any model is built
    solver = build_solver("ddim", cfg.steps, NoiseSchedule(**cfg.schedule), spacing="ldm")

    # all-ops MACs per image over the run, the hook acting on a meta copy (as scripts/count_macs.py)
    meta = build_meta_denoiser(cfg.model)
    use_cfg = cfg.cfg_scale != 1
    hook = DeepCacheHook(**settings)
    plain_macs = count_run([meta], [cfg.model], cfg.steps, use_cfg)["macs_all"]
    hook.attach([meta], ["meta"], solver)
    try:
        cached_macs = count_run([meta], [cfg.model], cfg.steps, use_cfg, [hook])["macs_all"]
    finally:
        hook.detach()

    model = speed.compile_model(speed.cast(build_denoiser(cfg.model, latent, pretrained=False, device=device)))
    with speed.matmuls():
        with CompileStats() as compiled:  # one region per model: the limit never mixes variants
            times = time_with_and_without([model], solver, DeepCacheHook(**settings), latent_shape=shape,
                                          batch_size=cfg.batch_size, cfg_scale=cfg.cfg_scale,
                                          null_label=cfg.model.num_classes, repeats=cfg.repeats, warmup=cfg.warmup,
                                          device=device, model_dtype=speed.dtype)
    measured, predicted = times["baseline"] / times["hooked"], plain_macs / cached_macs
    threads = torch.get_num_threads()
    print(f"\n{cfg.model.name}, latent {shape}, DDIM x{cfg.steps}, batch {cfg.batch_size}, cfg {cfg.cfg_scale}, "
          f"DeepCache interval {settings['cache_interval']} branch {settings['cache_branch_id']}, {device} "
          f"({threads} threads), {speed.precision}, compile={speed.compile}, median of {cfg.repeats}\n"
          f"| | time (s) | MACs per image (G, all ops) |\n|---|---|---|\n"
          f"| baseline | {times['baseline']:.2f} | {plain_macs / 1e9:.1f} |\n"
          f"| DeepCache | {times['hooked']:.2f} | {cached_macs / 1e9:.1f} |\n"
          f"measured speed-up {measured:.3f}x, MACs-predicted {predicted:.3f}x")
    if speed.compile != "none":
        print(f"{compiled.graphs} graphs, {compiled.recompiles} recompiles, "
              f"recompile limit hit: {compiled.limit_hits > 0}")
    out = Path(HydraConfig.get().runtime.output_dir) / "bench.json"
    save_json({"times": times, "macs": {"baseline": plain_macs, "deep_cache": cached_macs},
               "measured_speedup": measured, "predicted_speedup": predicted, "device": str(device),
               "threads": threads, **speed.as_metrics(), **compiled.as_metrics(),
               "config": OmegaConf.to_container(cfg)}, out)
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
