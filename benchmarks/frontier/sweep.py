"""The speed-quality sweep (configs/frontier.yaml, scripts/frontier.py): sample, measure, time, draw.

For every point of the grid (points.py):

1. quality: a full sampling run (`runs.run.run_from_config`) of `num_samples` samples into
   `<out>/points/<key>/` (PNGs, samples.npz, metrics.json with the MACs per image counted with the
   run's hooks acting), then the digits measure (evaluation/digits.py: agreement, 5-NN, Fréchet
   distance and its floor) into quality.json. A rerun into the same folder keeps finished points
   (the run folders resume) and refuses a point whose settings changed;
2. time: every point's run built once and timed round-robin in this process (timing.py), on the
   first `timing.num_samples` of the same seeds and labels;
3. the table (frontier.md), every number (frontier.json) and the figure (frontier.png).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from diffusion.errors import UserError
from diffusion.outputs import atomic_write_bytes, save_json
from evaluation.digits import agreement_per_sample, evaluate_digits
from runs.run import build_hooks, check_config, model_configs, model_names, run_from_config
from runs.techniques import label

from .pareto import plot_frontier
from .points import TECHNIQUES, Gate, Point, grid_points
from .report import agreement_stats, mark_frontiers, markdown_table, pick_fastest, summary
from .timing import time_round_robin

log = logging.getLogger(__name__)

Compose = Callable[[list[str]], DictConfig]  # overrides of configs/sample.yaml -> the composed config


def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def own_point(run_cfg: DictConfig) -> Point:
    """The point a composed sampling config runs (its T-Stitch fraction and T-GATE setting), e.g. +exp=digits_fast's."""
    hooks = set(run_cfg.accel.get("hooks") or {})
    if hooks - {"tstitch", "tgate"}:
        raise UserError(f"base_point: the base config's accel={label(run_cfg.accel)} has hooks {sorted(hooks)}; "
                         "a sweep point is a T-Stitch fraction and/or a T-GATE setting (hooks tstitch, tgate)")
    fraction = 0.0
    if "tstitch" in hooks:
        if run_cfg.accel.tstitch.get("fractions") is not None:
            raise UserError("base_point: the base config stitches several models (accel.tstitch.fractions); "
                             "a sweep point has one small-model fraction")
        fraction = float(run_cfg.accel.tstitch.ratio)
    gate = None
    if "tgate" in hooks:
        tg = run_cfg.accel.tgate
        if tg.get("lcm"):
            raise UserError("base_point: the base config gates with lcm=true; sweep points run with guidance")
        gate = Gate(int(tg.gate_step), int(tg.sp_interval), int(tg.fi_interval), int(tg.warm_up), str(tg.branch))
    return Point(fraction, gate)


def sweep_points(cfg: DictConfig, compose: Compose) -> tuple[list[Point], Point | None]:
    """The grid's points and, with base_point, the base config's own one (added when the grid lacks it)."""
    points = grid_points(_plain(cfg.grids) or [], _plain(cfg.gate_defaults))
    own = own_point(compose([*cfg.base, *cfg.run_overrides])) if cfg.get("base_point") else None
    if own is not None and own not in points:
        points.append(own)
    return points, own


def _int(cfg: DictConfig, key: str, low: int) -> int:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"{key}={value!r}: must be an integer >= {low}")
    return value


def point_configs(cfg: DictConfig, points: list[Point], compose: Compose) -> dict[str, DictConfig]:
    """Each point's composed sampling config; everything that needs no model is checked here, before any work."""
    accel = _plain(cfg.accel)
    missing = [t for t in TECHNIQUES if t not in (accel or {})]
    if missing:
        raise UserError(f"accel: needs an accel config name for each of {TECHNIQUES}; missing {missing}")
    shared = [*cfg.base, f"num_samples={_int(cfg, 'num_samples', 2)}", f"batch_size={_int(cfg, 'batch_size', 1)}",
              f"seed={cfg.seed}", f"device={cfg.device}", f"num_threads={cfg.num_threads}", "progress=false"]
    cfgs = {}
    for point in points:
        run_cfg = compose([*shared, *point.overrides(accel), *cfg.run_overrides])
        check_config(run_cfg)
        build_hooks(run_cfg)  # bad gate or fraction settings fail here
        cfgs[point.key] = run_cfg
    return cfgs


def measure_point(folder: Path) -> dict:
    """The digits measure of a run folder's samples.npz, with the per-sample agreement (for paired errors)."""
    with np.load(folder / "samples.npz") as npz:
        images, labels = npz["arr_0"], npz["arr_1"]
    quality = evaluate_digits(images, labels)
    quality["correct"] = agreement_per_sample(images, labels).astype(int).tolist()
    quality["labels"] = labels.astype(int).tolist()
    save_json(quality, folder / "quality.json")
    return quality


