"""Hydra callback of the scripts (configs/sample.yaml, train.yaml: `hydra.callbacks.run_folder`).

Hydra writes into the run folder (`.hydra/`, the log file) before the job function starts. This
callback runs before that:

* single run: rank 0 locks `hydra.run.dir` (runs.folder_lock), so a second run into a
  folder in use is refused before it writes anything there, and a folder that cannot be written
  is one clear error instead of Hydra's logging traceback ("Unable to configure handler 'file'");
  the other ranks of a torchrun job leave `.hydra/` to rank 0;
* multirun: the sweep folder must be writable (each job then locks its own folder in the job).

Refusals print `error: ...` and exit (Hydra would only turn a callback's exception into a warning).
"""
from __future__ import annotations

import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from diffusion.errors import ReportedError, exit_with
from runs.distributed import dist_from_env
from runs.folder_lock import acquire, not_writable


class RunFolderCallback(Callback):
    def __init__(self) -> None:
        self.held = None

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        HydraConfig.instance().set_config(config)  # as run_job does next: ${hydra:...} resolves the same
        try:
            if not dist_from_env().is_main:
                with read_write(config.hydra), open_dict(config.hydra):
                    config.hydra.output_subdir = None
                return
            self.held = acquire(Path(OmegaConf.select(config, "hydra.run.dir")), "hydra.run.dir")
        except ReportedError as err:
            exit_with(err)

    def on_run_end(self, config: DictConfig, **kwargs) -> None:
        if self.held is not None:
            self.held.release()
            self.held = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        folder = Path(OmegaConf.select(config, "hydra.sweep.dir")).absolute()
        probe = folder / f".write_test{os.getpid()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            exit_with(not_writable("hydra.sweep.dir", folder, err))


def run_folder_key() -> str:
    """The setting that names this Hydra job's folder, for messages."""
    return "hydra.run.dir" if HydraConfig.get().mode == RunMode.RUN else "hydra.sweep.dir/hydra.sweep.subdir"
