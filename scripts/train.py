"""Train a DiT: python scripts/train.py [model=...] [data=...] [key=value ...]; --help lists the groups."""
import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from diffusion.errors import reports_errors
from training.train import train


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
@reports_errors  # a folder in use, an unreadable checkpoint, a full disk: one `error: ...` line
def main(cfg: DictConfig) -> None:
    train(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
