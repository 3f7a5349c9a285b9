"""Find, load and check DiT checkpoints; build a ready model by name.

Accepted checkpoints:
  * an official release name ("DiT-XL-2-256x256.pt"), fetched once into the torch
    hub cache ($TORCH_HOME/hub/checkpoints) unless offline;
  * a local .pt: a plain state dict (the releases) or a DiT train.py checkpoint
    ({"model", "ema", "opt", "args"}; the EMA weights are used);
  * a diffusers DiTTransformer2DModel `save_pretrained` folder (or pipeline folder).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from diffusion.checkpoint_files import check_finite, local_file, read_torch_file
from diffusion.errors import UserError
from diffusion.state_dicts import load_state_dict_checked
from dit.convert import (
    diffusers_to_official,
    is_diffusers_folder,
    load_diffusers_dit,
    official_kwargs_from_diffusers_config,
    read_diffusers_config,
)
from dit.models import DiT, DiT_models, dit_config

_URL = "https://dl.fbaipublicfiles.com/DiT/models/{name}"
OFFICIAL_CHECKPOINTS = {
    name: _URL.format(name=name) for name in ("DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt")
}
OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIT_OFFLINE")


def official_checkpoint_for(name: str, input_size: int) -> str | None:
    """Release file for a model name and latent size ("DiT-XL/2", 32 -> "DiT-XL-2-256x256.pt"), or None.

    The releases are latent-space models for the SD VAE (8x downsampling).
    """
    image = input_size * 8
    candidate = f"{name.replace('/', '-')}-{image}x{image}.pt"
    return candidate if candidate in OFFICIAL_CHECKPOINTS else None


class CheckpointNotFoundError(FileNotFoundError):
    """A checkpoint is neither on disk nor obtainable; the message says how to fix it."""


def default_cache_dir() -> Path:
    """$TORCH_HOME/hub/checkpoints (torch.hub's own cache; evaluated per call)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _offline_reason() -> str | None:
    for var in OFFLINE_ENV_VARS:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var}={os.environ[var]} is set"
    return None


def _unavailable(name: str, folder: Path, reason: str) -> CheckpointNotFoundError:
    url = OFFICIAL_CHECKPOINTS[name]
    return CheckpointNotFoundError(
        f"DiT checkpoint {name!r} is not in {folder} and could not be downloaded ({reason}).\n"
        f"  URL: {url}\n"
        f"  Fix: on a machine with network, `curl -L --create-dirs -o {folder / name} {url}` "
        f"(or copy the file there / set TORCH_HOME), or pass the path of a local copy; "
        f"unset {'/'.join(OFFLINE_ENV_VARS)} to allow the download."
    )


def resolve_checkpoint(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Local file/folder -> itself; official release name -> cached (downloaded if needed) file."""
    path = local_file(name_or_path)  # relative paths: the working directory, then the repository
    if path is not None:
        return path
    name = str(name_or_path)
    if name not in OFFICIAL_CHECKPOINTS:
        raise CheckpointNotFoundError(
            f"checkpoint {name!r} is not an existing file or folder, nor an official DiT checkpoint name "
            f"({', '.join(OFFICIAL_CHECKPOINTS)})"
        )
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = folder / name
    if target.is_file():
        return target
    reason = _offline_reason()
    if reason:
        raise _unavailable(name, folder, f"offline: {reason}")

    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f"{name}.{os.getpid()}.partial"
    try:
        torch.hub.download_url_to_file(OFFICIAL_CHECKPOINTS[name], str(partial), progress=True)
        os.replace(partial, target)  # atomic: a crash never leaves a truncated `name`
    except Exception as exc:  # network errors come in many types
        partial.unlink(missing_ok=True)
        raise _unavailable(name, folder, f"download failed: {exc!r}") from exc
    return target


def load_checkpoint_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Official-layout state dict from a .pt file or a diffusers folder (always on CPU).

    .pt files are read with weights_only=True: arbitrary pickled objects are
    refused. argparse.Namespace is allowed because DiT's train.py stores its args.
    Unreadable files and weights holding NaN/inf are a CheckpointError (diffusion.checkpoint_files).
    """
    path = Path(path)
    if path.is_dir():
        if not is_diffusers_folder(path):
            raise CheckpointNotFoundError(f"{path} is a folder but not a diffusers DiT folder "
                                          "(no config.json + weights)")
        state_dict, config = load_diffusers_dit(path)
        check_finite(state_dict, path)
        return diffusers_to_official(state_dict, config)
    obj = read_torch_file(path, safe_globals=[argparse.Namespace])
    if isinstance(obj, dict) and "ema" in obj:
        obj = obj["ema"]
    elif isinstance(obj, dict) and "model" in obj:
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: expected a state dict of tensors (or a dict with 'ema'/'model'), "
                        f"got {type(obj).__name__}")
    check_finite(obj, path)
    return obj


