"""Training checkpoints in the official DiT layout, written atomically.

DiT's train.py saves {"model", "ema", "opt", "args"} to results/<run>/checkpoints/<step:07d>.pt.
Ours keeps "model", "ema" and "opt" and stores, instead of an argparse Namespace, the
composed config ("config", a plain dict) and the number of steps done ("step"): both load
under torch.load(weights_only=True), and `dit.checkpoints` loads the EMA weights of either.
An export ({"ema", "config", "step"}) is the small file to ship: no raw weights, no optimiser.
"""
from __future__ import annotations

import io
from pathlib import Path

import torch

from diffusion.checkpoint_files import check_finite, read_torch_file
from diffusion.errors import UserError
from diffusion.outputs import atomic_write_bytes


def checkpoint_name(step: int) -> str:
    return f"{step:07d}.pt"


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    """torch.save into memory, then write under a temporary name and rename."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, buf.getvalue())


def train_state(model, ema, opt, step: int, config: dict, losses: dict | None = None) -> dict:
    """losses: the loss log so far ({"history": [[step, mean], ...], "window": [losses since]}),
    so that a resumed run's train_metrics.json keeps the whole history."""
    return {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
            "config": config, "step": int(step), **({"losses": losses} if losses is not None else {})}


def export_state(ema, step: int, config: dict) -> dict:
    return {"ema": ema.state_dict(), "config": config, "step": int(step)}


def load_train_state(path: str | Path) -> dict:
    """A checkpoint written by save_checkpoint(train_state(...)); refuses arbitrary pickles, damaged
    files and NaN/inf weights or optimiser state (CheckpointError)."""
    state = read_torch_file(path)
    missing = [k for k in ("model", "ema", "opt", "step") if not isinstance(state, dict) or k not in state]
    if missing:
        raise UserError(f"{path}: cannot resume from it, it lacks {missing} (an export or a release "
                         "holds weights only; resume needs a checkpoints/<step>.pt of scripts/train.py)")
    check_finite({k: state[k] for k in ("model", "ema", "opt")}, path)
    return state


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The highest-step <step:07d>.pt in folder, or None."""
    found = sorted(p for p in Path(folder).glob("*.pt") if p.stem.isdigit())
    return found[-1] if found else None
