"""scripts/figures.py on real digits sweeps: T-Stitch's curve and T-GATE's MACs / latency / quality table."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from runs.run import run_from_config

from conftest import CONFIGS

ROOT = CONFIGS.parent
SCRIPTS = ROOT / "scripts"
DIGITS = ["+exp=digits_stitch_0.4", "sampler.steps=6", "num_samples=6", "batch_size=6", "progress=false",
          f"model.ckpt={ROOT / 'checkpoints/digits/digits_l.pt'}",
          f"family.stitch.small.ckpt={ROOT / 'checkpoints/digits/digits_s.pt'}"]


@pytest.fixture
def figures():
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec = importlib.util.spec_from_file_location("figures", SCRIPTS / "figures.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(SCRIPTS))


def _sweep(compose_sample, folder: Path, settings: list[list[str]]):
    """A sweep in Hydra's multirun layout (job k in folder/k with its .hydra/config.yaml), run in-process."""
    for k, overrides in enumerate(settings):
        cfg = compose_sample(*DIGITS, *overrides)
        job = folder / str(k)
        run_from_config(cfg, job)
        (job / ".hydra").mkdir()
        OmegaConf.save(cfg, job / ".hydra" / "config.yaml")


def test_tgate_table_on_a_digits_sweep(compose_sample, figures, tmp_path):
    """The large digits model plain and with two T-GATE settings: MACs fall, the table says by how much."""
    _sweep(compose_sample, tmp_path, [
        ["accel=[tstitch,tgate]", "accel.tstitch.ratio=0.0", f"accel.tgate.gate_step={g}",
         "accel.tgate.sp_interval=2", "accel.tgate.warm_up=1"] for g in (6, 3, 2)])
    assert figures.main(["--kind", "tgate", str(tmp_path), "--table", str(tmp_path / "t.md")]) == 0
    table = (tmp_path / "t.md").read_text().splitlines()
    assert table[0] == "| setting | MACs / image | latency s / image | speed-up | MACs saved | Fréchet (digits) |"
    assert table[2].startswith("| baseline | ") and "| 1.00x | 0.0% |" in table[2]
    assert table[3].startswith("| T-GATE g3 sp2 fi1 wu1 |") and table[4].startswith("| T-GATE g2 sp2 fi1 wu1 |")
    macs = [json.loads((tmp_path / k / "metrics.json").read_text())["macs_per_image"] for k in "012"]
    assert macs[0] > macs[1] > macs[2]
    assert f"| {1 - macs[2] / macs[0]:.1%} |" in table[4]
    assert (tmp_path / "tgate.png").stat().st_size > 1000
    # with FID in metrics.json (scripts/evaluate.py --reference), the table shows FID instead
    for k, fid in zip("012", (5.0, 5.5, 6.25), strict=True):
        m = json.loads((tmp_path / k / "metrics.json").read_text())
        (tmp_path / k / "metrics.json").write_text(json.dumps({**m, "fid": fid, "inception_score": 2.0}))
    assert figures.main(["--kind", "tgate", str(tmp_path), "--table", str(tmp_path / "t.md")]) == 0
    table = (tmp_path / "t.md").read_text().splitlines()
    assert table[0].endswith("| FID |") and table[4].endswith("| 6.25 |")


def test_tstitch_figure_on_a_digits_sweep(compose_sample, figures, tmp_path):
    _sweep(compose_sample, tmp_path, [[f"accel.tstitch.ratio={r}"] for r in (0.0, 0.5, 1.0)])
    assert figures.main([str(tmp_path), "--table", str(tmp_path / "t.md"), "--out", str(tmp_path / "f.png")]) == 0
    table = (tmp_path / "t.md").read_text()
    assert "| 0.0 | 0 / 6 |" in table and "| 0.5 | 3 / 3 |" in table and "| 1.0 | 6 / 0 |" in table
    assert (tmp_path / "f.png").stat().st_size > 1000
    assert all((tmp_path / k / "eval.json").is_file() for k in "012")  # the digits measure, computed when missing
    assert figures.main([str(tmp_path / "nothing")]) == 2
