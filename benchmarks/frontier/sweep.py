"""The speed-quality sweep (configs/frontier.yaml, scripts/frontier.py): choose on one seed set, report on another.

Two fixed, disjoint seed sets (`seeds.selection`, `seeds.report`; sample k of a set draws seed + k):

1. selection: every point of the grids (points.py) is sampled on the selection seeds into
   `<out>/selection/points/<key>/` (a full sampling run, `runs.run.run_from_config`: PNGs, samples.npz,
   metrics.json with the MACs the run spent), judged (judges.py), timed round-robin (timing.py), and
   the pick rule is applied there alone: the fastest point within `pick.tolerance` of the large model
   alone by every judge of `pick.judges` (both classifier families for the digits);
2. report: the large model alone, the large model alone at the pick's sampler and steps, the pick,
   the base config's own point and every point of `report_grids` are sampled again on the report seeds
   (`<out>/report/points/<key>/`), judged with paired standard errors against the large model alone of
   the report set, and timed again round-robin. Every number a reader is shown comes from here.

A rerun into the same folder keeps finished points (the run folders resume) and refuses a point whose
settings changed. frontier.json records both seed sets and, on every row, the set it was measured on.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from diffusion.errors import UserError
from diffusion.outputs import atomic_write_bytes, save_json
from evaluation.fidelity import fidelity_per_sample
from runs.run import build_hooks, check_config, model_configs, model_names, run_from_config
from runs.techniques import CACHES, label

from .judges import JUDGES, PAIRED, QUALITIES, check_pick_judges, paired_stats
from .pareto import plot_frontier, plot_steps_samplers
from .points import ACCEL_KINDS, TECHNIQUES, Gate, Point, grid_points
from .report import add_same_steps_speedups, compiled_table, mark_frontiers, markdown_table, pick_fastest, summary
from .timing import time_round_robin

log = logging.getLogger(__name__)

Compose = Callable[[list[str]], DictConfig]  # overrides of configs/sample.yaml -> the composed config
SETS = ("selection", "report")


def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def own_point(run_cfg: DictConfig) -> Point:
    """The point a composed sampling config runs (its sampler, steps, T-Stitch fraction and T-GATE setting),
    e.g. +exp=digits_fast's."""
    hooks = set(run_cfg.accel.get("hooks") or {})
    caches = sorted(hooks & set(CACHES))
    if hooks - {"tstitch", "tgate", *CACHES} or len(caches) > 1 or (caches and "tgate" in hooks):
        raise UserError(f"base_point: the base config's accel={label(run_cfg.accel)} has hooks {sorted(hooks)}; "
                         "a sweep point is a T-Stitch fraction with a T-GATE setting or one cache of "
                         f"{list(CACHES)} (or neither)")
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
    return Point(fraction, gate, str(run_cfg.sampler.name), int(run_cfg.sampler.steps),
                 cache=caches[0] if caches else None)


def _base_run(cfg: DictConfig, compose: Compose) -> tuple[str, int]:
    """The base config's sampler and steps (with run_overrides): the large model alone there is THE baseline."""
    run = compose([*cfg.base, *cfg.run_overrides])
    return str(run.sampler.name), int(run.sampler.steps)


def _points(cfg: DictConfig, key: str, sampler: str, steps: int) -> list[Point]:
    return grid_points(_plain(cfg.get(key)) or [], _plain(cfg.gate_defaults), sampler, steps)


def sweep_points(cfg: DictConfig, compose: Compose) -> tuple[list[Point], Point | None]:
    """The grid's points (the large model alone first) and, with base_point, the base config's own one (added
    when the grid lacks it)."""
    sampler, steps = _base_run(cfg, compose)
    points = _points(cfg, "grids", sampler, steps)
    if cfg.pick.get("same_steps_speedup") is not None:  # the rule compares each point with these
        points += same_steps_points(points, (sampler, steps))
    own = None
    if cfg.get("base_point"):
        found = own_point(compose([*cfg.base, *cfg.run_overrides]))
        own = Point(found.fraction, found.gate, found.sampler, found.steps, base=(found.sampler, found.steps)
                    == (sampler, steps), cache=found.cache)
        if own not in points:
            points.append(own)
    return points, own


