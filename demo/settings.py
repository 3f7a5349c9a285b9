"""What the page's controls say, checked and turned into Hydra overrides.

Every value typed in the page goes through `parse_settings` first, so a bad one (a fraction
of 1.5, steps of 0, a label "x") is reported with its name and the allowed range before
any config is composed or any model is built.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from diffusion.precision import PRECISIONS

from .pairs import ModelPair, get_pair

SAMPLERS = ("ddim", "ddpm", "dpmpp_2m", "euler")
PIPELINE_SAMPLERS = ("pipeline",)
MAX_SAMPLES = 256     # one click; the page is for looking at images, not for evaluation runs
MAX_SWEEP_POINTS = 11
TGATE_FIELDS = ("gate_step", "sp_interval", "fi_interval", "warm_up")


class SettingsError(ValueError):
    """A value typed in the page is not allowed; the message names it and what is allowed."""


@dataclass(frozen=True)
class Settings:
    pair: str                      # ModelPair.key
    fraction: float                # share of the steps on the small model
    sampler: str
    steps: int
    cfg_scale: float
    seed: int
    num_samples: int
    labels: tuple[int, ...] | None = None   # class pairs
    prompt: str | None = None               # text pairs
    tgate: bool = False
    gate_step: int = 30
    sp_interval: int = 3
    fi_interval: int = 1
    warm_up: int = 2
    weights: tuple[tuple[str, str], ...] = ()  # (slot, path or hub id) typed in the page; blank slots left out
    random_weights: bool = False               # pretrained=false: no weights read (timing only)
    precision: str = "auto"                    # the networks' number type (configs/sample.yaml's precision)

    @property
    def model_pair(self) -> ModelPair:
        return get_pair(self.pair)

    @property
    def is_large_alone(self) -> bool:
        return self.fraction == 0.0 and not self.tgate

    def large_alone(self) -> "Settings":
        """The same run with the large model for every step and no gating: the speed-up's reference
        (T-GATE's fields at their defaults, so that settings differing only in them share it)."""
        gate_defaults = {name: Settings.__dataclass_fields__[name].default for name in TGATE_FIELDS}
        return replace(self, fraction=0.0, tgate=False, **gate_defaults)

    def overrides(self) -> list[str]:
        """Hydra overrides of configs/sample.yaml (numbers and group choices only: free text,
        such as weights, labels and prompts, is set on the composed config, see backend.compose)."""
        pair = self.model_pair
        out = list(pair.overrides)
        if self.tgate:
            out += [f"accel={pair.tgate_accel}", f"accel.tgate.gate_step={self.gate_step}",
                    f"accel.tgate.sp_interval={self.sp_interval}", f"accel.tgate.fi_interval={self.fi_interval}",
                    f"accel.tgate.warm_up={self.warm_up}", f"accel.tgate.branch={pair.tgate_branch}"]
        out += [f"accel.tstitch.ratio={self.fraction!r}", f"sampler={self.sampler}",
                f"sampler.steps={self.steps}", f"sampler.cfg_scale={self.cfg_scale!r}",
                f"seed={self.seed}", f"num_samples={self.num_samples}",
                f"batch_size={min(self.num_samples, pair.max_batch)}",
                f"pretrained={str(not self.random_weights).lower()}", f"precision={self.precision}", "progress=true"]
        return out


def check_number(name: str, value, *, whole: bool, low: float, high: float | None = None) -> float | int:
    """A finite number in [low, high] (whole if asked); blank and text are errors that name the field."""
    allowed = (f"{'a whole number' if whole else 'a number'} >= {low:g}"
               + (f" and <= {high:g}" if high is not None else ""))
    if value is None or (isinstance(value, str) and not value.strip()):
        raise SettingsError(f"{name} is empty: give {allowed}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name}={value!r} is not a number: give {allowed}") from None
    if not math.isfinite(x) or x < low or (high is not None and x > high) or (whole and x != int(x)):
        raise SettingsError(f"{name}={value!r}: must be {allowed}")
    return int(x) if whole else x


def parse_labels(text: str | None, num_classes: int) -> tuple[int, ...]:
    """'0, 1 2,3' -> (0, 1, 2, 3); every label a class index in [0, num_classes)."""
    tokens = [t for t in re.split(r"[,\s]+", text or "") if t]
    if not tokens:
        raise SettingsError(f"class labels are empty: give class indices 0..{num_classes - 1}, separated by commas")
    labels = []
    for token in tokens:
        if not re.fullmatch(r"\d+", token) or int(token) >= num_classes:
            raise SettingsError(f"class label {token!r} is not allowed: labels are whole numbers "
                                f"0..{num_classes - 1}, separated by commas")
        labels.append(int(token))
    return tuple(labels)


def parse_fractions(text: str | None) -> tuple[float, ...]:
    """'0, 0.5, 1' -> (0.0, 0.5, 1.0): the sweep's small-model fractions, each in [0, 1]."""
    tokens = [t for t in re.split(r"[,\s]+", text or "") if t]
    if not tokens:
        raise SettingsError("sweep fractions are empty: give numbers in [0, 1] separated by commas, e.g. 0, 0.5, 1")
    fractions = sorted({check_number("sweep fraction", t, whole=False, low=0.0, high=1.0) for t in tokens})
    if len(fractions) > MAX_SWEEP_POINTS:
        raise SettingsError(f"{len(fractions)} sweep fractions: at most {MAX_SWEEP_POINTS}")
    return tuple(fractions)


def parse_settings(pair: str, *, fraction, sampler, steps, cfg_scale, seed, num_samples, labels=None,
                   prompt=None, tgate=False, gate_step=30, sp_interval=3, fi_interval=1, warm_up=2,
                   weights: dict[str, str] | None = None, random_weights=False, precision="auto") -> Settings:
    """The page's raw values (numbers may arrive as floats, text or None) -> checked Settings."""
    model_pair = get_pair(pair)
    text_pair = model_pair.conditioning == "text"
    allowed = PIPELINE_SAMPLERS if text_pair else SAMPLERS  # text pairs run their pipeline's own scheduler
    if sampler not in allowed:
        raise SettingsError(f"sampler={sampler!r}: allowed for this pair are {', '.join(allowed)}")
    if precision not in PRECISIONS:
        raise SettingsError(f"precision={precision!r}: allowed are {', '.join(PRECISIONS)}")
    if text_pair and not (prompt or "").strip():
        raise SettingsError("the prompt is empty: this pair is text-conditional, type a prompt")
    typed = tuple((slot, str(v).strip()) for slot, v in (weights or {}).items()
                  if slot in model_pair.weights and v is not None and str(v).strip())
    for slot, value in typed:
        if "${" in value:   # would be resolved by OmegaConf (e.g. ${oc.env:...}) instead of read as a path
            raise SettingsError(f"{slot} weights {value!r}: '${{' is not allowed in a path or hub id")
    return Settings(
        pair=model_pair.key,
        fraction=check_number("small-model fraction", fraction, whole=False, low=0.0, high=1.0),
        sampler=sampler,
        steps=check_number("steps", steps, whole=True, low=1, high=1000),
        cfg_scale=check_number("guidance scale", cfg_scale, whole=False, low=0.0),
        seed=check_number("seed", seed, whole=True, low=0),
        num_samples=check_number("number of images", num_samples, whole=True, low=1, high=MAX_SAMPLES),
        labels=None if text_pair else parse_labels(labels, model_pair.num_classes),
        # literal text, not an OmegaConf interpolation
        prompt=prompt.strip().replace("${", "\\${") if text_pair else None,
        tgate=bool(tgate),
        gate_step=check_number("T-GATE gate step", gate_step, whole=True, low=1),
        sp_interval=check_number("T-GATE sp_interval", sp_interval, whole=True, low=1),
        fi_interval=check_number("T-GATE fi_interval", fi_interval, whole=True, low=1),
        warm_up=check_number("T-GATE warm_up", warm_up, whole=True, low=0),
        weights=typed,
        random_weights=bool(random_weights),
        precision=precision,
    )


def default_settings(pair: str, **changes) -> Settings:
    """A pair's page defaults (what the page shows when the pair is chosen), with `changes`."""
    p = get_pair(pair)
    values = dict(fraction=p.fraction, sampler=p.sampler, steps=p.steps, cfg_scale=p.cfg_scale, seed=0,
                  num_samples=p.num_samples, labels=p.labels, prompt=p.prompt, tgate=False, gate_step=p.gate_step,
                  sp_interval=p.sp_interval, fi_interval=p.fi_interval, warm_up=p.warm_up)
    values.update(changes)
    return parse_settings(p.key, **values)
