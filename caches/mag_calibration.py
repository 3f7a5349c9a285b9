"""MagCache's calibration files: the residual-magnitude ratio of every step, per model, by name.

`accel.mag_cache.calibration=NAME` reads calibrations/mag_cache/NAME.json (from the folder the run
starts in, the repository root); a value ending in .json is a path. A calibrating run
(`accel.mag_cache.calibrate=true`, nothing skipped) writes (or updates) that file: per model, the mean
over the run's batches of diffusers' ratio mean(|r_i| / |r_{i-1}|) over tokens and rows, at every step
the model ran but its first (which has no previous residual). Runs with another step count read the
ratios by nearest neighbour along the trajectory (diffusers' own nearest_interp).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers.hooks.mag_cache import nearest_interp

from diffusion.errors import UserError
from diffusion.outputs import save_json

FOLDER = Path("calibrations/mag_cache")
COMMAND = ("python scripts/sample.py <the run's overrides> accel.mag_cache.calibrate=true "
           "accel.mag_cache.calibration={name}")


def resolve(name: str | None) -> Path | None:
    if name is None:
        return None
    if not isinstance(name, str) or not name:
        raise UserError(f"accel.mag_cache.calibration={name!r}: a calibration name (calibrations/mag_cache/NAME.json) "
                         "or a .json path")
    return Path(name) if name.endswith(".json") else FOLDER / f"{name}.json"


def load(path: Path | None, name: str | None) -> dict:
    if path is None:
        raise UserError("accel.mag_cache.calibration=null: MagCache needs the model's ratios; calibrate once with: "
                         + COMMAND.format(name="NAME"))
    if not path.is_file():
        raise UserError(f"accel.mag_cache.calibration={name!r}: no file {path}; make it with: "
                         + COMMAND.format(name=name))
    try:
        table = json.loads(path.read_text())
        table["models"]
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"accel.mag_cache.calibration={name!r}: {path} is not a calibration file ({error})") from None
    return table


def ratios_for(table: dict, model: str, num_steps: int, name: str) -> torch.Tensor:
    """The model's ratio at each of the run's `num_steps` steps (1.0 where it was not calibrated)."""
    entry = table["models"].get(model)
    if entry is None:
        raise UserError(f"accel.mag_cache.calibration={name!r} has no ratios for {model} (it has "
                         f"{', '.join(table['models']) or 'none'}); make them with: " + COMMAND.format(name=name))
    ratios = torch.tensor([1.0 if r is None else float(r) for r in entry], dtype=torch.float32)
    return ratios if len(ratios) == num_steps else nearest_interp(ratios, num_steps)


def save(path: Path, recorded: dict[str, dict[int, list[float]]], num_steps: int) -> None:
    """Merge the recorded ratios (model -> step -> per-batch values) into the file at `path`."""
    table = json.loads(path.read_text()) if path.is_file() else {"steps": num_steps, "models": {}}
    if table.get("steps") != num_steps:
        table = {"steps": num_steps, "models": {}}  # another step count: start over
    for model, steps in recorded.items():
        ratios = table["models"].get(model) or [None] * num_steps
        for i, values in steps.items():
            ratios[i] = sum(values) / len(values)
        table["models"][model] = ratios
    path.parent.mkdir(parents=True, exist_ok=True)
    save_json(table, path)
