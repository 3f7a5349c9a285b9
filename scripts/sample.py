"""Sample images: python scripts/sample.py [+exp=NAME] [key=value ...]; --help lists the groups.

Several processes (one per GPU): torchrun --nproc_per_node N scripts/sample.py ... or
accelerate launch --num_processes N scripts/sample.py ...; a SLURM sweep: -m hydra/launcher=slurm.
"""
import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from diffusion.distributed import process_group, shared_output_dir
from diffusion.logging_wandb import run_logger
from diffusion.run import run_from_config


@hydra.main(config_path="../configs", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with process_group(cfg.device) as dist:
        out_dir = shared_output_dir(dist, HydraConfig.get().runtime.output_dir)
        with run_logger(cfg, out_dir, enabled=dist.is_main) as logger:
            metrics = run_from_config(cfg, out_dir, dist)
            if dist.is_main and (cfg.get("evaluate") or {}).get("reference") is not None:
                from evaluation.run_eval import evaluate_into_run  # FID etc. into metrics.json

                metrics = evaluate_into_run(out_dir, cfg.evaluate, device=cfg.device)
            logger.log_metrics(metrics)
            logger.log_image("grid", out_dir / "grid.png")


if __name__ == "__main__":
    main()
