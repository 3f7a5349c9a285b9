"""Count denoiser MACs per image over a sampling run: python scripts/count_macs.py [key=value ...]; --help."""
import json
import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from runs.count_macs import count_config, format_table
from runs.script import hydra_errors, job_errors

log = logging.getLogger(__name__)


@hydra_errors  # an unknown config or a bad override: one `error: ...` line, exit status 2
@hydra.main(config_path="../configs", config_name="macs", version_base="1.3")
@job_errors  # bad settings, a folder in use, a full disk: one `error: ...` line
def main(cfg: DictConfig) -> None:
    result = count_config(cfg)
    print(format_table(cfg, result))
    out = {k: {"macs_paper": v["macs_paper"], "macs_all": v["macs_all"]} for k, v in result.items()}
    path = f"{HydraConfig.get().runtime.output_dir}/macs.json"
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    log.info("wrote %s", path)


if __name__ == "__main__":
    main()
