"""The points of a speed-quality sweep: a T-Stitch fraction and a T-GATE setting (or none).

A point is turned into overrides of configs/sample.yaml: the accel config that holds exactly the
techniques it uses (the large model alone runs `accel=none`, not a gate that never fires), and the
fraction and gate settings. Every point shares the base overrides, seeds and labels (paired).
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from diffusion.errors import UserError
from tgate import TGateConfig

TECHNIQUES = ("baseline", "tstitch", "tgate", "combined")  # the keys of the accel-name mapping
TECHNIQUE_NAMES = {"baseline": "large alone", "tstitch": "T-Stitch", "tgate": "T-GATE",
                   "combined": "T-Stitch + T-GATE"}
GATE_KEYS = ("gate_step", "sp_interval", "fi_interval", "warm_up", "branch")


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

    def __post_init__(self):
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) \
                or not 0.0 <= self.fraction <= 1.0:
            raise UserError(f"fraction={self.fraction!r}: must be a number in [0, 1]")
        object.__setattr__(self, "fraction", float(self.fraction))

    @property
    def technique(self) -> str:
        stitched = self.fraction > 0
        if self.gate is None:
            return "tstitch" if stitched else "baseline"
        return "combined" if stitched else "tgate"

    @property
    def key(self) -> str:
        """A folder name: r0.40, r0.40-g40-sp1-fi1-wu2-cond."""
        key = f"r{self.fraction:.2f}"
        if self.gate is not None:
            g = self.gate
            key += f"-g{g.gate_step}-sp{g.sp_interval}-fi{g.fi_interval}-wu{g.warm_up}-{g.branch}"
        return key

    @property
    def label(self) -> str:
        """For tables and figures: 'large alone', 'S 0.4', 'g40 sp1 fi1 wu2', 'S 0.4 + g40 ...'."""
        parts = ([f"S {self.fraction:g}"] if self.fraction > 0 else []) + ([self.gate.label] if self.gate else [])
        return " + ".join(parts) or "large alone"

    @property
    def short_label(self) -> str:
        """For figure annotations: 'S0.4', 'g40', 'S0.4 g40 sp2', 'g25 fi2 uncond' (intervals of 1 left out)."""
        parts = [f"S{self.fraction:g}"] if self.fraction > 0 else []
        if self.gate is not None:
            g = self.gate
            parts.append(f"g{g.gate_step}" + (f" sp{g.sp_interval}" if g.sp_interval > 1 else "")
                         + (f" fi{g.fi_interval}" if g.fi_interval > 1 else "")
                         + (f" {g.branch}" if g.branch != "cond" else ""))
        return " ".join(parts) or "L"

    def overrides(self, accel_names: Mapping[str, str]) -> list[str]:
        """Overrides of configs/sample.yaml (after the base ones) that make this point's run."""
        out = [f"accel={accel_names[self.technique]}"]
        if self.fraction > 0:
            out.append(f"accel.tstitch.ratio={self.fraction}")
        if self.gate is not None:
            out += self.gate.overrides()
        return out


BASELINE = Point(0.0)


def make_gate(spec, defaults: Mapping | None = None) -> Gate | None:
    """A gate from a config entry: null (no T-GATE) or a mapping of GATE_KEYS (missing keys from defaults)."""
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
    return Gate(**{k: merged[k] for k in GATE_KEYS if k in merged})


def grid_points(grids: Sequence[Mapping], gate_defaults: Mapping | None = None) -> list[Point]:
    """The union of the grids (each {name (optional), fractions, gates}: every fraction with every gate),
    the large model alone first, then in grid order, each point once."""
    if isinstance(grids, Mapping) or not isinstance(grids, Sequence):
        raise UserError(f"grids: must be a list of {{name, fractions, gates}}, got {grids!r}")
    points = [BASELINE]
    for k, grid in enumerate(grids):
        name = grid.get("name", k) if isinstance(grid, Mapping) else k
        if not isinstance(grid, Mapping):
            raise UserError(f"grid {name!r}: must be a mapping {{name, fractions, gates}}, got {grid!r}")
        unknown = sorted(set(grid) - {"name", "fractions", "gates"})
        if unknown:
            raise UserError(f"grid {name!r}: unknown keys {unknown}; allowed: ['name', 'fractions', 'gates']")
        fractions, gates = _listed(grid, k, "fractions", [0.0]), _listed(grid, k, "gates", [None])
        if not fractions or not gates:
            raise UserError(f"grid {name!r}: fractions and gates must not be empty (use [null] for no T-GATE)")
        for j, gate_spec in enumerate(gates):
            try:
                gate = make_gate(gate_spec, gate_defaults)
            except UserError as err:  # `tgate gate_step=-4: ...` -> `grids[0].gates[0].gate_step=-4: ...`
                raise _at_key(err, f"grids[{k}].gates[{j}]") from None
            for i, fraction in enumerate(fractions):
                try:
                    point = Point(fraction, gate)
                except UserError as err:
                    raise _at_key(err, f"grids[{k}].fractions[{i}]", whole=True) from None
                if point not in points:
                    points.append(point)
    return points


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
