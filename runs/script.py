"""How scripts/*.py end on bad input: one line on stderr, `error: <key>=<value>: <what is allowed>`,
and exit status 2 (1 for a run stopped under way: a full disk, NaN samples); no traceback.

A Hydra script stacks three decorators:

    @hydra_errors               # what Hydra meets before the job: an unknown config, a bad override
    @hydra.main(config_path="../configs", config_name="sample", version_base="1.3")
    @job_errors                 # what the job refuses: UserError (exit 2), ReportedError (exit 1)
    def main(cfg): ...

An argparse script builds its parser with `ArgumentParser` from here and runs with
`sys.exit(run_script(main))`. Errors that are bugs (anything else) keep their traceback, and
HYDRA_FULL_ERROR=1 in the environment shows the traceback of every error, for every script.
"""
from __future__ import annotations

import argparse
import functools
import re
import sys

from hydra.errors import MissingConfigException, OverrideParseException
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from diffusion.errors import ReportedError, UserError, exit_with, full_errors, reports_errors


def _override_of(key: str) -> str | None:
    """The command line's override of `key` (`key=value`, `+key=value`, `~key`), if any."""
    for arg in sys.argv[1:]:
        name = arg.lstrip("+~").split("=", 1)[0]
        if name == key:
            return arg.lstrip("+~")
    return None


def composition_error(ex: Exception) -> UserError | None:
    """A Hydra or OmegaConf error met while composing the config, as one UserError line (None: not one)."""
    if isinstance(ex, MissingConfigException) and ex.missing_cfg_file and "/" in ex.missing_cfg_file:
        group, option = ex.missing_cfg_file.rsplit("/", 1)
        allowed = f"allowed: {', '.join(ex.options)}" if ex.options else "no such config"
        return UserError(f"{group.replace('/', '.')}={option}: {allowed} (configs/{group}/)")
    if isinstance(ex, OverrideParseException):
        return UserError(f"{ex.override}: not an override Hydra can parse ({ex.message.splitlines()[0]}); "
                         "the form is key=value, +key=value or ~key")
    if type(ex).__module__ == "hydra.errors":  # ConfigCompositionException and the rest of Hydra's own
        lines = [line.strip() for line in str(ex).splitlines() if line.strip()]
        cause = ex.__cause__
        if isinstance(cause, OmegaConfBaseException):  # e.g. "Key 'foo' is not in struct"
            lines.append(str(cause).splitlines()[0])
        quoted = re.search(r"'([^']+)'", lines[0]) if lines else None
        override = _override_of(quoted.group(1)) if quoted else None
        text = "; ".join(line.rstrip(".") for line in lines)
        if override and "not in struct" in text:  # a key the config does not have
            text = f"the config has no key {quoted.group(1)}; to add one, +{override}"
        return UserError(f"{override}: {text}" if override else text)
    return None


def job_error(ex: Exception) -> ReportedError | None:
    """An error of the job that is bad input, not a bug: ReportedError, or a mandatory value left `???`."""
    if isinstance(ex, ReportedError):
        return ex
    if isinstance(ex, MissingMandatoryValue):
        key = ex.full_key or "?"
        return UserError(f"{key}=???: a value is required here; give {key}=...")
    return None


def job_errors(task):
    """Decorator for a Hydra task function (under hydra.main): bad input ends as one `error:` line, and
    a refused single run (exit status 2) leaves its folder as it was (runs.run_folder.refused)."""

    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except OmegaConfBaseException as ex:
            err = None if full_errors() else job_error(ex)
            if err is None:
                raise
            raise err from None

    @functools.wraps(task)
    def undoing(*args, **kwargs):
        from runs import run_folder

        try:
            return wrapper(*args, **kwargs)
        except ReportedError as err:
            if err.exit_code == 2:
                run_folder.refused()
            raise
        except MissingMandatoryValue:  # HYDRA_FULL_ERROR=1: the traceback, and still no trace
            run_folder.refused()
            raise

    return reports_errors(undoing)


def _resume_command(folder) -> str:
    """The command line of this run again, into the same folder (a Ctrl-C'd run resumes from it)."""
    import shlex

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    key = "hydra.run.dir"
    try:
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            key, folder = "hydra.sweep.dir", HydraConfig.get().sweep.dir
    except ValueError:
        pass
    args = [a for a in sys.argv[1:] if not a.lstrip("+").startswith(key + "=")]
    command = ["python", sys.argv[0], *args] + ([f"{key}={folder}"] if folder is not None else [])
    return shlex.join(command)


def interrupted_line() -> str:
    """Ctrl-C: release the run folder (its samples stay) and say how to go on."""
    from runs import run_folder

    folder = run_folder.interrupted()
    return f"interrupted (Ctrl-C); the samples written so far are kept, resume with: {_resume_command(folder)}"


def hydra_errors(main):
    """Decorator over hydra.main: an unknown config option or a bad override, which Hydra meets before the
    job, ends as one `error:` line and exit status 2 instead of Hydra's multi-line report."""
    import hydra._internal.hydra as hydra_core
    import hydra._internal.utils as hydra_utils

    @functools.wraps(main)
    def entry(*args, **kwargs):
        original = hydra_utils.run_and_report

        def run_and_report(func):
            try:
                return func()
            except Exception as ex:
                err = None if full_errors() else composition_error(ex) or job_error(ex)
                if err is None:  # a bug, or HYDRA_FULL_ERROR=1: Hydra's own report (traceback)
                    return original(functools.partial(_reraise, ex))
                exit_with(err)

        hydra_utils.run_and_report = hydra_core.run_and_report = run_and_report
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            if full_errors():
                raise
            line = interrupted_line()
            sys.stderr.flush()
            print(f"error: {line}", file=sys.stderr, flush=True)
            raise SystemExit(130) from None
        finally:
            hydra_utils.run_and_report = hydra_core.run_and_report = original

    return entry


def _reraise(ex: Exception):
    raise ex


# --- argparse scripts --------------------------------------------------------------------------------

_CHOICE = re.compile(r"argument ([^:]+): invalid choice: '?(.*?)'? \((.*)\)$")
_TYPE = re.compile(r"argument ([^:]+): invalid (\w+) value: '?(.*?)'?$")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its usage errors as one line, `error: --key=value: what is allowed`, exit status 2."""

    def error(self, message: str):
        choice, typed = _CHOICE.match(message), _TYPE.match(message)
        if choice:
            message = f"{choice.group(1).split('/')[-1]}={choice.group(2)}: {choice.group(3)}"
        elif typed:
            message = f"{typed.group(1).split('/')[-1]}={typed.group(3)}: must be of type {typed.group(2)}"
        exit_with(UserError(f"{message} (see {self.prog} --help)"))


def run_script(main, *args) -> int:
    """main(*args)'s exit status; a ReportedError ends as its one line (HYDRA_FULL_ERROR=1: traceback)."""
    try:
        return main(*args)
    except ReportedError as err:
        if full_errors():
            raise
        exit_with(err)
