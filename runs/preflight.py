"""Every check of a sampling run that reads no weights, made before Hydra writes into the run folder.

`check_sample_run(cfg, folder)` is what configs/sample.yaml's run-folder callback
(runs.hydra_callbacks) calls before a single run starts and, for a sweep, on every job's config
before the first job starts; it raises UserError naming the key as the user typed it:

* device (`device=tpu`), seed (the range that numpy's and torch's streams take), the config checks of
  runs.run / runs.pipeline_run, the accel hooks' own checks (built from their settings), evaluation's
  settings;
* every file a setting names (`model.ckpt`, `family.stitch.small.ckpt`, ...): a relative path is
  looked for in the working directory, then in the repository (shipped files such as
  checkpoints/digits/*.pt); a folder where a file is wanted;
* every model the run downloads (hub ids in `*.source`, DiT's official release files): when one is
  not on this machine and cannot be fetched (offline, or the host unreachable), all of them are
  named with how to make them local;
* a folder that already holds samples of another config (read under the folder's lock).
"""
from __future__ import annotations

import copy
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from omegaconf import DictConfig, open_dict, read_write

from diffusion.checkpoint_files import local_file, looked_in
from diffusion.errors import MissingFileError, UserError
from runs.devices import check_device

# numpy's SeedSequence takes any integer >= 0, torch's manual_seed one below 2**64; sample k uses seed + k
SEED_LIMIT = 2**63
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIT_OFFLINE")


