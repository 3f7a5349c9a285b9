"""scripts/bench_peers.py on a tiny setting: every row runs on the same weights and noise, the table is written."""
import json
import os
import subprocess
import sys

from conftest import CONFIGS

ROOT = CONFIGS.parent


def test_bench_peers_writes_the_table(tmp_path):
    cmd = [sys.executable, "scripts/bench_peers.py", "models=[DiT-S/8]", "small=DiT-S/8", "image_size=64", "steps=2",
           "repeats=1", "warmup=1", "compile_backend=eager", f"hydra.run.dir={tmp_path}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| (c) | ours, eager fp32 |" in (tmp_path / "bench_peers.md").read_text()
    rows = {r["row"]: r for r in json.loads((tmp_path / "bench_peers.json").read_text())["tables"]["DiT-S/8"]}
    assert list(rows) == ["a", "b", "c", "d", "e", "e+"]  # no T-Stitch rows: the small model is the model
    assert rows["c"]["max_abs_diff_from_c"] == 0 and rows["d"]["max_abs_diff_from_c"] < 1e-4  # compiled = eager
    assert rows["e"]["max_abs_diff_from_c"] > 0  # bf16 differs: the column measures something
    assert rows["a"]["max_abs_diff_from_c"] > 0  # diffusers' timestep frequencies (half - 1)
    assert rows["b"]["vae_decode_seconds_per_image"] > 0 and all(r["seconds_per_image"] > 0 for r in rows.values())