def same_steps_points(points: list[Point], base: tuple[str, int]) -> list[Point]:
    """The large model alone at each sampler and step count of `points` that has no such point yet."""
    have = {(p.sampler, p.steps) for p in points if p.fraction == 0 and p.gate is None and p.cache is None}
    wanted = dict.fromkeys((p.sampler, p.steps) for p in points)
    return [Point(0.0, None, s, n, base=(s, n) == base) for s, n in wanted if (s, n) not in have]


def _optional_number(cfg: DictConfig, key: str, low: float, example: str) -> float | None:
    """cfg's `key`: null, or a number >= low (as a float)."""
    value = OmegaConf.select(cfg, key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
        raise UserError(f"{key}={value!r}: must be null or a number >= {low} ({example})")
    return float(value)


def _int(cfg: DictConfig, key: str, low: int) -> int:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"{key}={value!r}: must be an integer >= {low}")
    return value


def check_seed_sets(cfg: DictConfig) -> dict[str, dict]:
    """seeds.selection and seeds.report: {seed, num_samples} each, their seed ranges disjoint."""
    sets = {}
    for name in SETS:
        seed, n = _int(cfg, f"seeds.{name}.seed", 0), _int(cfg, f"seeds.{name}.num_samples", 2)
        sets[name] = {"seed": seed, "num_samples": n, "seeds": [seed, seed + n - 1]}
    (a, b), (c, d) = sets["selection"]["seeds"], sets["report"]["seeds"]
    if a <= d and c <= b:
        raise UserError(f"seeds: the selection seeds {a}..{b} and the report seeds {c}..{d} overlap; a pick "
                         "must be reported on samples it was not chosen on")
    return sets


def point_configs(cfg: DictConfig, points: list[Point], compose: Compose, seed_set: str = "selection") \
        -> dict[str, DictConfig]:
    """Each point's composed sampling config on one seed set; everything that needs no model is checked here,
    before any work."""
    accel = _plain(cfg.accel)
    missing = [t for t in ACCEL_KINDS if t not in (accel or {})]
    if missing:
        raise UserError(f"accel: needs an accel config name for each of {ACCEL_KINDS}; missing {missing}")
    seeds = cfg.seeds[seed_set]
    shared = [*cfg.base, f"num_samples={seeds.num_samples}", f"batch_size={_int(cfg, 'batch_size', 1)}",
              f"seed={seeds.seed}", f"device={cfg.device}", f"num_threads={cfg.num_threads}", "progress=false"]
    cache_settings = _plain(cfg.get("cache_settings")) or {}
    if not isinstance(cache_settings, dict):
        raise UserError(f"cache_settings={cache_settings!r}: must be a mapping cache -> {{setting: value}}")
    cfgs = {}
    for point in points:
        # the point's sampler and steps win
        run_cfg = compose([*shared, *cfg.run_overrides, *point.overrides(accel, cache_settings)])
        check_config(run_cfg)
        build_hooks(run_cfg)  # bad gate or fraction settings fail here
        cfgs[point.key] = run_cfg
    return cfgs


