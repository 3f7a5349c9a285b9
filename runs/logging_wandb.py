"""Weights & Biases logging of a run (`logger=wandb`; `logger=none`, the default, logs nothing).

What is logged: the resolved config (at init), metrics.json's numbers as the run summary and
one history row, and grid.png as an image. The W&B run lives in the run folder
(`<run>/wandb/`), its id is kept in `<run>/wandb_run_id` so that a resumed (requeued) job
and `scripts/evaluate.py` add to the same W&B run.

`WANDB_MODE` is respected (`offline`: everything stays in `<run>/wandb/offline-run-*`,
uploaded later with `wandb sync`; `disabled`: a no-op); `logger.mode` overrides it when set.
The run is always finished, also when the job fails (exit code 1), so that in a multirun
each job gets its own W&B run.
"""
from __future__ import annotations

import logging
import os
import uuid
from contextlib import contextmanager
from numbers import Number
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from diffusion.errors import UserError

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id"


class NullLogger:
    def log_metrics(self, metrics: dict, prefix: str = "") -> None:
        pass

    def log_image(self, key: str, path: str | Path) -> None:
        pass


class WandbLogger:
    def __init__(self, run):
        self.run = run

    def log_metrics(self, metrics: dict, prefix: str = "") -> None:
        """Numbers (nested dicts flattened with '/') as one history row and in the summary."""
        flat = _flatten(metrics, prefix)
        if flat:
            self.run.log(flat)
            self.run.summary.update(flat)

    def log_image(self, key: str, path: str | Path) -> None:
        import wandb

        if Path(path).is_file():
            self.run.log({key: wandb.Image(str(path))})


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, Number) and not isinstance(v, bool):
            out[key] = v
    return out


def _run_id(out_dir: Path) -> str:
    """The W&B run id of this folder: made once, reused by reruns and by evaluation."""
    path = out_dir / RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:8]  # W&B's own ids look alike: 8 lowercase alphanumerics
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


def check_logger_config(logger_cfg) -> None:
    name = logger_cfg.get("name") if logger_cfg is not None else "none"
    if name not in ("none", "wandb"):
        raise UserError(f"logger.name={name!r}: allowed are 'none' and 'wandb' (logger=none / logger=wandb)")
    mode = logger_cfg.get("mode") if logger_cfg is not None else None
    if mode not in (None, "online", "offline", "disabled"):
        raise UserError(f"logger.mode={mode!r}: allowed are online, offline, disabled, or null (WANDB_MODE decides)")


@contextmanager
def run_logger(cfg: DictConfig, out_dir: str | Path, enabled: bool = True, job_type: str = "sample"):
    """Yields a logger for the block: WandbLogger with logger=wandb (on the process that logs),
    else NullLogger. Finishes the W&B run in every case, with exit code 1 on error."""
    logger_cfg = cfg.get("logger")
    check_logger_config(logger_cfg)
    if not enabled or logger_cfg is None or logger_cfg.name != "wandb":
        yield NullLogger()
        return
    import wandb

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mode = logger_cfg.get("mode") or os.environ.get("WANDB_MODE") or "online"
    config = OmegaConf.to_container(cfg, resolve=True)
    run = wandb.init(
        project=logger_cfg.project, entity=logger_cfg.get("entity"), group=logger_cfg.get("group"),
        name=logger_cfg.get("name_run") or out_dir.name, tags=list(logger_cfg.get("tags") or []),
        config=config, dir=str(out_dir), mode=mode, id=_run_id(out_dir), resume="allow",
        job_type=job_type, reinit="finish_previous",
    )
    log.info("W&B run %s (mode %s) in %s", run.id, mode, out_dir / "wandb")
    try:
        yield WandbLogger(run)
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()
