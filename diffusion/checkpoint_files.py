"""Reading checkpoint files safely, with errors that say which file, which setting and what is wrong.

Every weights file the project reads goes through `read_torch_file` (torch.save's formats, always
`weights_only=True`) or `read_safetensors`, then `check_finite`. A file that cannot be used is a
`CheckpointError` (a UserError: the scripts print one `error: ...` line) that names the file and
says what is wrong with it: empty, truncated, not a checkpoint at all, damaged, holding pickled
Python objects (refused unread: unpickling them could run code; we never suggest
`weights_only=False`), or holding NaN/inf values (the first such tensor is named).

The loaders do not know which setting named the file; `checkpoint_setting("model.ckpt")` around a
load adds it: `model.ckpt=/path/x.pt: truncated ...`.
"""
from __future__ import annotations

import json
import pickle
import re
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import UserError
from .finite import first_nonfinite

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
# the pickled magic number of torch's old format
LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
AGAIN = "copy, download or write it again"
# the folder that holds the packages: files shipped with the code (checkpoints/digits/*.pt) are found from
# any working directory
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def local_file(name: str | Path) -> Path | None:
    """A path as the user gave it: itself when it exists (relative paths from the working directory),
    else, for a relative path, the same path under PACKAGE_ROOT if that exists; None when neither does."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    if not path.is_absolute() and (PACKAGE_ROOT / path).exists():
        return PACKAGE_ROOT / path
    return None


def looked_in(name: str | Path) -> str:
    """Where local_file looked for name, for a `no such file` message."""
    path = Path(name).expanduser()
    if path.is_absolute():
        return "no such file"
    folders = dict.fromkeys([str(Path.cwd()), str(PACKAGE_ROOT)])
    return f"no such file (looked for it in {' and '.join(folders)})"


class CheckpointError(UserError, ValueError):
    """A weights file that cannot be used: `[key=]path: problem`."""

    def __init__(self, path, problem: str, key: str | None = None):
        self.path, self.problem, self.key = str(path), problem, key
        super().__init__(f"{key}={self.path}: {problem}" if key else f"checkpoint {self.path}: {problem}")

    def __reduce__(self):  # pickles (e.g. to other ranks) with its three parts
        return type(self), (self.path, self.problem, self.key)


@contextmanager
def checkpoint_setting(key: str):
    """Checkpoint errors raised in the block name `key`, the setting that gave the file."""
    try:
        yield
    except CheckpointError as err:
        if err.key is not None:
            raise
        raise CheckpointError(err.path, err.problem, key) from None


def _size_problem(path: Path) -> str | None:
    if not path.is_file():
        return "no such file"
    if path.stat().st_size == 0:
        return f"empty file (0 bytes): {AGAIN}"
    return None


def read_torch_file(path: str | Path, safe_globals=(), mmap: bool = False):
    """torch.load(path, weights_only=True) on the CPU, or a CheckpointError saying what is wrong.

    safe_globals: classes the file may hold besides tensors and containers (e.g. argparse.Namespace,
    which DiT's train.py stores). mmap: map a zip-format file instead of reading it (large files).
    """
    path = Path(path)
    problem = _size_problem(path)
    if problem:
        raise CheckpointError(path, problem)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(len(LEGACY_MAGIC))
    is_zip = head.startswith(ZIP_MAGIC)
    if is_zip and not zipfile.is_zipfile(path):
        raise CheckpointError(path, f"truncated: a zip archive (torch.save's format) without its end, {size} bytes "
                                    f"long, e.g. a copy or download that stopped early; {AGAIN}")
    if not is_zip and not head.startswith(LEGACY_MAGIC):
        raise CheckpointError(path, f"not a PyTorch checkpoint: neither torch.save's zip archive nor its legacy "
                                    f"format (the file starts with {head[:8]!r})")
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found:
            raise CheckpointError(path, f"holds pickled Python objects ({found.group(1)}), not only tensors and plain "
                                        "containers; refused unread, as unpickling them could run any code: save "
                                        "the state dict alone (tensors) from a trusted copy") from None
        raise CheckpointError(path, f"damaged: its pickled data cannot be read; {AGAIN}") from None
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(path, f"damaged or truncated ({size} bytes; torch: {_first_line(err)}); "
                                    f"{AGAIN}") from None


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """safetensors' load_file on the CPU, or a CheckpointError saying what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    problem = _size_problem(path)
    if problem:
        raise CheckpointError(path, problem)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(path, _safetensors_problem(path, err)) from None


def _safetensors_problem(path: Path, err: Exception) -> str:
    """What is wrong with a safetensors file that did not load: 8 bytes of header length, a JSON
    header giving each tensor's byte range, then the data."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
        length = int.from_bytes(head[:8], "little") if len(head) == 9 else -1
        if len(head) < 9 or head[8:9] != b"{":
            return f"not a safetensors file (the file starts with {head[:8]!r})"
        if 8 + length > size:
            return f"truncated: {size} bytes, its header alone takes {8 + length}; {AGAIN}"
        try:
            header = json.loads(b"{" + f.read(length - 1))
            end = 8 + length + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            return f"damaged: its header is not valid; {AGAIN}"
    if end > size:
        return f"truncated: {size} bytes of the {end} its header describes; {AGAIN}"
    return f"damaged ({size} bytes; safetensors: {_first_line(err)}); {AGAIN}"


def check_finite(tensors, path: str | Path) -> None:
    """Refuse weights holding NaN or inf, naming the first such tensor (tensors: a state dict,
    or nested dicts/lists of them)."""
    bad = first_nonfinite(tensors)
    if bad is not None:
        name, count, total, kinds = bad
        raise CheckpointError(path, f"tensor {name!r} holds {kinds} ({count:,} of {total:,} values are not "
                                    "finite): these weights would sample NaN images, so they were not loaded")


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and "weights_only" not in line]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
