"""A run folder that can be resumed: which samples are on disk, what is missing, when it is done.

The folder's state is its files, nothing else:

* `000000.png`, ... one per sample index, each written atomically (diffusion.outputs), so a
  PNG under its final name is complete; a killed run leaves at most hidden temporaries
  (`.000007.png.tmp<pid>`), which the next run deletes. A PNG counts as done only when it
  decodes and has the run's image size: one damaged since (a zero-byte copy, a truncated
  file) is made again.
* `samples_config.json`: the part of the config that decides the images (model, sampler,
  schedule, accel, seed, labels, ...; not num_samples, batch_size, device, logging). A rerun
  with another such config into the folder is refused: its PNGs would mix two experiments.
  Compared in one layout (`comparable`): the acceleration as the hooks and stitched models it
  builds, so folders written before techniques composed by name (`accel=tstitch_digits_tgate`,
  now `accel=[tstitch,tgate]`) resume, while any setting that changes a hook or a model is refused.
* `samples.npz`, `grid.png`, `metrics.json`: rebuilt at the end from the first num_samples
  PNGs on disk whenever this run added samples (or they do not match num_samples).
* `done`: written last; says the folder holds num_samples complete samples. A rerun that
  finds it (same num_samples, same config, every PNG and samples.npz sound) does nothing.
"""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from diffusion.errors import UserError
from diffusion.outputs import npz_array_header, sample_filename, save_json

log = logging.getLogger(__name__)

DONE = "done"
CONFIG_FILE = "samples_config.json"
# config keys that change how a run is carried out, not which image sample k is (compile: the same
# graphs, equal to eager up to float rounding)
RUN_ONLY_KEYS = ("num_samples", "batch_size", "device", "num_threads", "progress", "grid_by_label",
                 "grid_max", "logger", "evaluate", "hydra", "compile", "compile_backend")


def samples_config(cfg: DictConfig, precision: str | None = None) -> dict:
    """The resolved config minus RUN_ONLY_KEYS: equal for two runs whose sample k are the same image.

    precision: the run's resolved precision (`auto` becomes fp32 on a CPU, tf32 on CUDA), recorded
    instead of the setting, so that a folder begun on a CPU is not resumed on a GPU in another type."""
    data = OmegaConf.to_container(cfg, resolve=True)
    config = {k: v for k, v in data.items() if k not in RUN_ONLY_KEYS}
    if precision is not None:
        config["precision"] = precision
    return config


