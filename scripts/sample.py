"""Sample images: python scripts/sample.py [+exp=NAME] [key=value ...]; --help lists the groups."""
import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from diffusion.run import run_from_config


@hydra.main(config_path="../configs", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_from_config(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
