"""T-GATE on diffusers pipelines: parity of `pipe.tgate(...)` with the reference tgate 1.0.0.

Both packages run the same tiny random-weight pipelines (saved once with
save_pretrained) with the same seeded generator; the reference runs in a subprocess
whose PYTHONPATH holds only it (it is also called `tgate`).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tgate

from tgate_parity import CASES, call_arguments, output_latents, run_case
from tiny_pipelines import load_tiny, save_tiny

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def tiny_dir(tiny_pipelines_dir):
    folder = tiny_pipelines_dir
    for kind in sorted({case[0] for case in CASES.values()}):
        save_tiny(kind, folder)
    return folder


@pytest.fixture(scope="session")
def reference_latents(tiny_dir, tgate_reference_dir, tmp_path_factory):
    """Latents of every parity case from tgate 1.0.0, computed in one subprocess."""
    work = tmp_path_factory.mktemp("tgate_reference_run")
    out = work / "latents.pt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tgate_reference_dir), str(TESTS)]))
    proc = subprocess.run([sys.executable, str(TESTS / "tgate_reference_run.py"), str(tiny_dir), str(out),
                           *CASES], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    saved = torch.load(out, weights_only=True)
    assert Path(saved["tgate_file"]).resolve().is_relative_to(Path(tgate_reference_dir).resolve())
    return saved["latents"]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("case", list(CASES))
def test_loader_matches_tgate_1_0_0(case, tiny_dir, reference_latents):
    kind = CASES[case][0]
    pipe = load_tiny(kind, tiny_dir)
    ours = run_case(tgate, case, tiny_dir, pipe=pipe)
    ref = reference_latents[case]
    assert ours.shape == ref.shape
    assert relative_error(ours, ref) <= 1e-5, (case, relative_error(ours, ref))
    # the gate changed something (parity with a no-op would prove nothing) ...
    with torch.no_grad():
        plain = output_latents(pipe(**call_arguments_plain(case)))
    assert relative_error(plain, ref) > 1e-4
    # ... and left the pipeline as it was: the plain call after pipe.tgate is the stock one
    fresh = load_tiny(kind, tiny_dir)
    with torch.no_grad():
        stock = output_latents(fresh(**call_arguments_plain(case)))
    assert torch.equal(plain, stock)
    assert type(pipe) is type(fresh) and not tgate.is_gated(pipe)


def call_arguments_plain(case):
    call = call_arguments(case)
    for key in ("gate_step", "sp_interval", "fi_interval", "warm_up", "lcm"):
        call.pop(key, None)
    return call