def _differences(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: folder has {a!r}, this run {b!r}"]


def grid_batches(indices, batch_size: int) -> list[list[int]]:
    """indices (sorted) grouped by the batch they belong to in a fresh run ([b*bs, (b+1)*bs)).

    A resumed run thus gives whole missing batches the exact composition of a fresh run
    (same images to the bit); a batch cut by a kill runs as its missing remainder.
    """
    batches: dict[int, list[int]] = {}
    for k in sorted(int(i) for i in indices):
        batches.setdefault(k // batch_size, []).append(k)
    return [batches[b] for b in sorted(batches)]


def png_problem(path: Path, size: tuple[int, int] | None) -> str | None:
    """None when path is a PNG that decodes (to size = (width, height), if given), else what is wrong."""
    try:
        with Image.open(path) as image:
            image.load()  # decodes every row: a truncated file fails here
            if size is not None and image.size != size:
                return f"{image.size[0]}x{image.size[1]} pixels, expected {size[0]}x{size[1]}"
    except FileNotFoundError:
        return "missing"
    except (OSError, SyntaxError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
        return f"does not decode ({type(err).__name__}: {err})"
    return None


# Keys samples_config.json gained after folders were written, with the value every earlier run had, so
# that such a folder still resumes: every run sampled in float32 before `precision` existed.
KEYS_ADDED_LATER = {"precision": "fp32", "compile_mode": "default"}  # compile_mode acts only with compile


def comparable(config: dict) -> dict:
    """A samples_config in the layout two runs are compared in: `accel` as what it builds on a native
    run (its hooks with their resolved settings, T-Stitch's models), without names (`accel.name` of the
    old combination files), settings nodes (referenced by the hooks), pipeline entries (native runs apply
    none) or the model family's facts (`family`: what the hooks and models took from it is in them)."""
    config = {k: v for k, v in config.items() if k != "family"}
    accel = config.get("accel") or {}
    hooks = dict(accel.get("hooks") or {})
    models = dict(accel.get("models") or {}) if "tstitch" in hooks else {}  # T-Stitch's denoisers
    config["accel"] = {"hooks": hooks, "models": models}
    return config


class SampleFolder:
    def __init__(self, out_dir: str | Path, num_samples: int, image_size: int | None = None):
        """image_size: the side of the run's square images; PNGs of another size count as damaged."""
        self.dir = Path(out_dir)
        self.num_samples = int(num_samples)
        self.size = None if image_size is None else (int(image_size), int(image_size))
        self._missing: list[int] | None = None

    def png(self, k: int) -> Path:
        return self.dir / sample_filename(k)

    def check_config(self, config: dict) -> None:
        """Refuse a folder holding samples of another config (read-only: before any work)."""
        path = self.dir / CONFIG_FILE
        if not path.is_file():
            return
        saved = json.loads(path.read_text())
        for key, before in KEYS_ADDED_LATER.items():  # folders written before the key existed ran with `before`
            saved.setdefault(key, before)
        diff = _differences(comparable(saved), comparable(json.loads(json.dumps(config))))
        if diff:
            raise UserError(f"{self.dir} holds samples of another config ({'; '.join(diff[:5])}"
                             f"{'; ...' if len(diff) > 5 else ''}): resume only with the same settings, "
                             "or write to a new folder (hydra.run.dir=...)")

    def is_done(self) -> bool:
        """The done marker for this num_samples, every PNG sound, and samples.npz holding them all."""
        path = self.dir / DONE
        header = npz_array_header(self.dir / "samples.npz")
        shape = header[0] if header is not None else ()
        if not path.is_file() or len(shape) != 4 or shape[0] != self.num_samples:
            return False
        if self.size is not None and shape[1:3] != self.size[::-1]:
            return False
        try:
            marker = json.loads(path.read_text())
        except json.JSONDecodeError:
            return False
        return marker.get("num_samples") == self.num_samples and not self.missing()

    def existing(self) -> list[int]:
        missing = set(self.missing())
        return [k for k in range(self.num_samples) if k not in missing]

    def missing(self) -> list[int]:
        """Indices without a sound PNG (absent, or damaged: these are logged and made again).
        Every PNG is decoded once per SampleFolder (threads: decoding releases the GIL)."""
        if self._missing is None:
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                problems = list(pool.map(lambda k: png_problem(self.png(k), self.size), range(self.num_samples)))
            damaged = [(k, p) for k, p in enumerate(problems) if p not in (None, "missing")]
            for k, problem in damaged[:10]:
                log.warning("%s: %s; it will be made again", self.png(k), problem)
            if len(damaged) > 10:
                log.warning("... and %d more damaged PNGs, made again too", len(damaged) - 10)
            self._missing = [k for k, p in enumerate(problems) if p is not None]
        return list(self._missing)

    def prepare(self, config: dict) -> list[int]:
        """Claim the folder for a run (rank 0 only): record the config, drop a stale done marker
        and temporaries a killed run left; returns the missing indices."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.dir.glob(".*.tmp*"):
            tmp.unlink(missing_ok=True)
        missing = self.missing()
        self._missing = None  # the run fills them in: look again next time
        if missing:
            (self.dir / DONE).unlink(missing_ok=True)
        save_json(config, self.dir / CONFIG_FILE)
        return missing

    def read_images(self, n: int | None = None) -> np.ndarray:
        """The first n (default num_samples) PNGs as (n, H, W, 3) uint8, filled in place (one copy in memory)."""
        n = self.num_samples if n is None else n
        first = np.asarray(Image.open(self.png(0)).convert("RGB"))
        images = np.empty((n, *first.shape), dtype=np.uint8)
        for k in range(n):
            images[k] = first if k == 0 else np.asarray(Image.open(self.png(k)).convert("RGB"))
        return images

    def mark_done(self, info: dict) -> None:
        save_json({"num_samples": self.num_samples, **info}, self.dir / DONE)

    def previous_metrics(self) -> dict | None:
        path = self.dir / "metrics.json"
        return json.loads(path.read_text()) if path.is_file() else None
