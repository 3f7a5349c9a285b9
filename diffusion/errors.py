"""Errors a script reports as one line, `error: <message>`, and an exit status, without a traceback.

`UserError` (exit status 2) is a setting or a state the user fixes before anything runs: a bad
value (`UserError.setting("key", value, "what is allowed")` words it `key=value: what is allowed`),
a run folder in use, a checkpoint that cannot be read. `ReportedError` (exit status 1) stops a run
that was under way: a full disk, samples that came out NaN. Everything else keeps its traceback.

`reports_errors` wraps a script's Hydra task function: in a single run it prints the line and
exits; in a multirun it lets Hydra record the job as failed, so that the other jobs still run.
HYDRA_FULL_ERROR=1 in the environment shows the traceback instead. runs/script.py builds the
scripts' entry points on it.
"""
from __future__ import annotations

import functools
import os
import sys


class ReportedError(Exception):
    """A failure the scripts report as `error: <message>` (one line) with exit status `exit_code`."""

    exit_code = 1

    def line(self) -> str:
        return "error: " + " ".join(str(self).split())


class UserError(ReportedError, ValueError):
    """Bad input, or a state of the inputs the user must change (exit status 2). A ValueError too, so
    that callers (and tests) that catch ValueError for a bad value keep working.

    config_key: set by the run layer when it knows which config key a constructor argument came from
    (`ratio` of the T-Stitch hook is `accel.tstitch.ratio`); the one line then names that key."""

    exit_code = 2
    config_key: str | None = None

    @classmethod
    def setting(cls, key: str, value, problem: str) -> "UserError":
        """`key=value: problem`, the one form of every bad-setting message."""
        return cls(f"{key}={value}: {problem}")


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder named by a setting does not exist."""


class CheckpointKeyError(UserError, KeyError):
    """A checkpoint lacks entries the model needs (the message names them)."""

    def __str__(self) -> str:  # KeyError's own str() quotes the message
        return str(self.args[0]) if self.args else ""


def full_errors() -> bool:
    """HYDRA_FULL_ERROR=1 in the environment: tracebacks for every error (Hydra's own switch, used by
    every script)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def exit_with(err: ReportedError) -> None:
    """Print err's one line on stderr and end the process with its exit status."""
    sys.stderr.flush()
    print(err.line(), file=sys.stderr, flush=True)
    raise SystemExit(err.exit_code)


def _in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # no Hydra, or no Hydra config: a plain call
        return False


def reports_errors(task):
    """Decorator for a script's task function: ReportedError -> `error: ...` on stderr and its exit
    status (single runs); in a Hydra multirun the error is left to Hydra (one failed job)."""

    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except ReportedError as err:
            if _in_multirun() or full_errors():  # Hydra reports it (traceback)
                raise
            exit_with(err)

    return wrapper