def build_dit(
    name: str | None,
    input_size: int = 32,
    num_classes: int = 1000,
    learn_sigma: bool = True,
    ckpt: str | os.PathLike | None = None,
    class_dropout_prob: float = 0.1,
    in_channels: int = 4,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    pretrained: bool = False,
    arch: dict | None = None,
) -> DiT:
    """Build `name` (e.g. "DiT-XL/2") and load `ckpt`; returns the model in eval mode.

    input_size: latent side (image side / 8 for the SD VAE).
    ckpt: local .pt, diffusers folder, official release name, or None.
    ckpt=None: random init, unless pretrained=True, which picks the official release
    for (name, input_size) and fails if there is none. An explicit ckpt is always loaded.
    name=None is allowed only with a diffusers folder: the architecture then comes
    from its config.json (the other size arguments are ignored).
    arch: a custom architecture (keys depth, hidden_size, num_heads, patch_size, optional
    mlp_ratio) instead of an official one; `name` is then only a display name (e.g. the
    digits models), and pretrained=True needs an explicit ckpt (no release exists).
    """
    if arch is not None:
        return _build_custom(name, dict(arch), input_size, num_classes, learn_sigma, ckpt,
                             class_dropout_prob, in_channels, cache_dir, device, pretrained)
    if name is not None and name not in DiT_models:
        raise UserError(f"unknown DiT model {name!r}; allowed names: {', '.join(DiT_models)}")
    if ckpt is None and pretrained:
        ckpt = official_checkpoint_for(name, input_size) if name is not None else None
        if ckpt is None:
            raise UserError(
                f"no official checkpoint for {name} at latent size {input_size} "
                f"(released: {', '.join(OFFICIAL_CHECKPOINTS)}, i.e. DiT-XL/2 at latent 32 or 64); "
                "pass ckpt= or pretrained=False"
            )

    path = resolve_checkpoint(ckpt, cache_dir) if ckpt is not None else None
    diffusers_config = read_diffusers_config(path) if path is not None and is_diffusers_folder(path) else None
    if name is None:
        if diffusers_config is None:
            raise UserError(f"name=None needs a diffusers folder checkpoint; allowed names: {', '.join(DiT_models)}")
        model = DiT(**official_kwargs_from_diffusers_config(diffusers_config))
    else:
        if diffusers_config is not None:
            # Head count is invisible in weight shapes, so check it explicitly.
            heads = diffusers_config.get("num_attention_heads")
            if heads != dit_config(name)["num_heads"]:
                raise UserError(f"{path} has {heads} attention heads but {name} has {dit_config(name)['num_heads']}")
        model = DiT_models[name](
            input_size=input_size,
            num_classes=num_classes,
            learn_sigma=learn_sigma,
            class_dropout_prob=class_dropout_prob,
            in_channels=in_channels,
        )
    if path is not None:  # named as given (a shipped file may have been found under the repository)
        load_state_dict_checked(model, load_checkpoint_state_dict(path), source=str(ckpt))
    if device is not None:
        model = model.to(device)
    return model.eval()


ARCH_KEYS = ("depth", "hidden_size", "num_heads", "patch_size")


def _build_custom(name, arch, input_size, num_classes, learn_sigma, ckpt, class_dropout_prob,
                  in_channels, cache_dir, device, pretrained) -> DiT:
    """build_dit with an explicit architecture; same checkpoint handling as the official names."""
    missing = [k for k in ARCH_KEYS if k not in arch]
    unknown = sorted(set(arch) - set(ARCH_KEYS) - {"mlp_ratio"})
    if missing or unknown:
        raise UserError(f"model {name!r}: arch needs {', '.join(ARCH_KEYS)} (and optionally mlp_ratio); "
                         f"missing {missing}, unknown {unknown}")
    if ckpt is None and pretrained:
        raise UserError(f"model {name!r} has a custom architecture and no official checkpoint: "
                         "pass ckpt= (e.g. a scripts/train.py checkpoint) or pretrained=False")
    model = DiT(input_size=input_size, num_classes=num_classes, learn_sigma=learn_sigma,
                class_dropout_prob=class_dropout_prob, in_channels=in_channels, **arch)
    if ckpt is not None:
        path = resolve_checkpoint(ckpt, cache_dir)
        load_state_dict_checked(model, load_checkpoint_state_dict(path), source=str(ckpt))
    if device is not None:
        model = model.to(device)
    return model.eval()
