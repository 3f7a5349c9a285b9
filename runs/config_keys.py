"""Name the config key a bad value came from, in the message a script prints.

A technique checks its own arguments and words the error for its own API (`ratio=1.5: ...`, as
`TStitchHook(ratio=1.5)` was called). When the run layer built that call from a config node, the user
typed another name: `accel.tstitch.ratio=1.5`. `name_config_key(err, node)` finds the argument in the
node (depth first), follows its `${...}` interpolation to the key the user sets, and rewrites the
error's message to start with that key (also kept as `err.config_key`).
"""
from __future__ import annotations

import re
from contextlib import contextmanager

from omegaconf import DictConfig, ListConfig, OmegaConf

from diffusion.errors import UserError

# `ratio=...` or `tgate gate_step=...`: an optional one-word owner, then the argument's name
_ARGUMENT = re.compile(r"^(?:[A-Za-z][\w-]* )?([A-Za-z_]\w*)=")
_INTERPOLATION = re.compile(r"^\$\{([\w.]+)\}$")


def _find(node, name: str) -> str | None:
    """The full key of argument `name` in node (depth first), following a plain `${key}` interpolation."""
    if not isinstance(node, DictConfig):
        return None
    raw_values = OmegaConf.to_container(node, resolve=False)  # interpolations as written
    for key in node.keys():
        if key == "_target_":
            continue
        raw = raw_values[key]
        if key == name:
            link = _INTERPOLATION.match(raw) if isinstance(raw, str) else None
            return link.group(1) if link else node._get_full_key(key)
        child = node._get_node(key)
        if isinstance(child, (DictConfig, ListConfig)):
            found = _find(child, name)
            if found is not None:
                return found
    return None


def name_config_key(err: UserError, node) -> UserError:
    """err, its message starting with the config key of the argument it names (when node holds it)."""
    if err.config_key is not None or not err.args or not isinstance(err.args[0], str):
        return err
    message = err.args[0]
    match = _ARGUMENT.match(message)
    key = _find(node, match.group(1)) if match else None
    if key:
        err.config_key = key
        err.args = (f"{key}={message[match.end():]}", *err.args[1:])
    return err


@contextmanager
def config_keys_of(node):
    """A UserError raised inside names the key of `node` it came from (`name_config_key`)."""
    try:
        yield
    except UserError as err:  # `ratio=1.5: ...` -> `accel.tstitch.ratio=1.5: ...`, the key the user sets
        raise name_config_key(err, node) from None