def sample_and_measure(points: list[Point], cfgs: dict[str, DictConfig], out_dir: Path,
                       own: Point | None) -> list[dict]:
    """One row per point: its sampling run (resumed when already in out_dir), MACs and quality, the agreement
    paired with the first point's (the large model alone) sample by sample."""
    rows = []
    for k, point in enumerate(points):
        folder = out_dir / "points" / point.key
        log.info("[%d/%d] %s: %d samples in %s", k + 1, len(points), point.label, cfgs[point.key].num_samples, folder)
        metrics = run_from_config(cfgs[point.key], folder)
        models = model_names(model_configs(cfgs[point.key]))  # run order (metrics.json sorts its keys)
        rows.append({"key": point.key, "label": point.label, "short_label": point.short_label,
                     "technique": point.technique, "base_point": point == own, "fraction": point.fraction,
                     "gate": None if point.gate is None else vars(point.gate),
                     "models": models, "steps": [metrics["steps_per_model"][m] for m in models],
                     "macs": metrics["macs_per_image"],
                     "quality_run_seconds": metrics["sampling_seconds"], **measure_point(folder)})
    baseline = rows[0]
    for row in rows:
        if row["labels"] != baseline["labels"]:
            raise RuntimeError(f"{row['key']}: its samples have other labels than the baseline's (not paired)")
        row.update(agreement_stats(row["correct"], baseline["correct"]))
        row["macs_speedup"] = baseline["macs"] / row["macs"]
    return rows


def _title(cfgs: dict[str, DictConfig], rows: list[dict], timing: DictConfig, repeats: int) -> str:
    first = cfgs[rows[0]["key"]]
    stitched = next((cfgs[r["key"]] for r in rows if r["technique"] in ("tstitch", "combined")), first)
    models = " -> ".join(str(m.name) for m in [*(stitched.accel.get("models") or {}).values(), stitched.model])
    return (f"{models}, {first.sampler.name} x{first.sampler.steps}, cfg {first.sampler.cfg_scale}\nquality: "
            f"{rows[0]['n']} samples, the same seeds and labels at every point"
            + (f"; time: {timing.num_samples} samples, median of {repeats} (round-robin)" if repeats else ""))


def run_frontier(cfg: DictConfig, compose: Compose, out_dir: str | Path, progress: bool = True) -> dict:
    """Run the sweep of `cfg` (configs/frontier.yaml) into out_dir.

    Returns {"rows", "pick", "table", "summary", "figure", "title", "json"}."""
    out_dir = Path(out_dir)
    tolerance = cfg.tolerance
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        raise UserError(f"tolerance={tolerance!r}: must be a number in [0, 1) (agreement is a share)")
    timing = cfg.timing
    repeats = _int(cfg, "timing.repeats", 0)
    if repeats:
        _int(cfg, "timing.num_samples", 1), _int(cfg, "timing.batch_size", 1), _int(cfg, "timing.warmup", 0)
    points, own = sweep_points(cfg, compose)
    cfgs = point_configs(cfg, points, compose)  # every check before any work
    log.info("%d points: %s", len(points), ", ".join(p.label for p in points))

    rows = sample_and_measure(points, cfgs, out_dir, own)
    if repeats:
        times = time_round_robin(cfgs, num_samples=int(timing.num_samples), batch_size=int(timing.batch_size),
                                 repeats=repeats, warmup=int(timing.warmup), num_threads=cfg.num_threads,
                                 progress=progress)
        for row in rows:
            row["seconds"], row["seconds_runs"] = times[row["key"]]["seconds"], times[row["key"]]["runs"]
            row["speedup"] = times[rows[0]["key"]]["seconds"] / row["seconds"]

    mark_frontiers(rows)
    cost = "seconds" if repeats else "macs"
    pick = pick_fastest(rows, float(tolerance), cost)
    base_name = " ".join(cfg.base)
    table = markdown_table(rows, pick, base_name)
    text = summary(rows, pick, float(tolerance), cost, base_name)
    title = _title(cfgs, rows, timing, repeats)
    figure = Path(cfg.figure) if cfg.get("figure") else out_dir / "frontier.png"
    plot_frontier(rows, figure, title=title, pick=pick, tolerance=float(tolerance))

    record = {"settings": _plain(cfg), "title": title, "summary": text, "pick": pick and pick["key"], "cost": cost,
              "rows": [{k: v for k, v in r.items() if k not in ("correct", "labels")} for r in rows]}
    save_json(record, out_dir / "frontier.json")
    markdown = f"{title.replace(chr(10), '; ')}\n\n{text}\n\n{table}\n"
    for path in [out_dir / "frontier.md", *([Path(cfg.table)] if cfg.get("table") else [])]:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, markdown.encode())
    log.info("%s\n%s", text, table)
    return {"rows": rows, "pick": pick, "table": table, "summary": text, "figure": figure, "title": title,
            "json": out_dir / "frontier.json"}


def replot(out_dir: str | Path, figure: str | Path | None = None) -> Path:
    """Draw the figure again from an earlier sweep's frontier.json (no sampling, no timing)."""
    import json

    record = json.loads((Path(out_dir) / "frontier.json").read_text())
    rows = record["rows"]
    pick = next((r for r in rows if r["key"] == record["pick"]), None)
    return plot_frontier(rows, Path(figure) if figure else Path(out_dir) / "frontier.png", title=record["title"],
                         pick=pick, tolerance=float(record["settings"]["tolerance"]))
