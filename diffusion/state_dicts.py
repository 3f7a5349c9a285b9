"""Loading a state dict into a model so that every difference is explained before anything loads."""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from diffusion.checkpoint_files import CheckpointError

_INDEX = re.compile(r"\.\d+(?=\.)")


def _listing(items: list[str], limit: int = 4) -> str:
    """The keys that differ: all of them when there are few; else one per layer kind, repeated blocks
    folded into `blocks.*.` (the first key of each kind stands for it), a bias left out where its weight
    is listed, so that a checkpoint of another model size reads in one short line."""
    if len(items) <= limit:
        return ", ".join(items)
    kinds: dict[str, str] = {}
    for item in items:
        kinds.setdefault(_INDEX.sub(".*", item.split(":")[0]), _INDEX.sub(".*", item, count=1))
    shown = [v for k, v in kinds.items() if not (k.endswith(".bias") and k[:-len("bias")] + "weight" in kinds)]
    more = f", ... ({len(shown) - limit + 1} more kinds)" if len(shown) > limit else ""
    return ", ".join(shown[:limit - 1] if more else shown) + more


def load_state_dict_checked(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """strict load, but check keys and shapes first and explain every difference.

    Raises CheckpointError (a UserError and ValueError; `model` left untouched) on missing keys,
    unexpected keys or shape mismatches; the message names `source` and one key per layer kind.
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
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {_listing(mismatched)}")
        raise CheckpointError(source, f"does not match the model ({type(model).__name__}; is it a checkpoint of "
                                      f"another model or size?); nothing was loaded; {'; '.join(parts)}")
    model.load_state_dict(state_dict, strict=True)