def check_seed(seed, num_samples) -> None:
    """seed=...: an integer with seed + k (k < num_samples) in [0, 2**63 - 1]."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError.setting("seed", seed, f"must be an integer in [0, {SEED_LIMIT - 1}]")
    count = num_samples if isinstance(num_samples, int) and num_samples > 0 else 1
    if not 0 <= seed <= SEED_LIMIT - count:
        raise UserError.setting("seed", seed, f"must be an integer in [0, {SEED_LIMIT - count}] (sample k uses "
                                              f"seed + k, k < num_samples={count}, below 2**63)")


def _nodes(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """The config nodes that name weights, each with its key as the user sets it: the models (the T-Stitch
    partner as family.stitch.small, accel.models.* set by hand, model) and the VAE."""
    from runs.run import model_configs, model_keys

    nodes = list(zip(model_keys(cfg), model_configs(cfg), strict=True))
    if isinstance(cfg.get("vae"), DictConfig):
        nodes.append(("vae", cfg.vae))
    return nodes


def check_files(cfg: DictConfig) -> None:
    """Every `ckpt` a pretrained run reads: an existing file (or a diffusers folder), or a release name."""
    if not cfg.pretrained:
        return
    from dit.checkpoints import OFFICIAL_CHECKPOINTS

    for key, node in _nodes(cfg):
        ckpt = node.get("ckpt")
        if ckpt is None or not isinstance(ckpt, str):
            continue
        path = local_file(ckpt)
        if path is None:
            if ckpt in OFFICIAL_CHECKPOINTS:
                continue  # checked with the downloads
            raise MissingFileError.setting(f"{key}.ckpt", ckpt, looked_in(ckpt))
        if path.is_dir() and not (path / "config.json").is_file():
            raise UserError.setting(f"{key}.ckpt", ckpt, "a folder, not a checkpoint: give a weights file (.pt, "
                                                         ".ckpt, .safetensors) or a diffusers folder (config.json)")


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot_download(repo_id, local_files_only=True)
        return True
    except (LocalEntryNotFoundError, OSError, ValueError):
        return False


def _needed_downloads(cfg: DictConfig) -> list[tuple[str, str, str, str]]:
    """(key, its value as set, what is downloaded, from which host) of every model the run would
    download: hub ids not in the local cache, DiT release files not in torch's cache."""
    if not cfg.pretrained:
        return []
    from huggingface_hub.constants import ENDPOINT

    from dit.checkpoints import OFFICIAL_CHECKPOINTS, default_cache_dir, official_checkpoint_for

    hub_host = urlparse(ENDPOINT).hostname or "huggingface.co"
    needed = []
    pipeline = cfg.model.get("kind") == "pipeline"
    for key, node in _nodes(cfg):
        if key == "vae" and (pipeline or node.get("_target_")):
            continue  # a pipeline's own VAE, or an LDM's own first stage (read from its checkpoint)
        source = node.get("source")
        if isinstance(source, str) and source not in ("", "none") and local_file(source) is None:
            if source.count("/") == 1 and not source.startswith((".", "/", "~")) and not _hub_cached(source):
                needed.append((f"{key}.source", source, source, hub_host))
        if key == "vae" or node.get("kind") == "pipeline" or "ckpt" not in node:
            continue
        ckpt = shown = node.get("ckpt")
        if ckpt is None and node.get("_target_", "").startswith("dit."):  # null: the official release file
            size = node.get("image_size")
            ckpt = official_checkpoint_for(str(node.get("name")), int(size) // 8) if size else None
            shown = f"null (the release file {ckpt})"
        if isinstance(ckpt, str) and ckpt in OFFICIAL_CHECKPOINTS and local_file(ckpt) is None:
            if not (default_cache_dir() / ckpt).is_file():
                needed.append((f"{key}.ckpt", shown, ckpt, urlparse(OFFICIAL_CHECKPOINTS[ckpt]).hostname))
    return needed


def _unreachable(host: str, timeout: float = 3.0) -> str | None:
    """Why host cannot be reached now (None: it answers on port 443)."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return None
    except OSError as err:
        return f"{host} cannot be reached ({err.strerror or err})"


def check_downloads(cfg: DictConfig) -> None:
    """Refuse now, naming every model the run needs, when one is neither local nor downloadable."""
    needed = _needed_downloads(cfg)
    if not needed:
        return
    offline = next((f"{v}={os.environ[v]} is set" for v in OFFLINE_VARS
                    if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")), None)
    why = offline
    if why is None:
        why = next((r for r in (_unreachable(h) for h in dict.fromkeys(h for *_, h in needed)) if r), None)
    if why is None:
        return  # downloadable: the loaders fetch them
    from huggingface_hub.constants import HF_HUB_CACHE

    from dit.checkpoints import default_cache_dir

    names = "; ".join(f"{key}={shown}" for key, shown, _, _ in needed)
    hub = [what for key, _, what, _ in needed if key.endswith(".source")]
    files = [what for key, _, what, _ in needed if key.endswith(".ckpt")]
    how = []
    if hub:
        how.append(f"`huggingface-cli download {' '.join(hub)}` on a machine with network (gated models: accept "
                   f"the licence and `huggingface-cli login` first) and copy {HF_HUB_CACHE} here, or set each "
                   "*.source to a local save_pretrained folder")
    if files:
        how.append(f"put {', '.join(files)} into {default_cache_dir()} (or pass a local copy as the *.ckpt)")
    key, shown, _, _ = needed[0]
    raise UserError(f"{key}={shown}: not on this machine and cannot be downloaded ({why}); the run needs "
                    f"{len(needed)} model(s) that are not local: {names}; to make them local: {'; '.join(how)}")


def check_folder(cfg: DictConfig, folder: Path, device: torch.device, key: str = "hydra.run.dir") -> None:
    """A folder holding samples of another config is refused (read-only; the caller holds its lock)."""
    from runs.resume import CONFIG_FILE, SampleFolder, samples_config
    from runs.speed import Speed

    if cfg.model.get("kind") == "pipeline" or not (Path(folder) / CONFIG_FILE).is_file():
        return
    speed = Speed.from_config(cfg, device)
    try:
        SampleFolder(folder, cfg.num_samples, image_size=int(cfg.model.image_size)).check_config(
            samples_config(cfg, precision=speed.precision))
    except UserError as err:  # `<folder> holds samples of ...` -> `hydra.run.dir=<folder>: holds samples of ...`
        text = str(err)
        if text.startswith(f"{folder} "):
            raise UserError(f"{key}={folder}: {text[len(str(folder)) + 1:]}") from None
        raise


def check_sample_run(cfg: DictConfig, folder: str | Path | None = None, key: str = "hydra.run.dir") -> None:
    """Every check of scripts/sample.py's run that needs no weights; folder: the run folder, if it is known
    (key: the setting that named it, for messages)."""
    from runs.run import build_hooks, check_config

    device = check_device(cfg.device)
    check_seed(cfg.seed, cfg.num_samples)
    if cfg.model.get("kind") == "pipeline":
        from runs.pipeline_run import check_pipeline_config

        check_pipeline_config(cfg)
    else:
        check_config(cfg)
        build_hooks(cfg)  # the techniques check their own settings (e.g. accel.tstitch.ratio)
    check_files(cfg)
    if (cfg.get("evaluate") or {}).get("reference") is not None:
        from evaluation.run_eval import check_evaluate_settings

        check_evaluate_settings(cfg.evaluate)
    check_downloads(cfg)
    if folder is not None:
        check_folder(cfg, Path(folder), device, key)


def job_config(config: DictConfig) -> DictConfig:
    """The job's view of a config Hydra composed: a copy without its `hydra` node, as run_job makes it."""
    cfg = copy.deepcopy(config)
    if "hydra" in cfg:
        with read_write(cfg), open_dict(cfg):
            del cfg["hydra"]
    return cfg
