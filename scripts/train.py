"""Train a DiT: python scripts/train.py [model=...] [data=...] [key=value ...]; --help lists the groups."""
import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from runs.script import hydra_errors, job_errors
from training.train import train


@hydra_errors  # an unknown config or a bad override: one `error: ...` line, exit status 2
@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
@job_errors  # bad settings, a folder in use, a full disk: one `error: ...` line
def main(cfg: DictConfig) -> None:
    train(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
