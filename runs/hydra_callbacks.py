"""Hydra callback of the scripts (configs/sample.yaml, train.yaml: `hydra.callbacks.run_folder`).

Hydra writes into the run folder (`.hydra/`, the job's log file) inside run_job, after
`on_run_start` / `on_multirun_start`. This callback acts before that:

* single run: rank 0 locks `hydra.run.dir` (runs.folder_lock), so a second run into a folder in
  use is refused before it writes anything there, notes what the folder holds (runs.run_folder), and
  runs the script's checks (`check`, e.g. runs.preflight.check_sample_run) under the lock. A refusal,
  now or later in the job (a UserError: exit status 2), puts the folder back as it was: what the run
  created is removed (the folder itself, and its parents, when the run made them), an existing
  folder's `.hydra/` record and log are restored, and the lock is released. The other ranks of a
  torchrun job leave `.hydra/` to rank 0;
* multirun: every job's config is composed and checked before the first job starts (a sweep with one
  bad value starts nothing); then the sweep folder must be writable (each job locks its own folder
  in the job).

Refusals print `error: ...` and exit (Hydra would only turn a callback's exception into a warning).
"""
from __future__ import annotations

import os
import traceback
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from diffusion.errors import ReportedError, exit_with, full_errors
from runs import run_folder
from runs.distributed import dist_from_env
from runs.folder_lock import not_writable


def _check(check: str | None, config: DictConfig, folder: Path | None, key: str = "hydra.run.dir") -> None:
    """check(cfg, folder, key): the script's checks on the job's config (folder: its run folder, named by key)."""
    if check:
        from runs.preflight import job_config

        get_method(check)(job_config(config), folder, key)


def _refuse(err: Exception, undo=None) -> None:
    """End the process on a refusal met by the callback: one `error:` line (HYDRA_FULL_ERROR=1: traceback)."""
    from runs.script import composition_error, job_error

    reported = composition_error(err) or job_error(err)
    if reported is None:  # a bug: Hydra warns, and the job meets it again with its traceback
        raise err
    if undo is not None:
        undo()
    if full_errors():
        traceback.print_exception(err)
        raise SystemExit(reported.exit_code)
    exit_with(reported)


class RunFolderCallback(Callback):
    """check: dotted name of `check(cfg, folder, key)`, the script's checks before any work (None: none)."""

    def __init__(self, check: str | None = None) -> None:
        self.check = check

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        HydraConfig.instance().set_config(config)  # as run_job does next: ${hydra:...} resolves the same
        if not dist_from_env().is_main:
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.output_subdir = None
            return
        try:
            folder = run_folder.start(Path(OmegaConf.select(config, "hydra.run.dir")), "hydra.run.dir")
        except ReportedError as err:
            exit_with(err)
        try:
            _check(self.check, config, folder)
        except Exception as err:
            _refuse(err, run_folder.refused)

    def on_run_end(self, config: DictConfig, **kwargs) -> None:
        run_folder.finished()

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if self.check:
            try:
                for job, overrides in enumerate(sweep_jobs(config)):
                    job_cfg = _job_config(config, overrides, job)
                    folder = Path(OmegaConf.select(job_cfg, "hydra.sweep.dir")) / str(job_cfg.hydra.sweep.subdir)
                    _check(self.check, job_cfg, folder if folder.is_dir() else None,
                           "hydra.sweep.dir/hydra.sweep.subdir")
            except Exception as err:
                _refuse(err)
            finally:
                HydraConfig.instance().set_config(config)
        folder = Path(OmegaConf.select(config, "hydra.sweep.dir")).absolute()
        probe = folder / f".write_test{os.getpid()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            exit_with(not_writable("hydra.sweep.dir", folder, err))


def sweep_jobs(config: DictConfig) -> list[list[str]]:
    """The overrides of each job of the sweep, as Hydra's basic sweeper splits them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def _job_config(config: DictConfig, overrides: list[str], num: int) -> DictConfig:
    """A sweep job's config, composed as the basic launcher composes it (with its hydra.job.num)."""
    from hydra.core.global_hydra import GlobalHydra

    job_cfg = GlobalHydra.instance().config_loader().load_sweep_config(config, list(overrides))
    with open_dict(job_cfg):
        job_cfg.hydra.job.id = job_cfg.hydra.job.num = num
    HydraConfig.instance().set_config(job_cfg)
    return job_cfg


def run_folder_key() -> str:
    """The setting that names this Hydra job's folder, for messages."""
    return "hydra.run.dir" if HydraConfig.get().mode == RunMode.RUN else "hydra.sweep.dir/hydra.sweep.subdir"
