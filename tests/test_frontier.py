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
    BASELINE,
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

from conftest import CONFIGS

ROOT = CONFIGS.parent
CKPTS = [f"model.ckpt={ROOT / 'checkpoints/digits/digits_l.pt'}",
         f"accel.models.small.ckpt={ROOT / 'checkpoints/digits/digits_s.pt'}"]
# 2 x 2 points: the large model alone, T-Stitch 0.4 (2 of 6 steps), T-GATE g3, both; 6 DDIM steps, 12 samples
TINY = ["base_point=false", "num_samples=12", "batch_size=6", "timing.num_samples=4", "timing.batch_size=4",
        "timing.repeats=2", "timing.warmup=0", "grids=[{fractions: [0.0, 0.4], gates: [null, {gate_step: 3}]}]"]


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
        if cfg.accel.get("models"):  # absolute checkpoint paths: tests may run from any folder
            cfg.accel.models.small.ckpt = CKPTS[1].split("=", 1)[1]
        return cfg

    yield _compose, _compose_sample
    GlobalHydra.instance().clear()


def test_points_of_a_grid():
    points = grid_points([{"name": "a", "fractions": [0.0, 0.5], "gates": [None, {"gate_step": 3}]},
                          {"fractions": [0.5], "gates": [None, {"gate_step": 3, "sp_interval": 2}]}],
                         {"warm_up": 1})
    assert points[0] == BASELINE and len(points) == 5  # the large model alone first, each point once
    assert [p.technique for p in points] == ["baseline", "tstitch", "tgate", "combined", "combined"]
    assert points[2].gate == Gate(3, warm_up=1) and points[4].gate == Gate(3, sp_interval=2, warm_up=1)
    accel = {"baseline": "none", "tstitch": "ts", "tgate": "tg", "combined": "both"}
    assert BASELINE.overrides(accel) == ["accel=none"]
    assert points[3].overrides(accel) == ["accel=both", "accel.tstitch.ratio=0.5", "accel.tgate.gate_step=3",
                                          "accel.tgate.sp_interval=1", "accel.tgate.fi_interval=1",
                                          "accel.tgate.warm_up=1", "accel.tgate.branch=cond"]
    assert points[4].key == "r0.50-g3-sp2-fi1-wu1-cond" and points[4].short_label == "S0.5 g3 sp2"
    assert Point(0.0, Gate(25, branch="uncond")).label == "g25 sp1 fi1 wu2 uncond"


