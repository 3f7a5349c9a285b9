"""Loading a state dict into a model so that every difference is explained before anything loads."""
from __future__ import annotations

import torch
import torch.nn as nn

from diffusion.errors import UserError


def _listing(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def load_state_dict_checked(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """strict load, but check keys and shapes first and explain every difference.

    Raises ValueError (and leaves `model` untouched) on missing keys, unexpected keys
    or shape mismatches; the message names `source`.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state_dict))
        if state_dict[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {source} does not match the model ({type(model).__name__}); nothing was loaded."]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): {_listing(mismatched)}")
        raise UserError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)
