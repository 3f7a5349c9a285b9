"""The demo's logic without a browser: settings checks, the runs behind Generate and Sweep, the report.

No gradio needed: demo.backend, demo.settings and demo.report import none of it.
"""
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from demo import pairs as pairs_module
from demo.backend import DemoBackend, DemoError
from demo.pairs import PAIRS, ModelPair
from demo.report import gallery_items, generate_summary, sweep_figure, sweep_table
from demo.settings import SettingsError, parse_fractions, parse_settings
from runs.run import run_from_config

ROOT = Path(__file__).resolve().parents[1]


def digits_settings(**changes):
    values = dict(fraction=0.4, sampler="ddim", steps=6, cfg_scale=1.5, seed=3, num_samples=4,
                  labels="0, 1, 2, 3", tgate=False, gate_step=4, sp_interval=2, fi_interval=1, warm_up=1)
    values.update(changes)
    return parse_settings("digits", **values)


@pytest.fixture(scope="module")
def backend():
    return DemoBackend(num_threads=1)


@pytest.mark.parametrize("changes, words", [
    (dict(fraction=1.5), ["small-model fraction=1.5", "<= 1"]),
    (dict(fraction=float("nan")), ["small-model fraction", "a number >= 0"]),
    (dict(steps=0), ["steps=0", "whole number >= 1"]),
    (dict(steps=2.5), ["steps=2.5", "whole number"]),
    (dict(steps=None), ["steps is empty"]),
    (dict(num_samples=-1), ["number of images=-1"]),
    (dict(cfg_scale="abc"), ["guidance scale='abc' is not a number"]),
    (dict(labels="3, x"), ["class label 'x'", "0..9"]),
    (dict(labels="3, 10"), ["class label '10'", "0..9"]),
    (dict(labels=" "), ["class labels are empty"]),
    (dict(sampler="plms"), ["sampler='plms'", "ddim"]),
    (dict(gate_step=0), ["T-GATE gate step=0"]),
    (dict(warm_up=-1), ["T-GATE warm_up=-1"]),
    (dict(weights={"small": "${oc.env:HOME}/x.pt"}), ["'${' is not allowed"]),   # no OmegaConf resolution of typed text
])
def test_bad_settings_name_the_value_and_what_is_allowed(changes, words):
    with pytest.raises(SettingsError) as info:
        digits_settings(**changes)
    for word in words:
        assert word in str(info.value)


def test_settings_parse_page_values():
    s = digits_settings(steps=6.0, num_samples="4", labels="7,1  2", weights={"large": " ", "small": "x.pt"})
    assert (s.steps, s.num_samples, s.labels) == (6, 4, (7, 1, 2))
    assert s.weights == (("small", "x.pt"),)   # blank slots keep the pair's default
    assert parse_fractions("1, 0 0.5,0.5") == (0.0, 0.5, 1.0)
    with pytest.raises(SettingsError, match="sweep fraction"):
        parse_fractions("0, 2")


def test_generate_is_what_the_command_line_run_gives(backend, compose_sample, tmp_path, monkeypatch):
    """The page's run and scripts/sample.py's path with the same settings: the same images, bit for bit."""
    settings = digits_settings(fraction=0.5)
    result = backend.generate(settings)
    monkeypatch.chdir(ROOT)  # the configs name the checkpoints relative to the repository root
    cfg = compose_sample("+exp=digits_stitch_0.4", "accel.tstitch.ratio=0.5", "sampler.steps=6", "seed=3",
                         "num_samples=4", "batch_size=4", "labels=[0,1,2,3]", "progress=false")
    metrics = run_from_config(cfg, tmp_path)
    with np.load(tmp_path / "samples.npz") as npz:
        np.testing.assert_array_equal(result.run.images, npz["arr_0"])
        np.testing.assert_array_equal(result.run.labels, npz["arr_1"])
    assert result.run.metrics["steps_per_model"] == {"DiT-digits-S": 3, "DiT-digits-L": 3}
    assert result.run.macs_per_image == metrics["macs_per_image"]
    assert result.run.images.shape == (4, 8, 8, 3)


def test_speedup_is_against_the_large_model_alone(backend):
    result = backend.generate(digits_settings(fraction=0.5))
    ref = result.large_alone
    assert ref.metrics["steps_per_model"] == {"DiT-digits-S": 0, "DiT-digits-L": 6}
    # large alone, no gating: every step is one forward per CFG row
    forward = ref.metrics["macs_per_forward"]["DiT-digits-L"]
    assert ref.macs_per_image == 6 * 2 * forward
    assert result.large_name == "DiT-digits-L"
    assert result.macs_speedup == pytest.approx(ref.macs_per_image / result.run.macs_per_image)
    assert result.macs_speedup > 1.5
    assert result.time_speedup == pytest.approx(ref.sampling_seconds / result.run.sampling_seconds)
    # cached: a second click with another fraction times the large model no more
    again = backend.generate(digits_settings(fraction=0.25))
    assert again.large_alone is ref
    text = generate_summary(again)
    assert "Sampling time:" in text and "DiT-digits-S 2, DiT-digits-L 4" in text and "DiT-digits-L alone" in text