@pytest.mark.parametrize("grids, message", [
    ([{"fractions": [1.5]}], "grids[0].fractions[0]=1.5"),
    ([{"gates": [{"gate_step": 0}]}], "gate_step=0"),
    ([{"gates": [{"gate_step": 3, "branch": "both"}]}], "branch='both'"),
    ([{"gates": [{"gate_step": 3, "gate": 2}]}], "unknown keys ['gate']"),
    ([{"gates": [{"sp_interval": 2}]}], "needs gate_step"),
    ([{"fractions": [], "gates": [None]}], "must not be empty"),
    ([{"fraction": [0.5]}], "unknown keys ['fraction']"),
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
    rows = [{"key": "L", "technique": "baseline", "macs": 10, "accuracy": 0.98, "frechet": 30},
            {"key": "a", "technique": "tstitch", "macs": 6, "accuracy": 0.975, "frechet": 31},
            {"key": "b", "technique": "tstitch", "macs": 7, "accuracy": 0.96, "frechet": 29},   # dominated by a
            {"key": "c", "technique": "tgate", "macs": 4, "accuracy": 0.90, "frechet": 50},
            {"key": "d", "technique": "combined", "macs": 5, "accuracy": 0.971, "frechet": 28}]
    assert [r["key"] for r in pareto_front(rows, "macs", "accuracy")] == ["c", "d", "a", "L"]
    assert [r["key"] for r in pareto_front(rows, "macs", "frechet", higher_is_better=False)] == ["c", "d"]
    assert pick_fastest(rows, 0.01, "macs")["key"] == "d"    # 0.9 points below: within 1 point
    assert pick_fastest(rows, 0.006, "macs")["key"] == "a"
    assert pick_fastest(rows, 0.1, "macs")["key"] == "c"
    assert pick_fastest(rows, 0.0, "macs")["key"] == "L"


def test_timing_is_round_robin(monkeypatch, frontier_cfg):
    """Repeat 1 of every point, then repeat 2, ...; warm-up rounds are not recorded."""
    _, compose_sample = frontier_cfg
    calls = []

    def fake_seconds(self, batch_size):
        calls.append((self.cfg.accel.name, batch_size))
        return float(len(calls))

    monkeypatch.setattr(frontier_timing.TimedRun, "seconds", fake_seconds)
    cfgs = {k: compose_sample(["+exp=digits_fast", f"accel={k}", CKPTS[0]]) for k in ("none", "tgate")}
    times = frontier_timing.time_round_robin(cfgs, num_samples=4, batch_size=2, repeats=3, warmup=1, progress=False)
    assert calls == [("none", 2), ("tgate", 2)] * 4
    assert times["none"] == {"seconds": 5.0, "runs": [3.0, 5.0, 7.0]}
    assert times["tgate"] == {"seconds": 6.0, "runs": [4.0, 6.0, 8.0]}
    with pytest.raises(ValueError, match="repeats=0"):
        frontier_timing.time_round_robin(cfgs, num_samples=4, batch_size=2, repeats=0)


def test_timed_run_samples_what_the_run_samples(frontier_cfg, tmp_path, run_latents, monkeypatch):
    """The timed run is the point's run: same models, hooks, seeds and labels (its latents are the run's,
    whatever the batch size), and a point with other settings gives other latents."""
    from runs.run import run_from_config

    _, compose_sample = frontier_cfg
    tiny = ["+exp=digits_fast", CKPTS[0], "sampler.steps=6", "num_samples=4", "batch_size=4", "progress=false"]
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
    assert torch.equal(torch.cat(recorded[:2]), run_latents(tmp_path / "run"))
    assert not torch.allclose(torch.cat(recorded[2:]), run_latents(tmp_path / "run"), atol=1e-4)


def test_tiny_sweep_writes_table_figure_and_numbers(frontier_cfg, tmp_path):
    compose_frontier, compose_sample = frontier_cfg
    cfg = compose_frontier(*TINY, f"figure={tmp_path / 'docs' / 'f.png'}", f"table={tmp_path / 'docs' / 't.md'}")
    result = run_frontier(cfg, compose_sample, tmp_path / "sweep", progress=False)
    rows = {r["key"]: r for r in result["rows"]}
    assert list(rows) == ["r0.00", "r0.40", "r0.00-g3-sp1-fi1-wu2-cond", "r0.40-g3-sp1-fi1-wu2-cond"]
    base, stitch, gate, both = rows.values()
    assert [r["technique"] for r in rows.values()] == ["baseline", "tstitch", "tgate", "combined"]
    assert base["models"] == ["DiT-digits-L"] and base["steps"] == [6]
    assert stitch["models"] == both["models"] == ["DiT-digits-S", "DiT-digits-L"]
    assert stitch["steps"] == both["steps"] == [2, 4] and gate["steps"] == [6]
    assert base["macs"] > stitch["macs"] > both["macs"] and base["macs"] > gate["macs"] > both["macs"]
    # quality: the digits measure of each point's own samples, all points on the same labels
    for key, row in rows.items():
        with np.load(tmp_path / "sweep" / "points" / key / "samples.npz") as npz:
            assert row["accuracy"] == evaluate_digits(npz["arr_0"], npz["arr_1"])["accuracy"]
            assert list(npz["arr_1"]) == [k % 10 for k in range(12)]
            if key != "r0.00":  # the points differ from the baseline: their samples are not the same
                assert not np.array_equal(npz["arr_0"], np.load(tmp_path / "sweep/points/r0.00/samples.npz")["arr_0"])
        assert row["n"] == 12 and len(row["seconds_runs"]) == 2 and row["seconds"] > 0
    assert base["delta"] == 0.0 and base["speedup"] == 1.0 and base["macs_speedup"] == 1.0
    # the files: table (in the run folder and where asked), numbers, figure
    table = (tmp_path / "sweep" / "frontier.md").read_text()
    assert (tmp_path / "docs" / "t.md").read_text() == table
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + 4 and lines[0].startswith("| setting | technique | steps S / L | MACs / image |")
    assert lines[1].startswith("| large alone | large alone | 0 / 6 |") and "| 1.00x |" in lines[1]
    assert lines[2].startswith("| S 0.4 | T-Stitch | 2 / 4 |")
    assert lines[4].split(" | ")[1] == "T-Stitch + T-GATE"
    assert f"{base['macs'] / both['macs']:.2f}x" in lines[4]
    record = json.loads((tmp_path / "sweep" / "frontier.json").read_text())
    assert [r["key"] for r in record["rows"]] == list(rows) and record["cost"] == "seconds"
    assert record["pick"] == (result["pick"] and result["pick"]["key"])
    ok = [r for r in rows.values() if r["accuracy"] >= base["accuracy"] - 0.01]
    assert result["pick"] is min(ok, key=lambda r: r["seconds"])
    for figure in (tmp_path / "docs" / "f.png",):
        assert figure.stat().st_size > 10_000
    assert not (tmp_path / "sweep" / "frontier.png").exists()  # written where asked instead

    # a rerun into the same folder keeps every sampled point (the run folders resume)
    stamps = {k: (tmp_path / "sweep/points" / k / "samples.npz").stat().st_mtime_ns for k in rows}
    cfg2 = compose_frontier(*TINY, "timing.repeats=0")
    again = run_frontier(cfg2, compose_sample, tmp_path / "sweep", progress=False)
    assert {k: (tmp_path / "sweep/points" / k / "samples.npz").stat().st_mtime_ns for k in rows} == stamps
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in rows.values()]
    assert "seconds" not in again["rows"][0]
    assert json.loads((tmp_path / "sweep/frontier.json").read_text())["cost"] == "macs"
    assert (tmp_path / "sweep" / "frontier.png").stat().st_size > 10_000


def test_the_base_experiments_own_point(frontier_cfg, tmp_path):
    """base_point: +exp=digits_fast's own fraction and gate, read from its config, against the large model alone."""
    compose_frontier, compose_sample = frontier_cfg
    fast = compose_sample(["+exp=digits_fast"])
    cfg = compose_frontier(*TINY, "base_point=true", "grids=[]", "timing.repeats=1")
    result = run_frontier(cfg, compose_sample, tmp_path, progress=False)
    base, own = result["rows"]
    g = fast.accel.tgate
    assert own["key"] == (f"r{fast.accel.tstitch.ratio:.2f}-g{g.gate_step}-sp{g.sp_interval}-fi{g.fi_interval}"
                          f"-wu{g.warm_up}-{g.branch}")
    assert own["base_point"] and not base["base_point"] and own["technique"] == "combined"
    assert f"| {own['label']} (+exp=digits_fast) |" in result["table"].replace("**", "")
    assert f"+exp=digits_fast: {own['label']} ({own['key']}): " in result["summary"]
    for bad, message in (({"hooks": {"deep_cache": {}}, "name": "deep_cache"}, "hooks \\['deep_cache'\\]"),
                         ({"hooks": {"tstitch": {}}, "tstitch": {"ratio": 0.4, "fractions": [0.2, 0.2, 0.6]}},
                          "several models")):
        with pytest.raises(ValueError, match=message):
            own_point(OmegaConf.create({"accel": bad}))


def test_bad_settings_fail_before_any_sampling(frontier_cfg, tmp_path):
    compose_frontier, compose_sample = frontier_cfg
    for overrides, run_overrides, message in (
            (["grids=[{fractions: [0.5], gates: [{gate_step: 3, sp_interval: 0}]}]"], [], "sp_interval=0"),
            (["num_samples=1"], [], "num_samples=1"),
            (["~accel.tgate"], [], "missing"),
            (["timing.repeats=-1"], [], "timing.repeats=-1"),
            ([], ["sampler.steps=0"], "steps=0"),
            ([], ["labels=[3,12]"], "labels=")):
        cfg = compose_frontier(*TINY, *overrides)
        cfg.run_overrides += run_overrides
        with pytest.raises(ValueError, match=message):
            run_frontier(cfg, compose_sample, tmp_path / "bad", progress=False)
        assert not (tmp_path / "bad" / "points").exists()


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
    assert "| large alone | large alone | 0 / 4 |" in proc.stdout
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    assert len(json.loads((tmp_path / "frontier.json").read_text())["rows"]) == 4


# --- +exp=digits_fast ---------------------------------------------------------------------------

def test_digits_fast_composes_and_its_baseline_is_the_large_model_alone(compose_sample):
    fast = compose_sample("+exp=digits_fast")
    base = compose_sample("+exp=digits_fast", "accel=none")
    assert fast.accel.name == "tstitch_digits_tgate_fast" and set(fast.accel.hooks) == {"tstitch", "tgate"}
    assert fast.accel.models.small.name == "DiT-digits-S" and fast.model.name == "DiT-digits-L"
    assert fast.accel.models.small.ckpt == "checkpoints/digits/digits_s.pt"
    hooks = OmegaConf.to_container(fast.accel.hooks, resolve=True)
    assert hooks["tstitch"]["ratio"] == fast.accel.tstitch.ratio > 0
    assert hooks["tgate"]["gate_step"] == fast.accel.tgate.gate_step < fast.sampler.steps
    assert base.accel.name == "none" and not base.accel.models and not base.accel.hooks
    for key in ("model", "vae", "sampler", "schedule", "seed", "labels", "num_samples", "batch_size", "num_threads"):
        assert OmegaConf.select(base, key) == OmegaConf.select(fast, key), key


def test_digits_fast_samples_and_differs_from_its_baseline(compose_sample, tmp_path, run_latents):
    from runs.run import run_from_config

    tiny = ["sampler.steps=10", "num_samples=4", "batch_size=4", "progress=false", CKPTS[0]]
    fast = compose_sample("+exp=digits_fast", *tiny, CKPTS[1])
    base = compose_sample("+exp=digits_fast", "accel=none", *tiny)
    m_fast, m_base = run_from_config(fast, tmp_path / "fast"), run_from_config(base, tmp_path / "base")
    ratio = fast.accel.tstitch.ratio
    assert m_fast["steps_per_model"] == {"DiT-digits-S": round(10 * ratio), "DiT-digits-L": 10 - round(10 * ratio)}
    assert m_base["steps_per_model"] == {"DiT-digits-L": 10} and m_base["accel"] == "none"
    assert m_fast["macs_per_image"] < m_base["macs_per_image"]
    assert not np.allclose(run_latents(tmp_path / "fast"), run_latents(tmp_path / "base"), atol=1e-3)


def test_tgate_keep_guidance_caches_self_attention_and_guides_every_step(compose_sample, tmp_path, run_latents):
    """accel=tgate_keep_guidance: the gate at the end (no step drops guidance), self-attention reused between
    its sp_interval refreshes; it samples other latents than the plain model, fewer MACs, more than accel=tgate."""
    from runs.run import run_from_config
    from tgate import Action, gate_actions

    tiny = ["+exp=digits_fast", "sampler.steps=10", "num_samples=4", "batch_size=4", "progress=false", CKPTS[0]]
    keep = compose_sample(*tiny, "accel=tgate_keep_guidance")
    assert keep.accel.tgate.gate_step == 10 and keep.accel.hooks.tgate.gate_step == 10
    settings = {k: keep.accel.tgate[k] for k in ("gate_step", "sp_interval", "fi_interval", "warm_up")}
    table = [gate_actions(s, **settings) for s in range(10)]
    assert all(a.guidance for a in table) and sum(a.self_attn is Action.REUSE for a in table) >= 4
    runs = {name: run_from_config(compose_sample(*tiny, *extra), tmp_path / name) for name, extra in (
        ("keep", ["accel=tgate_keep_guidance"]), ("plain", ["accel=none"]),
        ("gated", ["accel=tgate", "accel.tgate.gate_step=5", "accel.tgate.sp_interval=3"]))}
    macs = {name: m["macs_per_image"] for name, m in runs.items()}
    assert macs["plain"] > macs["keep"] > macs["gated"]
    assert not torch.allclose(run_latents(tmp_path / "keep"), run_latents(tmp_path / "plain"), atol=1e-4)
