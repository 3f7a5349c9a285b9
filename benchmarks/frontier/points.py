"""The points of a speed-quality sweep: a sampler and step count, a T-Stitch fraction, a T-GATE setting.

A point is turned into overrides of configs/sample.yaml: the sampler and its steps, the accel config
that holds exactly the techniques it uses (the large model alone runs `accel=none`, not a gate that
never fires), and the fraction and gate settings. Every point shares the base overrides, seeds and
labels (paired).

In the sweep's grids, settings that are step indices are fractions of the point's steps, so one grid
serves every step count: T-GATE's `gate_step` and `warm_up` (0.8 = step 40 of 50, step 20 of 25;
rounded half up). Its `sp_interval` / `fi_interval` are periods (every k-th step), not indices, and
stay counts. A resolved `Gate` holds tgate's own integer step indices.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from diffusion.errors import UserError
from runs.techniques import CACHES
from tgate import TGateConfig

# the kinds of point; the keys of the accel-name mapping (configs/frontier.yaml `accel:`) are ACCEL_KINDS
TECHNIQUES = ("baseline", "steps", "tstitch", "tgate", "combined", "caches")
ACCEL_KINDS = ("baseline", "tstitch", "tgate", "combined")  # "steps" runs the baseline's accel config
TECHNIQUE_NAMES = {"baseline": "large alone", "steps": "large alone, fewer steps / sampler", "tstitch": "T-Stitch",
                   "tgate": "T-GATE", "combined": "T-Stitch + T-GATE", "caches": "diffusers cache (+ T-Stitch)"}
GATE_KEYS = ("gate_step", "sp_interval", "fi_interval", "warm_up", "branch")
# the caches' settings that are step indices or counts of steps: in a sweep's `cache_settings` they are FRACTIONS
# of each point's steps, like T-GATE's gate_step (0.25 of 20 -> 5); left out, configs/accel/<cache>.yaml's count
# holds at every step count. (FasterCache's and PAB's ranges are timesteps 0..999, the same at any step count.)
CACHE_STEP_KEYS = {"taylorseer": ("disable_cache_before_step", "disable_cache_after_step"),
                   "sea_cache": ("retention_steps", "cache_end_steps")}
GRID_KEYS = ("name", "samplers", "steps", "fractions", "gates", "caches")
SAMPLERS = ("ddim", "dpmpp_2m", "euler", "ddpm", "pipeline")  # configs/sampler/ (pipeline: a diffusers pipeline's loop)
SAMPLER_SHORT = {"ddim": "DDIM", "dpmpp_2m": "DPM++2M", "euler": "Euler", "ddpm": "DDPM", "pipeline": "pipeline"}


@dataclass(frozen=True)
class Gate:
    """One T-GATE setting (step indices over the whole trajectory; tgate's semantics)."""

    gate_step: int
    sp_interval: int = 1
    fi_interval: int = 1
    warm_up: int = 2
    branch: str = "cond"

    def __post_init__(self):
        TGateConfig(self.gate_step, self.sp_interval, self.fi_interval, self.warm_up, False, self.branch)  # checks

    @property
    def label(self) -> str:
        text = f"g{self.gate_step} sp{self.sp_interval} fi{self.fi_interval} wu{self.warm_up}"
        return text if self.branch == "cond" else f"{text} {self.branch}"

    def overrides(self) -> list[str]:
        return [f"accel.tgate.{k}={getattr(self, k)}" for k in GATE_KEYS]


@dataclass(frozen=True)
class Point:
    fraction: float  # the small model's share of the steps (0: the large model alone)
    gate: Gate | None = None  # None: no T-GATE
    sampler: str = "ddim"  # configs/sampler/<sampler>.yaml
    steps: int = 50  # sampler.steps
    base: bool = False  # the sampler and steps of the base config (its large model alone is THE baseline)
    cache: str | None = None  # one of runs.techniques.CACHES (accel=<cache>, or [tstitch,<cache>]); None: no cache

    def __post_init__(self):
        if self.cache is not None and (self.cache not in CACHES or self.gate is not None):
            raise UserError(f"cache={self.cache!r}: allowed: {list(CACHES)} (without a T-GATE setting)")
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) \
                or not 0.0 <= self.fraction <= 1.0:
            raise UserError(f"fraction={self.fraction!r}: must be a number in [0, 1]")
        if self.sampler not in SAMPLERS:
            raise UserError(f"samplers: {self.sampler!r} is not a sampler of the sweep; allowed: {list(SAMPLERS)}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise UserError(f"steps: {self.steps!r} must be an integer >= 1")
        object.__setattr__(self, "fraction", float(self.fraction))

    @property
    def technique(self) -> str:
        if self.cache is not None:  # alone or stitched: one kind, so `pick.techniques: [caches]` covers both
            return "caches"
        stitched = self.fraction > 0
        if self.gate is None:
            return "tstitch" if stitched else ("baseline" if self.base else "steps")
        return "combined" if stitched else "tgate"

    @property
    def accel_kind(self) -> str:
        return "baseline" if self.technique in ("steps", "caches") else self.technique

    @property
    def key(self) -> str:
        """A folder name: ddim50-r0.00, dpmpp_2m15-r0.40, ddim50-r0.40-g40-sp1-fi1-wu2-cond."""
        key = f"{self.sampler}{self.steps}-r{self.fraction:.2f}"
        if self.gate is not None:
            g = self.gate
            key += f"-g{g.gate_step}-sp{g.sp_interval}-fi{g.fi_interval}-wu{g.warm_up}-{g.branch}"
        return key + (f"-{self.cache}" if self.cache else "")

    @property
    def run_label(self) -> str:
        """'DDIM 50', 'DPM++2M 15'."""
        return f"{SAMPLER_SHORT[self.sampler]} {self.steps}"

    @property
    def label(self) -> str:
        """For tables: 'large alone, DDIM 50', 'S 0.4, DDIM 25', 'S 0.4 + g40 sp1 fi1 wu2, DDIM 50'."""
        parts = ([f"S {self.fraction:g}"] if self.fraction > 0 else []) + ([self.gate.label] if self.gate else []) \
            + ([self.cache] if self.cache else [])
        return f"{' + '.join(parts) or 'large alone'}, {self.run_label}"

    @property
    def short_label(self) -> str:
        """For figure annotations: 'L', 'L 25', 'S0.4', 'S0.4 25', 'S0.4 g40 sp2' (the base sampler and steps and
        intervals of 1 left out; another sampler by its short name)."""
        parts = [f"S{self.fraction:g}"] if self.fraction > 0 else []
        if self.gate is not None:
            g = self.gate
            parts.append(f"g{g.gate_step}" + (f" sp{g.sp_interval}" if g.sp_interval > 1 else "")
                         + (f" fi{g.fi_interval}" if g.fi_interval > 1 else "")
                         + (f" {g.branch}" if g.branch != "cond" else ""))
        if self.cache:
            parts.append(self.cache)
        if not self.base:
            parts.append(f"{'' if self.sampler == 'ddim' else SAMPLER_SHORT[self.sampler]}{self.steps}")
        return " ".join(parts) if self.fraction > 0 or self.gate or self.cache else " ".join(["L", *parts])

    def overrides(self, accel_names: Mapping[str, str], cache_settings: Mapping | None = None) -> list[str]:
        """Overrides of configs/sample.yaml (after the base ones) that make this point's run; a cache point runs
        configs/accel/<cache>.yaml (with T-Stitch: [tstitch,<cache>]) and its `cache_settings[<cache>]`
        (e.g. mag_cache's calibration) as accel.<cache>.<key>=<value>."""
        if self.cache is not None:
            accel = f"[tstitch,{self.cache}]" if self.fraction > 0 else self.cache
            settings = dict((cache_settings or {}).get(self.cache) or {})
            for key in CACHE_STEP_KEYS.get(self.cache, ()):
                if settings.get(key) is not None:
                    settings[key] = step_index(settings[key], self.steps, key, f"cache_settings.{self.cache}")
            extra = [f"accel.{self.cache}.{k}={'null' if v is None else v}" for k, v in settings.items()]
        else:
            accel, extra = accel_names[self.accel_kind], []
        out = [f"sampler={self.sampler}", f"sampler.steps={self.steps}", f"accel={accel}", *extra]
        if self.fraction > 0:
            out.append(f"accel.tstitch.ratio={self.fraction}")
        if self.gate is not None:
            out += self.gate.overrides()
        return out


def step_index(fraction, steps: int, name: str, owner: str = "T-GATE's") -> int:
    """A fraction of the steps as a step index (rounded half up): 0.8 of 50 -> 40, of 25 -> 20."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        where = f"in a sweep's grid {owner} {name}" if owner == "T-GATE's" else f"in a sweep {owner}.{name}"
        raise UserError(f"{name}={fraction!r}: {where} is a fraction of the steps, a number in [0, 1] "
                        "(0.8 = step 40 of 50)")
    return int(math.floor(fraction * steps + 0.5))


def make_gate(spec, defaults: Mapping | None = None, steps: int = 50) -> Gate | None:
    """A gate from a config entry at `steps` steps: null (no T-GATE) or a mapping of GATE_KEYS (missing keys
    from defaults); gate_step and warm_up are fractions of the steps."""
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise UserError(f"T-GATE setting {spec!r}: must be null or a mapping with keys {GATE_KEYS}")
    unknown = sorted(set(spec) - set(GATE_KEYS))
    if unknown:
        raise UserError(f"T-GATE setting {dict(spec)}: unknown keys {unknown}; allowed: {GATE_KEYS}")
    merged = {**(defaults or {}), **spec}
    if "gate_step" not in merged:
        raise UserError(f"T-GATE setting {dict(spec)}: needs gate_step")
    for name in ("gate_step", "warm_up"):
        if name in merged:
            merged[name] = step_index(merged[name], steps, name)
    return Gate(**{k: merged[k] for k in GATE_KEYS if k in merged})


def _list(grid: Mapping, key: str, default: list, name) -> list:
    value = grid.get(key, default)
    value = default if value is None else value
    if isinstance(value, (str, int, float)):
        value = [value]
    value = list(value)
    if not value:
        raise UserError(f"grid {name!r}: {key} must not be empty (use [null] for no T-GATE)")
    return value


def grid_points(grids: Sequence[Mapping], gate_defaults: Mapping | None = None, sampler: str = "ddim",
                steps: int = 50) -> list[Point]:
    """The union of the grids (each {name, samplers, steps, fractions, gates}: every combination), the large
    model alone at the base `sampler` and `steps` first, then in grid order, each point once. A grid leaves
    out samplers / steps to run the base ones."""
    if isinstance(grids, Mapping) or not isinstance(grids, Sequence):
        raise UserError(f"grids: must be a list of {{name, samplers, steps, fractions, gates}}, got {grids!r}")
    baseline = Point(0.0, None, sampler, steps, base=True)
    points = [baseline]
    for k, grid in enumerate(grids):
        name = grid.get("name", k) if isinstance(grid, Mapping) else k
        if not isinstance(grid, Mapping):
            raise UserError(f"grid {name!r}: must be a mapping {{name, samplers, steps, fractions, gates}}, "
                            f"got {grid!r}")
        unknown = sorted(set(grid) - set(GRID_KEYS))
        if unknown:
            raise UserError(f"grid {name!r}: unknown keys {unknown}; allowed: {list(GRID_KEYS)}")
        fractions, gates = _listed(grid, k, "fractions", [0.0]), _listed(grid, k, "gates", [None])
        caches = _caches(grid, k)
        if not fractions or not gates:
            raise UserError(f"grid {name!r}: fractions and gates must not be empty (use [null] for no T-GATE)")
        for sampler_name in _list(grid, "samplers", [sampler], name):
            for n in _list(grid, "steps", [steps], name):
                for j, gate_spec in enumerate(gates):
                    try:
                        gate = make_gate(gate_spec, gate_defaults, n)
                    except UserError as err:  # `gate_step=-4: ...` -> `grids[0].gates[0].gate_step=-4: ...`
                        raise _at_key(err, f"grids[{k}].gates[{j}]") from None
                    for i, fraction in enumerate(fractions):
                        try:
                            point = Point(fraction, gate, str(sampler_name), n,
                                          base=(sampler_name, n) == (sampler, steps))
                        except UserError as err:
                            raise _at_key(err, f"grids[{k}].fractions[{i}]", whole=True) from None
                        if point not in points:
                            points.append(point)
                # each cache alone (fraction 0), then with each T-Stitch fraction of the grid, no T-GATE
                for cache in caches:
                    for fraction in sorted({0.0, *(float(f) for f in fractions)}):
                        point = Point(fraction, None, str(sampler_name), n, base=(sampler_name, n) == (sampler, steps),
                                      cache=cache)
                        if point not in points:
                            points.append(point)
    return points


def _caches(grid: Mapping, k: int) -> list[str]:
    """grids[k].caches: names of runs.techniques.CACHES, checked before any sampling."""
    value = grid.get("caches") or []
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise UserError(f"grids[{k}].caches={value!r}: must be a list of cache names; allowed: {list(CACHES)}")
    for i, name in enumerate(value):
        if name not in CACHES:
            raise UserError(f"grids[{k}].caches[{i}]={name!r}: not a cache; allowed: {list(CACHES)}")
    return [str(name) for name in value]


_ARGUMENT = re.compile(r"^(?:[A-Za-z][\w-]* )?([A-Za-z_]\w*)=")


def _listed(grid: Mapping, k: int, key: str, default: list) -> list:
    """grids[k].<key> as a list (a string or a number is a mistake, not a list of its characters)."""
    value = grid.get(key, default)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        what = "numbers in [0, 1]" if key == "fractions" else "null (no T-GATE) or T-GATE settings"
        raise UserError(f"grids[{k}].{key}={value}: must be a list of {what}, e.g. {key}: [{default[0]}]")
    return list(value)


def _at_key(err: UserError, prefix: str, whole: bool = False) -> UserError:
    """err's `name=value: ...` message as `<prefix>.name=value: ...` (whole: `<prefix>=value: ...`)."""
    message = str(err)
    match = _ARGUMENT.match(message)
    if not match:
        return UserError(f"{prefix}: {message}")
    key = prefix if whole else f"{prefix}.{match.group(1)}"
    return UserError(f"{key}={message[match.end():]}")