def test_tgate_from_the_page_cuts_macs(backend):
    plain = backend.generate(digits_settings(fraction=0.0))
    gated = backend.generate(digits_settings(fraction=0.0, tgate=True, gate_step=3))
    assert gated.run.metrics["accel"] == "tstitch+tgate"
    assert gated.run.macs_per_image < plain.run.macs_per_image
    assert gated.large_alone is plain.run   # the reference ignores the gate


def test_core_checks_reach_the_page_as_messages(backend):
    """A value the page's checks let through but the run refuses comes back as a DemoError with the core's words."""
    bad = replace(digits_settings(), steps=0)   # bypasses parse_settings
    with pytest.raises(DemoError, match=r"sampler.steps=0: must be an integer >= 1"):
        backend.run(bad)


def test_missing_weights_say_which_box_to_fill(backend, tmp_path):
    missing = tmp_path / "nowhere" / "digits_s.pt"
    with pytest.raises(DemoError) as info:
        backend.run(digits_settings(weights={"small": str(missing)}))
    message = str(info.value)
    assert "Weights missing" in message and str(missing) in message and "small model weights" in message
    # the DiT pair's small model (T-Stitch's dit_s_256.pt) is not shipped: the page says so before any model is built
    dit = parse_settings("dit", fraction=0.4, sampler="ddim", steps=2, cfg_scale=1.5, seed=0, num_samples=1,
                         labels="1", weights={"small": "pretrained_models/not_here.pt"})
    with pytest.raises(DemoError, match="small model weights 'pretrained_models/not_here.pt' do not exist"):
        backend.run(dit)


def test_a_pair_not_in_this_build_is_a_message(backend, monkeypatch):
    future = ModelPair(key="future", label="future pair", overrides=("+exp=not_there_yet",),
                       weights={"large": "model.ckpt"}, requires=("exp/not_there_yet.yaml",), needs="issue 99",
                       num_classes=10, labels="1")
    monkeypatch.setitem(PAIRS, "future", future)
    settings = parse_settings("future", fraction=0.4, sampler="ddim", steps=2, cfg_scale=1.5, seed=0,
                              num_samples=1, labels="1")
    with pytest.raises(DemoError, match=r"not in this build: it needs configs/exp/not_there_yet.yaml \(issue 99\)"):
        backend.run(settings)


def test_every_listed_pair_composes_or_says_what_is_missing(backend):
    for pair in PAIRS.values():
        if pair.availability_error():
            assert pair.missing_configs()
            continue
        settings = parse_settings(pair.key, fraction=pair.fraction, sampler=pair.sampler, steps=pair.steps,
                                  cfg_scale=pair.cfg_scale, seed=0, num_samples=pair.num_samples, labels=pair.labels,
                                  prompt=pair.prompt, random_weights=True)
        cfg = backend.compose(settings)
        assert float(cfg.accel.tstitch.ratio) == pair.fraction and int(cfg.sampler.steps) == pair.steps
        gated = backend.compose(replace(settings, tgate=True))   # the pair's T-Stitch + T-GATE accel config
        entries = set(gated.accel.hooks) | set(gated.accel.get("pipeline") or {})  # native hooks / pipeline entries
        assert {"tgate", "tstitch"} <= entries
        assert [str(m.name) for m in gated.accel.models.values()] == [str(m.name) for m in cfg.accel.models.values()]
    assert not pairs_module.PAIRS["digits"].availability_error()


def test_sweep_gives_quality_and_time_per_fraction(backend):
    points = backend.sweep(digits_settings(steps=4), (0.0, 1.0), num_samples=10)
    assert [p.fraction for p in points] == [0.0, 1.0]
    assert [p.steps_per_model for p in points] == [{"DiT-digits-S": 0, "DiT-digits-L": 4},
                                                   {"DiT-digits-S": 4, "DiT-digits-L": 0}]
    assert all(0.0 <= p.accuracy <= 1.0 and p.sampling_seconds > 0 for p in points)
    assert points[1].macs_per_image < points[0].macs_per_image
    table = sweep_table(points)
    assert "| 1 | 4 / 0 |" in table and "1.00x" in table
    fig = sweep_figure(points)
    assert len(fig.axes) == 2   # quality and time


def test_gallery_enlarges_small_images():
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    items = gallery_items(images, np.array([3, 4]), show_labels=True)
    assert items[0][0].size == (96, 96) and items[1][1] == "class 4"


def test_script_help_and_check_without_a_server(capsys):
    import importlib.util
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "scripts/demo.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "--port" in done.stdout and "--share" in done.stdout
    # --check runs one click in the console; a pair without its weights ends with the page's message
    spec = importlib.util.spec_from_file_location("demo_script", ROOT / "scripts" / "demo.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--check", "dit"]) == 1
    assert "Error: Weights missing: the small model weights 'pretrained_models/dit_s_256.pt' do not exist" \
        in capsys.readouterr().err
