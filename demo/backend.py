"""Compose a pair's config from the page's settings, run it, and report images, time, MACs, speed-up.

All the work goes through `runs.run.run_from_config` (the same path as
scripts/sample.py), so what the page shows is what a command-line run would give.
One run at a time: Hydra's global state, torch's thread count and the CPU are shared.
"""
from __future__ import annotations

import logging
import re
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffusion.errors import ReportedError
from runs.run import run_from_config

from .pairs import CONFIGS, REPO_ROOT, SLOT_LABELS, ModelPair
from .settings import Settings, SettingsError

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]   # (share done in [0, 1], what is running)

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
WEIGHT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors", ".bin")


class DemoError(Exception):
    """Something the person at the page can fix (a setting, missing weights, a pair not in this build)."""


@dataclass
class RunResult:
    images: np.ndarray        # (N, H, W, 3) uint8, sample order
    labels: np.ndarray        # (N,) class labels
    metrics: dict             # the run's metrics.json
    wall_seconds: float       # the whole call: compose, build, MACs count, sampling, writing

    @property
    def sampling_seconds(self) -> float:
        return float(self.metrics["sampling_seconds"])

    @property
    def macs_per_image(self) -> int:
        return int(self.metrics["macs_per_image"])


@dataclass
class GenerateResult:
    run: RunResult
    large_alone: RunResult    # same settings, large model for every step, no gating (cached per setting)
    large_name: str

    @property
    def time_speedup(self) -> float:
        return self.large_alone.sampling_seconds / max(self.run.sampling_seconds, 1e-9)

    @property
    def macs_speedup(self) -> float:
        return self.large_alone.macs_per_image / max(self.run.macs_per_image, 1)


@dataclass
class SweepPoint:
    fraction: float
    steps_per_model: dict[str, int]
    sampling_seconds: float
    macs_per_image: int
    accuracy: float | None    # digits: classifier agreement; None where the pair has no quality measure


def _is_local_path(value: str) -> bool:
    """A value the loader can only read from disk (a hub id or a bare release name is left to the loader)."""
    if value.startswith(("/", "~", "./", "../")):
        return True
    if "/" not in value:
        return False          # e.g. an official release name such as DiT-XL-2-256x256.pt
    return not (HUB_ID.fullmatch(value) and not value.endswith(WEIGHT_SUFFIXES))


class DemoBackend:
    def __init__(self, num_threads: int | None = None, work_dir: str | Path | None = None):
        self.num_threads = num_threads      # None: the config's (digits: 1)
        self.work_dir = Path(work_dir) if work_dir else None
        if self.work_dir:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._large_alone: dict[Settings, RunResult] = {}

    # -- config --------------------------------------------------------------------------
    def compose(self, settings: Settings) -> DictConfig:
        """The run's config: the pair's overrides, the settings, the weights typed in the page."""
        pair = settings.model_pair
        unavailable = pair.availability_error()
        if unavailable:
            raise DemoError(unavailable)
        try:
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
                cfg = compose(config_name="sample", overrides=settings.overrides())
        except (HydraException, OmegaConfBaseException) as e:
            raise DemoError(f"the settings do not compose into a config for '{pair.label}': {e}") from e
        finally:
            GlobalHydra.instance().clear()
        if settings.labels is not None:
            OmegaConf.update(cfg, "labels", list(settings.labels), merge=False)
        if settings.prompt is not None:
            OmegaConf.update(cfg, pair.prompt_key, [settings.prompt], force_add=True)
        if self.num_threads:
            cfg.num_threads = int(self.num_threads)
        if not settings.random_weights:
            self._set_weights(cfg, pair, dict(settings.weights))
        return cfg

    @staticmethod
    def _set_weights(cfg: DictConfig, pair: ModelPair, typed: dict[str, str]) -> None:
        """Put typed weights into their config keys; make repository-relative paths absolute (the page
        may be served from any folder); name the slot of a local file that is not there."""
        for slot, key in pair.weights.items():
            value = typed.get(slot)
            if value is None:
                value = OmegaConf.select(cfg, key)
            if value is None:
                continue              # the loader's own default (an official release, the config's hub id)
            value = str(value)
            path = Path(value).expanduser()
            if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
                path = REPO_ROOT / path
            if path.exists():
                value = str(path.resolve())
            elif _is_local_path(value):
                raise DemoError(f"Weights missing: the {SLOT_LABELS[slot].split(' (')[0]} {value!r} do not exist. "
                                f"Give a path or hub id in '{SLOT_LABELS[slot]}' (pair '{pair.label}').")
            OmegaConf.update(cfg, key, value, force_add=True)

    # -- runs ----------------------------------------------------------------------------
    def run(self, settings: Settings) -> RunResult:
        """One sampling run through runs.run.run_from_config; errors a person can fix become DemoError."""
        with self._lock:
            start = time.perf_counter()
            cfg = self.compose(settings)
            with tempfile.TemporaryDirectory(prefix="demo-run-", dir=self.work_dir) as out_dir:
                try:
                    metrics = run_from_config(cfg, out_dir)
                except FileNotFoundError as e:       # checkpoints / VAE not on disk nor obtainable offline
                    raise DemoError(f"Weights missing for '{settings.model_pair.label}': {e}") from e
                except (ValueError, TypeError, ReportedError) as e:  # the core's checks; NaN samples, a full disk
                    raise DemoError(str(e)) from e
                with np.load(Path(out_dir) / "samples.npz") as npz:
                    images, labels = npz["arr_0"], npz["arr_1"]
            return RunResult(images, labels, metrics, time.perf_counter() - start)

    def generate(self, settings: Settings, progress: Progress | None = None) -> GenerateResult:
        """The run, and the large model alone with the same settings (once per setting, then cached)."""
        progress = progress or (lambda share, what: None)
        reference = settings.large_alone()
        progress(0.0, "sampling")
        result = self.run(settings)
        if settings.is_large_alone:
            self._large_alone[reference] = result
        elif reference not in self._large_alone:
            progress(0.5, "timing the large model alone (once per setting)")
            self._large_alone[reference] = self.run(reference)
        large_name = list(result.metrics["steps_per_model"])[-1]   # run order: the small model(s), then the large
        return GenerateResult(result, self._large_alone[reference], large_name)

    def sweep(self, settings: Settings, fractions, num_samples: int,
              progress: Progress | None = None) -> list[SweepPoint]:
        """One run per small-model fraction with the other settings fixed; digits quality where the pair has it."""
        progress = progress or (lambda share, what: None)
        if not fractions:
            raise SettingsError("sweep fractions are empty")
        pair = settings.model_pair
        points = []
        for k, fraction in enumerate(fractions):
            progress(k / len(fractions), f"fraction {fraction:g} ({k + 1}/{len(fractions)})")
            result = self.run(replace(settings, fraction=float(fraction), num_samples=int(num_samples)))
            points.append(SweepPoint(
                fraction=float(fraction),
                steps_per_model=dict(result.metrics["steps_per_model"]),
                sampling_seconds=result.sampling_seconds,
                macs_per_image=result.macs_per_image,
                accuracy=self._quality(pair, result),
            ))
        progress(1.0, "done")
        return points

    @staticmethod
    def _quality(pair: ModelPair, result: RunResult) -> float | None:
        if pair.quality == "digits":
            from evaluation.digits import evaluate_digits

            return float(evaluate_digits(result.images, result.labels)["accuracy"])
        return None
