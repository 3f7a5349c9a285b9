"""Sample images: python scripts/sample.py [+exp=NAME] [key=value ...]; --help lists the groups.

Several processes (one per GPU): torchrun --nproc_per_node N scripts/sample.py ... or
accelerate launch --num_processes N scripts/sample.py ...; a SLURM sweep: -m hydra/launcher=slurm.
"""
import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from runs.distributed import process_group, shared_output_dir
from runs.folder_lock import claim_folder
from runs.hydra_callbacks import run_folder_key
from runs.logging_wandb import run_logger
from runs.run import run_from_config
from runs.script import hydra_errors, job_errors


@hydra_errors  # an unknown config or a bad override: one `error: ...` line, exit status 2
@hydra.main(config_path="../configs", config_name="sample", version_base="1.3")
@job_errors  # bad settings, a folder in use, a full disk: one `error: ...` line
def main(cfg: DictConfig) -> None:
    with process_group(cfg.device) as dist:
        out_dir = shared_output_dir(dist, HydraConfig.get().runtime.output_dir)
        with claim_folder(out_dir, run_folder_key(), dist):  # one run per folder, before anything else
            evaluate = (cfg.get("evaluate") or {}).get("reference") is not None
            if evaluate:  # evaluation's settings too are checked before any sampling
                from evaluation.run_eval import check_evaluate_settings

                dist.on_main(lambda: check_evaluate_settings(cfg.evaluate))
            with run_logger(cfg, out_dir, enabled=dist.is_main) as logger:
                metrics = run_from_config(cfg, out_dir, dist)
                if dist.is_main and evaluate:
                    from evaluation.run_eval import evaluate_into_run  # FID etc. into metrics.json

                    metrics = evaluate_into_run(out_dir, cfg.evaluate, device=cfg.device)
                logger.log_metrics(metrics)
                logger.log_image("grid", out_dir / "grid.png")


if __name__ == "__main__":
    main()