def _load(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(folder / "samples.npz") as npz:
        return npz["arr_0"], npz["arr_1"]


def measure_point(folder: Path, quality: str, reference: np.ndarray | None, metrics: dict) -> dict:
    """The judges of a run folder's samples.npz (with per-sample values, for paired errors) into quality.json;
    fidelity against `reference` (the large model alone's images of the same seeds; None: this is it)."""
    images, labels = _load(folder)
    out: dict = {"labels": labels.astype(int).tolist(), "num_images": int(len(images))}
    if quality == "digits":
        from evaluation.digits import evaluate_digits, judges_per_sample

        out.update(evaluate_digits(images, labels))
        for judge, correct in judges_per_sample(images, labels).items():
            out[f"correct_{judge}"] = correct.astype(int).tolist()
    else:
        out.update({k: metrics[k] for k in ("fid", "inception_score", "clip_score") if k in metrics})
    per = fidelity_per_sample(images, images if reference is None else reference)
    out["psnr"], out["ssim"] = float(per["psnr"].mean()), float(per["ssim"].mean())
    finite = per["psnr"][np.isfinite(per["psnr"])]
    out["psnr_se"] = float(finite.std(ddof=1) / np.sqrt(len(finite))) if len(finite) > 1 else 0.0
    out["ssim_per_sample"] = per["ssim"].tolist()
    save_json({k: v for k, v in out.items() if k != "ssim_per_sample"}, folder / "quality.json")
    return out


def sample_and_measure(points: list[Point], cfgs: dict[str, DictConfig], out_dir: Path, own: Point | None,
                       quality: str, seed_set: str) -> list[dict]:
    """One row per point: its sampling run (resumed when already in out_dir), MACs and judges, compared with
    the first point's (the large model alone) sample by sample."""
    rows, reference = [], None
    for k, point in enumerate(points):
        folder = out_dir / "points" / point.key
        log.info("[%s %d/%d] %s: %d samples in %s", seed_set, k + 1, len(points), point.label,
                 cfgs[point.key].num_samples, folder)
        metrics = run_from_config(cfgs[point.key], folder)
        models = model_names(model_configs(cfgs[point.key]))  # run order (metrics.json sorts its keys)
        row = {"key": point.key, "set": seed_set, "label": point.label, "short_label": point.short_label,
               "technique": point.technique, "cache": point.cache, "base_point": point == own,
               "fraction": point.fraction,
               "gate": None if point.gate is None else vars(point.gate), "sampler": point.sampler,
               "steps": point.steps, "models": models,
               "model_steps": [metrics["steps_per_model"][m] for m in models],
               "macs": metrics.get("macs_per_image_spent", metrics.get("macs_per_image")),  # caches: what ran
               "quality_run_seconds": metrics["sampling_seconds"],
               **measure_point(folder, quality, reference, metrics)}
        if k == 0:
            reference = _load(folder)[0]
        rows.append(row)
    baseline = rows[0]
    for row in rows:
        if row["labels"] != baseline["labels"]:
            raise RuntimeError(f"{row['key']}: its samples have other labels than the baseline's (not paired)")
        n = len(row["labels"])
        if quality == "digits":
            for judge in PAIRED:
                key, _, per, _ = JUDGES[judge]
                prefix = "" if judge == "svc" else f"{judge}_"
                row[f"{prefix}delta"], row[f"{prefix}delta_se"] = paired_stats(row[per], baseline[per])
                c = np.asarray(row[per], dtype=np.float64)
                row[f"{key}_se"] = float(c.std(ddof=1) / np.sqrt(n))
        row["ssim_se"] = float(np.std(row["ssim_per_sample"], ddof=1) / np.sqrt(n))
        row["n"] = n
        row["macs_speedup"] = baseline["macs"] / row["macs"] if row["macs"] and baseline["macs"] else None
    return rows


def _title(cfgs: dict[str, DictConfig], rows: list[dict], seed_set: dict, name: str, timing: DictConfig,
           repeats: int) -> str:
    first = cfgs[rows[0]["key"]]
    stitched = next((cfgs[r["key"]] for r in rows if r["technique"] in ("tstitch", "combined")), first)
    models = " -> ".join(str(m.name) for m in [*(stitched.accel.get("models") or {}).values(), stitched.model])
    return (f"{models}, baseline {first.sampler.name} x{first.sampler.steps}, cfg {first.sampler.cfg_scale}\n"
            f"{name} set: seeds {seed_set['seeds'][0]}..{seed_set['seeds'][1]} ({rows[0]['n']} samples, the same "
            f"at every point)" + (f"; time: {timing.num_samples} samples, median of {repeats} (round-robin)"
                                  if repeats else ""))


COMPILE_MODES = ("none", "regional")  # timing.compile: eager, and each repeated block compiled (runs.run's compile)


def compile_modes(cfg: DictConfig) -> list[str]:
    """timing.compile: the compile modes each timed point is timed in ([none]: eager only)."""
    modes = _plain(cfg.timing.get("compile")) or ["none"]
    modes = [modes] if isinstance(modes, str) else modes
    if not isinstance(modes, list) or not modes or set(modes) - set(COMPILE_MODES) or len(set(modes)) < len(modes):
        raise UserError(f"timing.compile={modes!r}: a list of distinct modes of {list(COMPILE_MODES)} "
                        "(none: eager; regional: compile=regional, backend timing.compile_backend)")
    return modes


def compile_sets(cfg: DictConfig) -> list[str]:
    """timing.compile_sets: the seed sets timed compiled too (default both)."""
    sets = _plain(cfg.timing.get("compile_sets")) or list(SETS)
    if not isinstance(sets, list) or set(sets) - set(SETS):
        raise UserError(f"timing.compile_sets={sets!r}: a list of {list(SETS)} (the sets timed compiled too)")
    return sets


def _time(rows: list[dict], cfgs: dict[str, DictConfig], cfg: DictConfig, repeats: int, progress: bool) -> None:
    """Round-robin time of every row, eager (seconds, speedup) and, for each compiled mode of timing.compile, in
    its own round-robin (seconds_<mode>, speedup_<mode> against the large model alone compiled alike, and
    what dynamo did: compile_seconds_<mode>, recompiles_<mode>, ...)."""
    if not repeats or rows[0]["set"] not in (cfg.timing.get("sets") or SETS):
        return
    import torch

    timing = cfg.timing
    backend = str(timing.get("compile_backend") or "inductor")
    for mode in compile_modes(cfg):
        if mode != "none" and rows[0]["set"] not in compile_sets(cfg):
            continue  # compiling every point of a large selection grid costs more than it tells
        timed = {r["key"]: cfgs[r["key"]] for r in rows}
        if mode != "none":
            timed = {k: OmegaConf.merge(c, {"compile": mode, "compile_backend": backend}) for k, c in timed.items()}
            torch._dynamo.reset()  # each compiled variant starts from an empty dynamo (its own limits and caches)
        times = time_round_robin(timed, num_samples=int(timing.num_samples), batch_size=int(timing.batch_size),
                                 repeats=repeats, warmup=int(timing.warmup), num_threads=cfg.num_threads,
                                 progress=progress)
        suffix = "" if mode == "none" else f"_{mode}"
        for row in rows:
            t = times[row["key"]]
            row[f"seconds{suffix}"], row[f"seconds_runs{suffix}"] = t["seconds"], t["runs"]
            row[f"speedup{suffix}"] = times[rows[0]["key"]]["seconds"] / t["seconds"]
            if mode != "none":
                row[f"compile_backend{suffix}"] = backend
                for name in ("compile_seconds", "compiled_graphs", "recompiles", "recompile_limit_hit"):
                    row[f"{name}{suffix}"] = t[name]
        if mode != "none":
            torch._dynamo.reset()


def report_points(points: list[Point], pick: Point | None, own: Point | None, extra: list[Point]) -> list[Point]:
    """The report set's points: the large model alone, the large model alone at the pick's sampler and steps,
    the pick, the base config's own point, then `extra` (report_grids), each once."""
    out = [points[0]]
    if pick is not None:
        out += [Point(0.0, None, pick.sampler, pick.steps, base=pick.base), pick]
    out += ([own] if own is not None else []) + list(extra)
    unique: list[Point] = []
    for p in out:
        if p not in unique:
            unique.append(p)
    return unique


def run_frontier(cfg: DictConfig, compose: Compose, out_dir: str | Path, progress: bool = True) -> dict:
    """Run the sweep of `cfg` (configs/frontier.yaml) into out_dir: choose on the selection set, report on the
    report set.

    Returns {"rows" (report), "selection_rows", "pick" (its report row), "table", "summary", "figure",
    "title", "json"}."""
    out_dir = Path(out_dir)
    tolerance = cfg.pick.tolerance
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        raise UserError(f"pick.tolerance={tolerance!r}: must be a number in [0, 1) (agreement is a share)")
    tolerance = float(tolerance)
    frechet_tolerance = _optional_number(cfg, "pick.frechet_tolerance", 0, "0.1: the Fréchet distance at most 10% "
                                         "above the large model alone's")
    same_steps_speedup = _optional_number(cfg, "pick.same_steps_speedup", 1, "2: the pick at least 2x faster than "
                                          "the large model alone at its own sampler and steps")
    se_margin = _optional_number(cfg, "pick.se_margin", 0, "1: each classifier's paired difference clears the "
                                 "tolerance by one paired standard error") or 0.0
    quality = cfg.quality
    if quality not in QUALITIES:
        raise UserError(f"quality={quality!r}: allowed: {list(QUALITIES)}")
    judges = check_pick_judges(_plain(cfg.pick.judges), quality)
    sets = check_seed_sets(cfg)
    kinds = _plain(cfg.pick.get("techniques"))
    if kinds is not None and (not isinstance(kinds, list) or not kinds or set(kinds) - set(TECHNIQUES)):
        raise UserError(f"pick.techniques={kinds!r}: null or a list of {list(TECHNIQUES)}")
    repeats = _int(cfg, "timing.repeats", 0)
    if repeats:
        _int(cfg, "timing.num_samples", 1), _int(cfg, "timing.batch_size", 1), _int(cfg, "timing.warmup", 0)
    modes = compile_modes(cfg)
    timed_sets = list(cfg.timing.get("sets") or SETS)
    if set(timed_sets) - set(SETS):
        raise UserError(f"timing.sets={timed_sets!r}: each must be one of {list(SETS)}")
    compile_sets(cfg)
    points, own = sweep_points(cfg, compose)
    sampler, steps = points[0].sampler, points[0].steps
    extra = _points(cfg, "report_grids", sampler, steps)[1:]
    cfgs = point_configs(cfg, points, compose, "selection")  # every check before any work
    report_cfgs = point_configs(cfg, report_points(points, None, own, extra), compose, "report")
    log.info("%d points: %s", len(points), ", ".join(p.label for p in points))

    # 1. choose on the selection set
    selection = sample_and_measure(points, cfgs, out_dir / "selection", own, quality, "selection")
    _time(selection, cfgs, cfg, repeats, progress)
    mark_frontiers(selection)
    # the pick's cost: round-robin time; else MACs; else (pipelines count none) each quality run's own time
    cost = ("seconds" if repeats and "selection" in timed_sets else "macs" if all(r["macs"] for r in selection)
            else "quality_run_seconds")
    techniques = _plain(cfg.pick.get("techniques"))
    add_same_steps_speedups(selection, cost)
    pick_row = pick_fastest(selection, judges, tolerance, cost, techniques, frechet_tolerance, same_steps_speedup,
                            se_margin)
    pick = next((p for p in points if p.key == pick_row["key"]), None) if pick_row else None
    # of every kind: fewer steps alone may beat the pick
    any_row = pick_fastest(selection, judges, tolerance, cost, None, frechet_tolerance, se_margin=se_margin)
    fastest = next((p for p in points if p.key == any_row["key"]), None) if any_row else None

    # 2. report on the report set
    chosen = report_points(points, pick, own, [*([fastest] if fastest else []), *extra])
    report_cfgs.update(point_configs(cfg, [p for p in chosen if p.key not in report_cfgs], compose, "report"))
    report = sample_and_measure(chosen, report_cfgs, out_dir / "report", own, quality, "report")
    _time(report, report_cfgs, cfg, repeats, progress)
    add_same_steps_speedups(report, "seconds" if report[0].get("seconds") is not None else "macs")
    mark_frontiers(report)
    reported_pick = next((r for r in report if pick is not None and r["key"] == pick.key), None)
    reported_any = next((r for r in report if fastest is not None and r["key"] == fastest.key), None)
    for row in report:
        row["pick"] = row is reported_pick
    for row in selection:
        row["pick"] = pick is not None and row["key"] == pick.key

    base_name = " ".join(cfg.base)
    kinds = f" among {techniques}" if techniques else ""
    rule = (f"the fastest point{kinds} (by {cost}) of the selection set within {tolerance:g} of the large model "
            f"alone by each of {judges}"
            + (f" (clearing it by {se_margin:g} paired SE)" if se_margin and quality == "digits" else "")
            + (f", with a Fréchet distance at most {100 * frechet_tolerance:g}% above its" if frechet_tolerance
               is not None and quality == "digits" else "")
            + (f", and at least {same_steps_speedup:g}x cheaper than the large model alone at its own sampler and "
               "steps" if same_steps_speedup is not None else ""))
    text = summary(report, reported_pick, rule, base_name, quality, reported_any)
    table = markdown_table(report, reported_pick, base_name, quality)
    selection_table = markdown_table(selection, pick_row, base_name, quality)
    title = _title(report_cfgs, report, sets["report"], "report", cfg.timing, repeats * ("report" in timed_sets))
    selection_title = _title(cfgs, selection, sets["selection"], "selection", cfg.timing,
                             repeats * ("selection" in timed_sets))
    figure = Path(cfg.figure) if cfg.get("figure") else out_dir / "frontier.png"
    plot_frontier(report, figure, title=title, pick=reported_pick, tolerance=tolerance, quality=quality)
    selection_figure = out_dir / "frontier_selection.png"
    plot_frontier(selection, selection_figure, title=selection_title, pick=pick_row, tolerance=tolerance,
                  quality=quality)
    steps_figure = None
    if cfg.get("steps_figure"):
        rows = report if cfg.get("steps_figure_set", "report") == "report" else selection
        steps_figure = plot_steps_samplers(rows, Path(cfg.steps_figure), quality=quality,
                                           title=title if rows is report else selection_title)

    def strip(r: dict) -> dict:
        return {k: v for k, v in r.items() if k not in ("labels", "ssim_per_sample") and not k.startswith("correct_")}

    record = {"settings": _plain(cfg), "seeds": sets, "disjoint": True, "pick_rule": rule, "cost": cost,
              "pick": pick and pick.key, "pick_chosen_on": "selection",
              "fastest_any_kind": fastest and fastest.key, "numbers_reported_from": "report",
              "title": title, "summary": text, "report": [strip(r) for r in report],
              "selection": [strip(r) for r in selection]}
    save_json(record, out_dir / "frontier.json")
    compiled = [m for m in modes if m != "none"] if repeats else []
    if compiled:  # eager and compiled sampling time of each timed point, side by side
        for name, rows in (("Report", report), ("Selection", selection)):
            if rows[0].get(f"seconds_{compiled[0]}") is not None:
                table += f"\n\n### {name} set: eager and compiled sampling time\n\n{compiled_table(rows, compiled)}"
    markdown = (f"## Report set\n\n{title.replace(chr(10), '; ')}\n\n{text}\n\n{table}\n\n"
                f"## Selection set (the pick was chosen here)\n\n{selection_title.replace(chr(10), '; ')}\n\n"
                f"{selection_table}\n")
    atomic_write_bytes(out_dir / "frontier.md", markdown.encode())
    if cfg.get("table"):
        Path(cfg.table).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(Path(cfg.table), f"{text}\n\n{table}\n".encode())
    log.info("%s\n%s", text, table)
    return {"rows": report, "selection_rows": selection, "pick": reported_pick, "selection_pick": pick_row,
            "fastest_any": any_row,
            "table": table, "selection_table": selection_table, "summary": text, "figure": figure,
            "selection_figure": selection_figure, "steps_figure": steps_figure, "title": title,
            "json": out_dir / "frontier.json"}


def replot(out_dir: str | Path, figure: str | Path | None = None) -> Path:
    """Draw the report set's figure again from an earlier sweep's frontier.json (no sampling, no timing)."""
    import json

    record = json.loads((Path(out_dir) / "frontier.json").read_text())
    rows = record["report"]
    pick = next((r for r in rows if r["key"] == record["pick"]), None)
    return plot_frontier(rows, Path(figure) if figure else Path(out_dir) / "frontier.png", title=record["title"],
                         pick=pick, tolerance=float(record["settings"]["pick"]["tolerance"]),
                         quality=record["settings"]["quality"])
