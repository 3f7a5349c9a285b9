"""The speed-quality sweep (benchmarks/frontier, scripts/frontier.py) on the shipped digits pair, tiny grids."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from benchmarks.frontier import (
    Gate,
    Point,
    agreement_stats,
    grid_points,
    pareto_front,
    pick_fastest,
    run_frontier,
)
from benchmarks.frontier import timing as frontier_timing
from benchmarks.frontier.sweep import own_point
from evaluation.digits import evaluate_digits
from runs.techniques import label, stitched_models

from conftest import CONFIGS

ROOT = CONFIGS.parent
CKPTS = [f"model.ckpt={ROOT / 'checkpoints/digits/digits_l.pt'}",
         f"family.stitch.small.ckpt={ROOT / 'checkpoints/digits/digits_s.pt'}"]
# 2 x 2 points: the large model alone, T-Stitch 0.4 (2 of 6 steps), T-GATE at half the steps (g3), both;
# 6 DDIM steps; selection: 12 samples (seeds 0..11), report: 10 samples (seeds 500..509)
TINY = ["base_point=false", "seeds.selection.num_samples=12", "seeds.report={seed: 500, num_samples: 10}",
        "batch_size=6", "timing.num_samples=4", "timing.batch_size=4", "timing.repeats=2", "timing.warmup=0",
        "grids=[{fractions: [0.0, 0.4], gates: [null, {gate_step: 0.5}]}]", "report_grids=[]",
        "pick.same_steps_speedup=null", "pick.se_margin=0", "timing.compile=[none]"]


@pytest.fixture
def frontier_cfg():
    """frontier_cfg(*overrides) -> configs/frontier.yaml composed, and a composer of configs/sample.yaml."""
    def _compose(*overrides):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = compose(config_name="frontier", overrides=list(overrides))
        cfg.run_overrides = ["sampler.steps=6", *[o for o in CKPTS if "small" not in o]]
        return cfg

    def _compose_sample(overrides):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = compose(config_name="sample", overrides=list(overrides))
        if OmegaConf.select(cfg, "family.stitch.small") is not None:  # absolute checkpoint paths: any folder
            cfg.family.stitch.small.ckpt = CKPTS[1].split("=", 1)[1]
        return cfg

    yield _compose, _compose_sample
    GlobalHydra.instance().clear()


def test_points_of_a_grid():
    points = grid_points([{"name": "a", "fractions": [0.0, 0.5], "gates": [None, {"gate_step": 0.5}]},
                          {"fractions": [0.5], "gates": [None, {"gate_step": 0.5, "sp_interval": 2}]}],
                         {"warm_up": 0.2}, "ddim", 6)
    baseline = Point(0.0, None, "ddim", 6, base=True)
    assert points[0] == baseline and len(points) == 5  # the large model alone first, each point once
    assert [p.technique for p in points] == ["baseline", "tstitch", "tgate", "combined", "combined"]
    # gate_step and warm_up are fractions of the steps: 0.5 of 6 -> 3, 0.2 of 6 -> 1
    assert points[2].gate == Gate(3, warm_up=1) and points[4].gate == Gate(3, sp_interval=2, warm_up=1)
    accel = {"baseline": "none", "tstitch": "ts", "tgate": "tg", "combined": "both"}
    assert baseline.overrides(accel) == ["sampler=ddim", "sampler.steps=6", "accel=none"]
    assert points[3].overrides(accel) == ["sampler=ddim", "sampler.steps=6", "accel=both", "accel.tstitch.ratio=0.5",
                                          "accel.tgate.gate_step=3", "accel.tgate.sp_interval=1",
                                          "accel.tgate.fi_interval=1", "accel.tgate.warm_up=1",
                                          "accel.tgate.branch=cond"]
    assert points[4].key == "ddim6-r0.50-g3-sp2-fi1-wu1-cond" and points[4].short_label == "S0.5 g3 sp2"
    assert Point(0.0, Gate(25, branch="uncond")).label == "g25 sp1 fi1 wu2 uncond, DDIM 50"
    # one grid serves every step count: the same fractions at 50 and 25 steps; fewer steps is its own kind
    more = grid_points([{"samplers": ["ddim", "dpmpp_2m"], "steps": [25, 50], "gates": [{"gate_step": 0.8}]},
                        {"samplers": ["euler"], "steps": [10]}], {"warm_up": 0.04})
    assert [(p.sampler, p.steps, p.gate and p.gate.gate_step, p.gate and p.gate.warm_up) for p in more[1:5]] == [
        ("ddim", 25, 20, 1), ("ddim", 50, 40, 2), ("dpmpp_2m", 25, 20, 1), ("dpmpp_2m", 50, 40, 2)]
    assert more[-1].technique == "steps" and more[-1].key == "euler10-r0.00" and more[-1].short_label == "L Euler10"
    assert more[-1].overrides(accel) == ["sampler=euler", "sampler.steps=10", "accel=none"]
    assert more[2].short_label == "g40" and more[1].short_label == "g20 25"


@pytest.mark.parametrize("grids, message", [
    ([{"fractions": [1.5]}], "grids[0].fractions[0]=1.5"),
    ([{"gates": [{"gate_step": 0}]}], "gate_step=0"),
    ([{"gates": [{"gate_step": 40}]}], "gate_step=40: in a sweep's grid T-GATE's gate_step is a fraction of the steps"),
    ([{"gates": [{"gate_step": 0.5, "branch": "both"}]}], "branch='both'"),
    ([{"gates": [{"gate_step": 0.5, "gate": 2}]}], "unknown keys ['gate']"),
    ([{"gates": [{"sp_interval": 2}]}], "needs gate_step"),
    ([{"fractions": [], "gates": [None]}], "must not be empty"),
    ([{"fraction": [0.5]}], "unknown keys ['fraction']"),
    ([{"samplers": ["heun"]}], "'heun' is not a sampler of the sweep"),
    ([{"steps": [0]}], "steps: 0 must be an integer"),
    ([{"caches": ["first_block"]}], "grids[0].caches[0]='first_block': not a cache; allowed: ['first_block_cache'"),
    ([{"caches": "taylorseer"}], "grids[0].caches='taylorseer': must be a list"),
    ({"a": {"fractions": [0.5]}}, "must be a list"),
])
def test_bad_grids_are_refused(grids, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        grid_points(grids)


def test_paired_standard_errors():
    base = np.array([1, 1, 1, 1, 0, 1, 1, 1, 1, 1], bool)
    point = np.array([1, 1, 0, 1, 0, 1, 1, 1, 1, 0], bool)  # loses samples 2 and 9
    s = agreement_stats(point, base)
    assert s["accuracy"] == pytest.approx(0.7) and s["delta"] == pytest.approx(-0.2)
    assert s["accuracy_se"] == pytest.approx(np.std(point.astype(float), ddof=1) / np.sqrt(10))
    assert s["delta_se"] == pytest.approx(np.std(point.astype(float) - base, ddof=1) / np.sqrt(10))
    assert agreement_stats(base, base)["delta_se"] == 0.0
    with pytest.raises(ValueError, match="same samples"):
        agreement_stats(point[:5], base)


def test_pareto_front_and_pick():
    rows = [{"key": "L", "technique": "baseline", "macs": 10, "accuracy": 0.98, "logreg_accuracy": 0.97,
             "frechet": 30},
            {"key": "a", "technique": "tstitch", "macs": 6, "accuracy": 0.975, "logreg_accuracy": 0.965, "frechet": 31},
            {"key": "b", "technique": "tstitch", "macs": 7, "accuracy": 0.96, "logreg_accuracy": 0.96,
             "frechet": 29},   # dominated by a
            {"key": "c", "technique": "tgate", "macs": 4, "accuracy": 0.90, "logreg_accuracy": 0.90, "frechet": 50},
            {"key": "d", "technique": "combined", "macs": 5, "accuracy": 0.971, "logreg_accuracy": 0.955,
             "frechet": 28}]
    assert [r["key"] for r in pareto_front(rows, "macs", "accuracy")] == ["c", "d", "a", "L"]
    assert [r["key"] for r in pareto_front(rows, "macs", "frechet", higher_is_better=False)] == ["c", "d"]
    assert pick_fastest(rows, ["svc"], 0.01, "macs")["key"] == "d"    # 0.9 points below: within 1 point
    assert pick_fastest(rows, ["svc", "logreg"], 0.01, "macs")["key"] == "a"   # d is 1.5 points below by LogReg
    assert pick_fastest(rows, ["svc"], 0.006, "macs")["key"] == "a"
    assert pick_fastest(rows, ["svc", "logreg"], 0.1, "macs")["key"] == "c"
    assert pick_fastest(rows, ["svc"], 0.0, "macs")["key"] == "L"


def test_a_point_beyond_the_frechet_tolerance_is_never_picked():
    # the cheaper point agrees as well as the large model by both classifiers (the old rule picks it) but its
    # Fréchet distance is 40% above the large model's; the dearer one is 5% above
    rows = [{"key": "L", "technique": "baseline", "macs": 10, "accuracy": 0.98, "logreg_accuracy": 0.97,
             "frechet": 30.0},
            {"key": "few", "technique": "tstitch", "macs": 2, "accuracy": 0.98, "logreg_accuracy": 0.97,
             "frechet": 42.0},
            {"key": "ok", "technique": "tstitch", "macs": 6, "accuracy": 0.975, "logreg_accuracy": 0.965,
             "frechet": 31.5}]
    judges = ["svc", "logreg"]
    assert pick_fastest(rows, judges, 0.01, "macs")["key"] == "few"               # classifiers alone
    assert pick_fastest(rows, judges, 0.01, "macs", frechet_tolerance=0.10)["key"] == "ok"
    assert pick_fastest(rows, judges, 0.01, "macs", frechet_tolerance=0.40)["key"] == "few"  # at the bound: in
    assert pick_fastest(rows, judges, 0.01, "macs", frechet_tolerance=0.04)["key"] == "L"
    assert pick_fastest(rows, judges, 0.01, "macs", ["tstitch"], frechet_tolerance=0.04) is None
    for tolerance in (0.0, 0.05, 0.10, 0.2, 0.39):
        picked = pick_fastest(rows, judges, 0.01, "macs", frechet_tolerance=tolerance)
        assert picked is None or picked["frechet"] <= 30.0 * (1 + tolerance)


def test_the_pick_must_beat_the_large_model_at_its_own_steps():
    """pick.same_steps_speedup: a technique's point 9x faster than DDIM 50 only because it runs 10 steps, and
    1.9x faster than the large model at those 10 steps, is not picked at 2.0; one 2.5x faster at 20 steps is."""
    from benchmarks.frontier.report import add_same_steps_speedups

    def row(key, technique, sampler, steps, seconds, accuracy=0.99):
        return {"key": key, "technique": technique, "sampler": sampler, "steps": steps, "seconds": seconds,
                "accuracy": accuracy, "logreg_accuracy": accuracy, "frechet": 30.0}

    rows = [row("L50", "baseline", "ddim", 50, 18.0), row("L10", "steps", "dpmpp_2m", 10, 3.6),
            row("S10", "tstitch", "dpmpp_2m", 10, 1.9), row("L20", "steps", "dpmpp_2m", 20, 7.2),
            row("C20", "caches", "dpmpp_2m", 20, 2.88), row("S5", "tstitch", "ddim", 5, 0.5)]
    add_same_steps_speedups(rows, "seconds")
    speedups = {r["key"]: r["same_steps_speedup"] for r in rows}
    assert speedups["S10"] == pytest.approx(3.6 / 1.9) and speedups["C20"] == pytest.approx(2.5)
    assert speedups["L10"] == speedups["L50"] == 1.0 and speedups["S5"] is None  # no large model at DDIM 5
    assert rows[2]["same_steps_key"] == "L10"
    judges, kinds = ["svc", "logreg"], ["tstitch", "caches"]
    assert pick_fastest(rows, judges, 0.01, "seconds", kinds)["key"] == "S5"
    assert pick_fastest(rows, judges, 0.01, "seconds", kinds, same_steps_speedup=1.8)["key"] == "S10"
    assert pick_fastest(rows, judges, 0.01, "seconds", kinds, same_steps_speedup=2.0)["key"] == "C20"
    assert pick_fastest(rows, judges, 0.01, "seconds", kinds, same_steps_speedup=3.0) is None


def test_a_margin_of_paired_errors_keeps_edge_points_out():
    # "edge" is 0.9 points below by the SVC with a paired SE of 0.4: within 1 point, but not by a margin of 1 SE
    rows = [{"key": "L", "technique": "baseline", "macs": 10, "accuracy": 0.99, "logreg_accuracy": 0.98,
             "delta_se": 0.0, "logreg_delta_se": 0.0},
            {"key": "edge", "technique": "tstitch", "macs": 2, "accuracy": 0.981, "logreg_accuracy": 0.98,
             "delta_se": 0.004, "logreg_delta_se": 0.001},
            {"key": "safe", "technique": "tstitch", "macs": 4, "accuracy": 0.986, "logreg_accuracy": 0.979,
             "delta_se": 0.003, "logreg_delta_se": 0.002}]
    judges = ["svc", "logreg"]
    assert pick_fastest(rows, judges, 0.01, "macs")["key"] == "edge"
    assert pick_fastest(rows, judges, 0.01, "macs", se_margin=1.0)["key"] == "safe"
    assert pick_fastest(rows, judges, 0.01, "macs", se_margin=3.0)["key"] == "L"   # -0.4 - 3 x 0.3 < -1


def test_the_steps_figure_draws_plain_and_stitched_points_only():
    from benchmarks.frontier.pareto import steps_figure_rows

    rows = [{"key": k, "gate": g, "cache": c} for k, g, c in (("L", None, None), ("S", None, None),
                                                               ("SG", {"gate_step": 8}, None), ("SC", None, "pab"))]
    assert [r["key"] for r in steps_figure_rows(rows)] == ["L", "S"]


def test_the_same_steps_rule_adds_the_large_model_at_every_sampler_and_steps(frontier_cfg):
    from benchmarks.frontier.sweep import same_steps_points, sweep_points

    compose_frontier, compose_sample = frontier_cfg
    grid = "grids=[{samplers: [dpmpp_2m], steps: [4], fractions: [0.4]}, {steps: [3], fractions: [0.0, 0.4]}]"
    points, _ = sweep_points(compose_frontier(*TINY, grid, "pick.same_steps_speedup=2"), compose_sample)
    assert [p.key for p in points] == ["ddim6-r0.00", "dpmpp_2m4-r0.40", "ddim3-r0.00", "ddim3-r0.40",
                                       "dpmpp_2m4-r0.00"]
    assert [p.technique for p in points][-1] == "steps"
    points, _ = sweep_points(compose_frontier(*TINY, grid), compose_sample)  # no rule: no extra points
    assert "dpmpp_2m4-r0.00" not in [p.key for p in points]
    assert same_steps_points(points, ("ddim", 6)) == [Point(0.0, None, "dpmpp_2m", 4)]


def test_the_summary_compares_the_pick_with_the_large_model_at_its_own_steps():
    from benchmarks.frontier.report import summary

    def row(key, technique, sampler, steps, seconds, macs, svc, frechet):
        n = len(svc)
        return {"key": key, "label": key, "technique": technique, "sampler": sampler, "steps": steps, "n": n,
                "seconds": seconds, "macs": macs, "accuracy": float(np.mean(svc)), "logreg_accuracy": 1.0,
                "delta": 0.0, "delta_se": 0.0, "logreg_delta": 0.0, "logreg_delta_se": 0.0, "knn_delta": 0.0,
                "knn_delta_se": 0.0, "frechet": frechet, "psnr": 30.0, "ssim": 0.99, "correct_svc": svc,
                "correct_logreg": [True] * n, "correct_knn": [True] * n}

    large = row("L50", "baseline", "ddim", 50, 10.0, 100, [True] * 4, 20.0)
    same = row("L10", "steps", "dpmpp_2m", 10, 2.0, 20, [True] * 4, 25.0)
    pick = row("S10", "tstitch", "dpmpp_2m", 10, 1.0, 8, [True, True, True, False], 21.0)
    text = summary([large, same, pick], pick, "rule")
    assert "pick against L10 (L10), paired: 2.00x faster in time, 2.50x fewer MACs, SVC -25.00 (25.00) pt" in text
    assert "Fréchet 21.0 vs 25.0" in text
    assert "pick against" not in summary([large, pick], pick, "rule")  # no large model at the pick's steps


def test_timing_is_round_robin(monkeypatch, frontier_cfg):
    """Repeat 1 of every point, then repeat 2, ...; warm-up rounds are not recorded."""
    _, compose_sample = frontier_cfg
    calls = []

    def fake_seconds(self, batch_size):
        calls.append((label(self.cfg.accel), batch_size))
        return float(len(calls))

    monkeypatch.setattr(frontier_timing.TimedRun, "seconds", fake_seconds)
    cfgs = {k: compose_sample(["+exp=digits_fast", f"accel={k}", CKPTS[0]]) for k in ("none", "tgate")}
    times = frontier_timing.time_round_robin(cfgs, num_samples=4, batch_size=2, repeats=3, warmup=1, progress=False)
    assert calls == [("none", 2), ("tgate", 2)] * 4
    eager = {"compile_seconds": 0.0, "compiled_graphs": 0, "recompiles": 0, "recompile_limit_hit": False}
    assert times["none"] == {"seconds": 5.0, "runs": [3.0, 5.0, 7.0], **eager}
    assert times["tgate"] == {"seconds": 6.0, "runs": [4.0, 6.0, 8.0], **eager}
    with pytest.raises(ValueError, match="repeats=0"):
        frontier_timing.time_round_robin(cfgs, num_samples=4, batch_size=2, repeats=0)


def test_timed_run_samples_what_the_run_samples(frontier_cfg, tmp_path, run_latents, monkeypatch):
    """The timed run is the point's run: same models, hooks, seeds and labels (its latents are the run's,
    whatever the batch size), and a point with other settings gives other latents."""
    from runs.run import run_from_config

    _, compose_sample = frontier_cfg
    tiny = ["+exp=digits_stitch_0.4", "accel=[tstitch,tgate]", CKPTS[0], "sampler.steps=6", "num_samples=4",
            "batch_size=4", "progress=false"]
    cfg = compose_sample([*tiny, "accel.tgate.gate_step=3"])
    run_from_config(cfg, tmp_path / "run")
    recorded = []
    real = frontier_timing.generate

    def recording(denoisers, solver, decode, **kwargs):
        return real(denoisers, solver, lambda x: (recorded.append(x.clone()), decode(x))[1], **kwargs)

    monkeypatch.setattr(frontier_timing, "generate", recording)
    for settings in ([], ["accel.tgate.gate_step=4"]):
        timed = frontier_timing.build_timed_run(compose_sample([*tiny, "accel.tgate.gate_step=3", *settings]), 4)
        try:
            assert timed.seconds(batch_size=2) > 0
        finally:
            timed.close()
    # the same latents (to float rounding: batches of 2 against the run's batch of 4)
    assert torch.allclose(torch.cat(recorded[:2]), run_latents(tmp_path / "run"), atol=1e-5)
    assert not torch.allclose(torch.cat(recorded[2:]), run_latents(tmp_path / "run"), atol=1e-4)


def test_cache_points_of_a_grid():
    points = grid_points([{"steps": [6], "fractions": [0.4], "caches": ["taylorseer", "mag_cache"]}])
    assert [p.key for p in points] == ["ddim50-r0.00", "ddim6-r0.40", "ddim6-r0.00-taylorseer",
                                       "ddim6-r0.40-taylorseer", "ddim6-r0.00-mag_cache", "ddim6-r0.40-mag_cache"]
    alone, stitched = points[2], points[3]
    assert alone.technique == stitched.technique == "caches"
    assert alone.label == "taylorseer, DDIM 6" and stitched.label == "S 0.4 + taylorseer, DDIM 6"
    names = {"baseline": "none", "tstitch": "tstitch", "tgate": "tgate", "combined": "[tstitch,tgate]"}
    assert "accel=taylorseer" in alone.overrides(names)
    assert {"accel=[tstitch,taylorseer]", "accel.tstitch.ratio=0.4"} <= set(stitched.overrides(names))
    assert "accel.mag_cache.calibration=digits" in points[4].overrides(names, {"mag_cache": {"calibration": "digits"}})
    # step settings of a cache are fractions of each point's steps in a sweep, like T-GATE's gate step
    fractions = {"taylorseer": {"disable_cache_before_step": 0.25, "disable_cache_after_step": None,
                                "cache_interval": 3}}
    for steps, before in ((20, 5), (50, 13), (6, 2)):
        point = Point(0.0, None, "dpmpp_2m", steps, cache="taylorseer")
        out = point.overrides(names, fractions)
        assert f"accel.taylorseer.disable_cache_before_step={before}" in out, out
        assert "accel.taylorseer.disable_cache_after_step=null" in out and "accel.taylorseer.cache_interval=3" in out
    with pytest.raises(ValueError, match=r"retention_steps=2: in a sweep cache_settings.sea_cache.retention_steps"):
        Point(0.0, None, "ddim", 20, cache="sea_cache").overrides(names, {"sea_cache": {"retention_steps": 2}})


def test_a_cache_on_the_tiny_sweep_spends_fewer_macs(frontier_cfg, tmp_path):
    compose_frontier, compose_sample = frontier_cfg
    cfg = compose_frontier(*TINY, "timing.repeats=0", "seeds.selection.num_samples=4", "seeds.report.num_samples=4",
                           "batch_size=4", "grids=[{caches: [taylorseer]}]", "pick.techniques=[caches]",
                           "+cache_settings.taylorseer={disable_cache_before_step: 0.34}")  # 2 of 6; default 5
    result = run_frontier(cfg, compose_sample, tmp_path / "sweep", progress=False)
    sel = {r["key"]: r for r in result["selection_rows"]}
    assert list(sel) == ["ddim6-r0.00", "ddim6-r0.00-taylorseer"]
    plain, cached = sel.values()
    assert cached["technique"] == "caches" and cached["cache"] == "taylorseer"
    metrics = json.loads((tmp_path / "sweep/selection/points/ddim6-r0.00-taylorseer/metrics.json").read_text())
    assert "taylorseer" in json.dumps(metrics)
    # the MACs really spent (a cache skips blocks); the plain point spends the counted MACs of every step
    assert cached["macs"] == metrics["macs_per_image_spent"] < metrics["macs_per_image"] == plain["macs"]
    images = [np.load(tmp_path / "sweep/selection/points" / k / "samples.npz")["arr_0"] for k in sel]
    assert not np.array_equal(images[0], images[1])


def test_compiled_timing_rows(frontier_cfg, tmp_path):
    compose_frontier, compose_sample = frontier_cfg
    cfg = compose_frontier(*TINY, "seeds.selection.num_samples=4", "seeds.report.num_samples=4", "batch_size=4",
                           "grids=[{fractions: [0.4]}]", "timing.warmup=1", "timing.repeats=1",
                           "timing.sets=[selection]", "timing.compile=[none,regional]",
                           "timing.compile_sets=[selection]", "timing.compile_backend=aot_eager")
    result = run_frontier(cfg, compose_sample, tmp_path / "sweep", progress=False)
    for row in result["selection_rows"]:
        assert row["seconds"] > 0 and row["seconds_regional"] > 0 and len(row["seconds_runs_regional"]) == 1
        assert row["compile_backend_regional"] == "aot_eager" and row["compiled_graphs_regional"] > 0
        assert isinstance(row["recompiles_regional"], int) and row["recompile_limit_hit_regional"] is False
    assert "seconds_regional" not in result["rows"][0]  # the report set is not timed here
    md = (tmp_path / "sweep" / "frontier.md").read_text()
    assert "### Selection set: eager and compiled sampling time" in md and "| regional s |" in md
    record = json.loads((tmp_path / "sweep" / "frontier.json").read_text())
    assert "recompiles_regional" in record["selection"][1]


@pytest.mark.parametrize("modes", ["[full]", "[none,none]"])
def test_bad_compile_timing_is_refused(frontier_cfg, tmp_path, modes):
    compose_frontier, compose_sample = frontier_cfg
    with pytest.raises(ValueError, match=r"timing.compile=.*none \| regional|timing.compile=.*\['none', 'regional'\]"):
        run_frontier(compose_frontier(*TINY, f"timing.compile={modes}"), compose_sample, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def test_tiny_sweep_chooses_on_selection_and_reports_on_report(frontier_cfg, tmp_path):
    compose_frontier, compose_sample = frontier_cfg
    cfg = compose_frontier(*TINY, "report_grids=[{fractions: [0.4]}, {samplers: [dpmpp_2m], steps: [4]}]",
                           "steps_figure_set=selection", f"steps_figure={tmp_path / 'docs' / 's.png'}",
                           f"figure={tmp_path / 'docs' / 'f.png'}", f"table={tmp_path / 'docs' / 't.md'}")
    result = run_frontier(cfg, compose_sample, tmp_path / "sweep", progress=False)
    sel = {r["key"]: r for r in result["selection_rows"]}
    assert list(sel) == ["ddim6-r0.00", "ddim6-r0.40", "ddim6-r0.00-g3-sp1-fi1-wu0-cond",
                         "ddim6-r0.40-g3-sp1-fi1-wu0-cond"]
    base, stitch, gate, both = sel.values()
    assert [r["technique"] for r in sel.values()] == ["baseline", "tstitch", "tgate", "combined"]
    assert base["models"] == ["DiT-digits-L"] and base["model_steps"] == [6]
    assert stitch["models"] == both["models"] == ["DiT-digits-S", "DiT-digits-L"]
    assert stitch["model_steps"] == both["model_steps"] == [2, 4] and gate["model_steps"] == [6]
    assert base["macs"] > stitch["macs"] > both["macs"] and base["macs"] > gate["macs"] > both["macs"]
    # every judge from each point's own samples; paired differences against the large model alone
    from evaluation.digits import judges_per_sample
    from evaluation.fidelity import fidelity_per_sample
    base_images = np.load(tmp_path / "sweep/selection/points/ddim6-r0.00/samples.npz")["arr_0"]
    for key, row in sel.items():
        with np.load(tmp_path / "sweep" / "selection" / "points" / key / "samples.npz") as npz:
            images, labels = npz["arr_0"], npz["arr_1"]
        quality = evaluate_digits(images, labels)
        assert row["accuracy"] == quality["accuracy"] and row["logreg_accuracy"] == quality["logreg_accuracy"]
        assert list(labels) == [k % 10 for k in range(12)] and row["set"] == "selection" and row["n"] == 12
        judged = judges_per_sample(images, labels)
        assert row["logreg_delta"] == pytest.approx(np.mean(judged["logreg"].astype(float) - judges_per_sample(
            base_images, labels)["logreg"]))
        assert row["psnr"] == pytest.approx(fidelity_per_sample(images, base_images)["psnr"].mean())
        if key != "ddim6-r0.00":
            assert not np.array_equal(images, base_images) and np.isfinite(row["psnr"]) and row["ssim"] < 1
        assert len(row["seconds_runs"]) == 2 and row["seconds"] > 0
    assert base["delta"] == base["logreg_delta"] == 0.0 and base["psnr"] == float("inf") and base["ssim"] == 1.0
    # the pick: chosen on the selection set by both classifier families, among the techniques (pick.techniques);
    # the fastest point of any kind beside it
    pick = result["selection_pick"]
    ok = [r for r in sel.values() if r["accuracy"] >= base["accuracy"] - 0.01
          and r["logreg_accuracy"] >= base["logreg_accuracy"] - 0.01]
    assert result["fastest_any"] is min(ok, key=lambda r: r["seconds"])
    techniques = [r for r in ok if r["technique"] != "baseline"]
    assert pick is (min(techniques, key=lambda r: r["seconds"]) if techniques else None)
    # the report set: other seeds; the large model alone, the pick, report_grids; the pick re-measured there
    rep = {r["key"]: r for r in result["rows"]}
    pick = pick or result["fastest_any"]  # (a pick of no technique: the test checks the fastest point's report)
    assert list(rep)[0] == "ddim6-r0.00" and pick["key"] in rep and "ddim6-r0.40" in rep and "dpmpp_2m4-r0.00" in rep
    assert rep["dpmpp_2m4-r0.00"]["technique"] == "steps" and rep["dpmpp_2m4-r0.00"]["model_steps"] == [4]
    assert all(r["set"] == "report" and r["n"] == 10 for r in rep.values())
    with np.load(tmp_path / "sweep/report/points/ddim6-r0.00/samples.npz") as npz:
        assert list(npz["arr_1"]) == [k % 10 for k in range(10)]
        assert not np.array_equal(npz["arr_0"][:10], base_images[:10])  # other seeds, other images
    assert (result["pick"] or result["fastest_any"]) is not None
    if result["pick"] is not None:
        assert result["pick"] is rep[pick["key"]] and rep[pick["key"]]["pick"]
    record = json.loads((tmp_path / "sweep" / "frontier.json").read_text())
    assert record["seeds"]["selection"]["seeds"] == [0, 11] and record["seeds"]["report"]["seeds"] == [500, 509]
    assert record["pick"] == (result["selection_pick"] or {}).get("key") and record["pick_chosen_on"] == "selection"
    assert record["fastest_any_kind"] == result["fastest_any"]["key"]
    assert [r["set"] for r in record["report"]] == ["report"] * len(rep)
    assert [r["set"] for r in record["selection"]] == ["selection"] * 4
    assert "correct_svc" not in record["report"][0]
    # the files: tables, figures (where asked)
    md = (tmp_path / "sweep" / "frontier.md").read_text()
    assert md.index("## Report set") < md.index("## Selection set")
    table = (tmp_path / "docs" / "t.md").read_text()
    assert "| large alone, DDIM 6 | large alone | 0 / 6 |" in table and "| inf | 1.000 |" in table
    assert "| large alone, DPM++2M 4 | large alone, fewer steps / sampler | 0 / 4 |" in table
    for figure in ("f.png", "s.png"):
        assert (tmp_path / "docs" / figure).stat().st_size > 10_000
    assert (tmp_path / "sweep" / "frontier_selection.png").stat().st_size > 10_000

    # a rerun into the same folder keeps every sampled point (the run folders resume)
    stamps = {k: (tmp_path / "sweep/selection/points" / k / "samples.npz").stat().st_mtime_ns for k in sel}
    again = run_frontier(compose_frontier(*TINY, "timing.repeats=0"), compose_sample, tmp_path / "sweep",
                         progress=False)
    assert {k: (tmp_path / "sweep/selection/points" / k / "samples.npz").stat().st_mtime_ns for k in sel} == stamps
    assert [r["accuracy"] for r in again["selection_rows"]] == [r["accuracy"] for r in sel.values()]
    assert "seconds" not in again["rows"][0]
    assert json.loads((tmp_path / "sweep/frontier.json").read_text())["cost"] == "macs"
    assert (tmp_path / "sweep" / "frontier.png").stat().st_size > 10_000


def test_psnr_to_the_large_model_falls_as_the_fraction_rises(frontier_cfg, tmp_path):
    """PSNR / SSIM (scikit-image) to the large model alone's sample of the same seed: inf and 1 for the large
    model against itself, then lower the more steps the small model takes (0.2 -> 0.8)."""
    compose_frontier, compose_sample = frontier_cfg
    cfg = compose_frontier(*TINY, "timing.repeats=0", "seeds.selection.num_samples=20",
                           "grids=[{fractions: [0.2, 0.4, 0.6, 0.8]}]")
    cfg.run_overrides = ["sampler.steps=10", CKPTS[0]]
    rows = run_frontier(cfg, compose_sample, tmp_path, progress=False)["selection_rows"]
    assert [r["fraction"] for r in rows] == [0.0, 0.2, 0.4, 0.6, 0.8]
    psnr = [r["psnr"] for r in rows]
    assert psnr[0] == float("inf") and rows[0]["ssim"] == 1.0
    assert all(np.isfinite(psnr[1:])) and psnr[1] > psnr[2] > psnr[3] > psnr[4], psnr
    assert rows[1]["ssim"] > rows[4]["ssim"]


def test_the_base_experiments_own_point(frontier_cfg, tmp_path):
    """base_point: the base experiment's own sampler, steps, fraction and gate, read from its config, against the
    large model alone, on both sets."""
    compose_frontier, compose_sample = frontier_cfg
    cfg = compose_frontier(*TINY, "base_point=true", "grids=[]", "timing.repeats=1")
    cfg.base = ["+exp=digits_stitch_0.4"]
    result = run_frontier(cfg, compose_sample, tmp_path, progress=False)
    for rows in (result["selection_rows"], result["rows"]):
        base, own = rows[0], next(r for r in rows if r["base_point"])
        assert own["key"] == "ddim6-r0.40" and not base["base_point"] and own["technique"] == "tstitch"
    assert f"| {own['label']} (+exp=digits_stitch_0.4) |" in result["table"].replace("**", "")
    assert f"+exp=digits_stitch_0.4: {own['label']} ({own['key']}): " in result["summary"]
    gated = compose_sample(["+exp=digits_stitch_0.4", "accel=[tstitch,tgate]", "accel.tgate.gate_step=40",
                            "accel.tgate.sp_interval=2"])
    assert own_point(gated).key == "ddim50-r0.40-g40-sp2-fi1-wu2-cond"
    cached = compose_sample(["+exp=digits_stitch_0.4", "accel=[tstitch,taylorseer]", "sampler=dpmpp_2m",
                             "sampler.steps=20"])
    assert own_point(cached).key == "dpmpp_2m20-r0.40-taylorseer" and own_point(cached).technique == "caches"
    for bad, message in (({"hooks": {"deep_cache": {}}, "name": "deep_cache"}, "hooks \\['deep_cache'\\]"),
                         ({"hooks": {"pab": {}, "taylorseer": {}}}, "one cache"),
                         ({"hooks": {"tgate": {}, "pab": {}}}, "one cache"),
                         ({"hooks": {"tstitch": {}}, "tstitch": {"ratio": 0.4, "fractions": [0.2, 0.2, 0.6]}},
                          "several models")):
        with pytest.raises(ValueError, match=message):
            own_point(OmegaConf.create({"accel": bad, "sampler": {"name": "ddim", "steps": 6}}))


def test_bad_settings_fail_before_any_sampling(frontier_cfg, tmp_path):
    compose_frontier, compose_sample = frontier_cfg
    for overrides, run_overrides, message in (
            (["grids=[{fractions: [0.5], gates: [{gate_step: 0.5, sp_interval: 0}]}]"], [], "sp_interval=0"),
            (["seeds.selection.num_samples=1"], [], "seeds.selection.num_samples=1"),
            (["seeds.report.seed=5"], [], "overlap"),
            (["~accel.tgate"], [], "missing"),
            (["timing.repeats=-1"], [], "timing.repeats=-1"),
            (["pick.judges=[psnr]"], [], "pick.judges"),
            (["pick.frechet_tolerance=-0.1"], [], "pick.frechet_tolerance"),
            (["pick.same_steps_speedup=0.5"], [], "pick.same_steps_speedup=0.5"),
            (["pick.se_margin=-1"], [], "pick.se_margin=-1"),
            (["timing.compile_sets=[test]"], [], "timing.compile_sets"),
            (["pick.techniques=[cache]"], [], "pick.techniques"),
            (["quality=fid"], [], "quality='fid'"),
            (["report_grids=[{samplers: [heun]}]"], [], "heun"),
            ([], ["sampler.steps=0"], "steps"),
            ([], ["labels=[3,12]"], "labels=")):
        cfg = compose_frontier(*TINY, *overrides)
        cfg.run_overrides += run_overrides
        with pytest.raises(ValueError, match=message):
            run_frontier(cfg, compose_sample, tmp_path / "bad", progress=False)
        assert not (tmp_path / "bad" / "selection").exists()


@pytest.mark.slow
def test_the_script_runs_a_tiny_sweep(tmp_path):
    """scripts/frontier.py end to end (Hydra, composing each point inside the app), and its --help."""
    help_text = subprocess.run([sys.executable, str(ROOT / "scripts" / "frontier.py"), "--help"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout
    assert "speed-quality frontier" in help_text and "grids" in help_text
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "frontier.py"), *TINY, "timing.repeats=1",
                           f"hydra.run.dir={tmp_path}", "run_overrides=['sampler.steps=4']"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| large alone, DDIM 4 | large alone | 0 / 4 |" in proc.stdout
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    assert len(json.loads((tmp_path / "frontier.json").read_text())["selection"]) == 4


# --- +exp=digits_fast ---------------------------------------------------------------------------

def test_digits_fast_composes_and_its_baseline_is_the_large_model_alone(compose_sample):
    fast = compose_sample("+exp=digits_fast")
    base = compose_sample("+exp=digits_fast", "accel=none")
    # the protocol's pick (configs/frontier.yaml): S 0.4 -> L with FirstBlockCache, DPM-Solver++ 2M, 20 steps, cfg 1.5
    assert label(fast.accel) == "tstitch+first_block_cache"
    assert set(fast.accel.hooks) == {"tstitch", "first_block_cache"}
    assert fast.accel.models.small.name == "DiT-digits-S" and fast.model.name == "DiT-digits-L"
    assert fast.accel.models.small.ckpt == "checkpoints/digits/digits_s.pt"
    hooks = OmegaConf.to_container(fast.accel.hooks, resolve=True)
    assert hooks["tstitch"]["ratio"] == fast.accel.tstitch.ratio == 0.4
    assert hooks["first_block_cache"]["threshold"] == 0.2   # configs/accel/first_block_cache.yaml's, as swept
    assert (fast.sampler.name, fast.sampler.steps, fast.sampler.cfg_scale) == ("dpmpp_2m", 20, 1.5)
    assert own_point(fast).key == "dpmpp_2m20-r0.40-first_block_cache"   # the sweep point's key
    assert label(base.accel) == "none" and not stitched_models(base.accel) and not base.accel.hooks
    for key in ("model", "vae", "sampler", "schedule", "seed", "labels", "num_samples", "batch_size", "num_threads"):
        assert OmegaConf.select(base, key) == OmegaConf.select(fast, key), key


def test_digits_fast_is_the_recorded_pick_and_meets_the_claim(compose_sample):
    """docs/digits_frontier.json (the committed frontier.json of docs/frontier.md's sweep): chosen on the selection
    seeds, reported on disjoint ones, and +exp=digits_fast is its pick; on the report set the pick is >= 2x faster
    than the large model alone at the same sampler and steps and within 1 point of it by both classifiers."""
    record = json.loads((ROOT / "docs" / "digits_frontier.json").read_text())
    (a, b), (c, d) = record["seeds"]["selection"]["seeds"], record["seeds"]["report"]["seeds"]
    assert (b < c or d < a) and record["pick_chosen_on"] == "selection" and record["disjoint"]
    assert record["seeds"]["report"]["num_samples"] >= 2000
    assert own_point(compose_sample("+exp=digits_fast")).key == record["pick"]
    report = {r["key"]: r for r in record["report"]}
    assert {r["set"] for r in report.values()} == {"report"}
    pick = report[record["pick"]]
    same = report[pick["same_steps_key"]]
    assert (same["sampler"], same["steps"], same["technique"]) == (pick["sampler"], pick["steps"], "steps")
    assert pick["same_steps_speedup"] == pytest.approx(same["seconds"] / pick["seconds"])
    assert pick["same_steps_speedup"] >= 2.0
    for key in ("accuracy", "logreg_accuracy"):
        assert pick[key] >= same[key] - 0.01 and pick[key] >= record["report"][0][key] - 0.01


def test_digits_fast_samples_and_differs_from_its_baseline(compose_sample, tmp_path, run_latents):
    from runs.run import run_from_config

    tiny = ["num_samples=4", "batch_size=4", "progress=false", CKPTS[0]]
    fast = compose_sample("+exp=digits_fast", *tiny, CKPTS[1])
    base = compose_sample("+exp=digits_fast", "accel=none", *tiny)
    m_fast, m_base = run_from_config(fast, tmp_path / "fast"), run_from_config(base, tmp_path / "base")
    ratio = fast.accel.tstitch.ratio
    assert m_fast["steps_per_model"] == {"DiT-digits-S": round(20 * ratio), "DiT-digits-L": 20 - round(20 * ratio)}
    assert m_base["steps_per_model"] == {"DiT-digits-L": 20} and m_base["accel"] == "none"
    # the cache skips blocks of the large model's steps: fewer MACs spent than T-Stitch alone counts
    assert m_fast["macs_per_image_spent"] < m_fast["macs_per_image"] < m_base["macs_per_image"]
    assert not np.allclose(run_latents(tmp_path / "fast"), run_latents(tmp_path / "base"), atol=1e-3)


def test_tgate_keep_guidance_caches_self_attention_and_guides_every_step(compose_sample, tmp_path, run_latents):
    """accel=tgate accel.tgate.gate_step=${sampler.steps} (once accel=tgate_keep_guidance): the gate at the end
    (no step drops guidance), self-attention reused between
    its sp_interval refreshes; it samples other latents than the plain model, fewer MACs, more than accel=tgate."""
    from runs.run import run_from_config
    from tgate import Action, gate_actions

    tiny = ["+exp=digits_fast", "sampler.steps=10", "num_samples=4", "batch_size=4", "progress=false", CKPTS[0]]
    keep_guidance = ["accel=tgate", "accel.tgate.gate_step=${sampler.steps}", "accel.tgate.sp_interval=3",
                     "accel.tgate.warm_up=2"]
    keep = compose_sample(*tiny, *keep_guidance)
    assert keep.accel.tgate.gate_step == 10 and keep.accel.hooks.tgate.gate_step == 10
    settings = {k: keep.accel.tgate[k] for k in ("gate_step", "sp_interval", "fi_interval", "warm_up")}
    table = [gate_actions(s, **settings) for s in range(10)]
    assert all(a.guidance for a in table) and sum(a.self_attn is Action.REUSE for a in table) >= 4
    runs = {name: run_from_config(compose_sample(*tiny, *extra), tmp_path / name) for name, extra in (
        ("keep", keep_guidance), ("plain", ["accel=none"]),
        ("gated", ["accel=tgate", "accel.tgate.gate_step=5", "accel.tgate.sp_interval=3"]))}
    macs = {name: m["macs_per_image"] for name, m in runs.items()}
    assert macs["plain"] > macs["keep"] > macs["gated"]
    assert not torch.allclose(run_latents(tmp_path / "keep"), run_latents(tmp_path / "plain"), atol=1e-4)


# --- recipes (configs/frontier/*.yaml) -----------------------------------------------------------

@pytest.mark.parametrize("recipe", sorted(p.stem for p in (CONFIGS / "frontier").glob("*.yaml")))
def test_every_recipe_composes(recipe):
    """`scripts/frontier.py +frontier=<recipe>`: the recipe composes over configs/frontier.yaml, its grids make
    points, and every point's sampling config composes (configs/sample.yaml + base + the point's overrides)."""
    from benchmarks.frontier.sweep import _points, point_configs, sweep_points
    from runs.run import check_config

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            reference = ["evaluate.reference=/data/ref.npz"] if recipe == "dit_xl2_fid5k" else []
            overrides = [f"+frontier={recipe}", *reference]
            cfg = compose(config_name="frontier", overrides=overrides)
            assert cfg.seeds.selection.seed + cfg.seeds.selection.num_samples <= cfg.seeds.report.seed
            points, _ = sweep_points(cfg, lambda o: compose(config_name="sample", overrides=o))
            extra = _points(cfg, "report_grids", points[0].sampler, points[0].steps)
            assert len(points) > 2 and points[0].technique == "baseline"
            accel = OmegaConf.to_container(cfg.accel)
            for point in points + extra:
                run = compose(config_name="sample", overrides=[*cfg.base, *cfg.run_overrides, *point.overrides(accel)])
                assert run.sampler.name == point.sampler and run.sampler.steps == point.steps
                if run.model.get("kind") != "pipeline":  # native models: the sweep's own checks too
                    check_config(run)
            if recipe == "dit_xl2_fid5k":
                cfgs = point_configs(cfg, points[:2], lambda o: compose(config_name="sample", overrides=o), "report")
                assert all(c.evaluate.reference == "/data/ref.npz" and c.num_samples == 5000 for c in cfgs.values())
    finally:
        GlobalHydra.instance().clear()
