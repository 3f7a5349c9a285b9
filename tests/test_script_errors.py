"""Every script's bad-input path: one `error: <key>=<value>: ...` line on stderr, exit status 2, no
traceback (HYDRA_FULL_ERROR=1 brings the traceback back); bugs keep their traceback."""
import os

import pytest
from omegaconf import OmegaConf

from diffusion.errors import UserError
from runs.config_keys import name_config_key
from runs.script import composition_error, job_error

from conftest import CONFIGS
from script_runner import run_in_one_process

ROOT = CONFIGS.parent

# script, its arguments with one bad value, the start of the line it must print
CASES = {
    "sample": (["+exp=digits_stitch_0.4", "accel.tstitch.ratio=1.5"], "error: accel.tstitch.ratio=1.5: "),
    "sample_group": (["sampler=plms"], "error: sampler=plms: allowed: ddim, "),
    "sample_override": (["sampler.steps=["], "error: sampler.steps=[: "),
    "sample_unknown_key": (["+exp=digits_stitch_0.4", "sampler.stpes=5"],
                           "error: sampler.stpes=5: the config has no key"),
    "train": (["steps=0"], "error: steps=0: "),
    "count_macs": (["model=dit_s2", "accel=tgate", "accel.tgate.gate_step=0"], "error: accel.tgate.gate_step=0: "),
    "frontier": (["pick.tolerance=2"], "error: pick.tolerance=2: "),
    "bench": (["ratios=[0.5,1.5]"], "error: ratios=[0.5, 1.5]: "),
    "bench_tgate": (["tgate.gate_step=0"], "error: tgate.gate_step=0: "),
    "bench_deep_cache": (["deep_cache.cache_interval=0"], "error: deep_cache.cache_interval=0: "),
    "bench_peers": (["ratio=2"], "error: ratio=2: "),
    "evaluate": (["--dims", "5", "somewhere"], "error: --dims=5: choose from 64, 192, 768, 2048"),
    "evaluate_folders": (["{tmp}/nothing"], "error: runs={tmp}/nothing: no samples.npz"),
    "evaluate_reference": (["{tmp}", "--reference", "{tmp}/none.npz"],
                           "error: --reference={tmp}/none.npz: no such file"),
    "figures": (["--kind", "foo", "x"], "error: --kind=foo: choose from"),
    "figures_folders": (["{tmp}/nothing"], "error: sweeps={tmp}/nothing: no jobs"),
    "demo": (["--port", "abc"], "error: --port=abc: must be of type int"),
}
HYDRA_SCRIPTS = {"sample", "train", "count_macs", "frontier", "bench", "bench_tgate", "bench_deep_cache", "bench_peers"}


def test_every_script_has_a_case():
    scripts = {p.stem for p in (ROOT / "scripts").glob("*.py")}
    assert scripts == {case.split("_group")[0].split("_override")[0].split("_unknown")[0].split("_folders")[0]
                       .split("_reference")[0] for case in CASES}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every case run once, all in one Python (tests/script_runner.py: imports paid once), each from its
    own folder: {case: (result, folder)}."""
    import numpy as np

    scripts = sorted({p.stem for p in (ROOT / "scripts").glob("*.py")}, key=len, reverse=True)
    cases, folders = [], []
    for case, (args, _) in CASES.items():
        folder = tmp_path_factory.mktemp(case)
        if case == "evaluate_reference":  # a run folder with samples, so that the reference is what is wrong
            np.savez(folder / "samples.npz", np.zeros((2, 8, 8, 3), np.uint8), np.zeros(2, np.int64))
        script = next(s for s in scripts if case == s or case.startswith(s + "_"))
        args = [a.replace("{tmp}", str(folder)) for a in args]
        if script in HYDRA_SCRIPTS:
            args.append(f"hydra.run.dir={folder / 'run'}")
        cases.append({"script": str(ROOT / "scripts" / f"{script}.py"), "args": args, "cwd": str(folder),
                      "root": str(folder)})
        folders.append(folder)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    return dict(zip(CASES, zip(run_in_one_process(cases, env), folders, strict=True), strict=True))


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_error_line_and_exit_status_2(case, results):
    (result, folder), start = results[case], CASES[case][1]
    stderr = result["stderr"]
    assert result["code"] == 2, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(start.replace("{tmp}", str(folder))), stderr[-3000:]
    assert "Traceback" not in stderr and "Error executing job" not in stderr
    assert result["changed"] == [], result["changed"]  # a refusal leaves no file behind


FULL_ERROR_CASES = [["+exp=digits_stitch_0.4", "accel.tstitch.ratio=1.5"], ["sampler=plms"]]


def test_hydra_full_error_shows_the_traceback(tmp_path):
    """Both cases in one Python (tests/script_runner.py), with HYDRA_FULL_ERROR=1."""
    cases = [{"script": str(ROOT / "scripts" / "sample.py"), "args": [*args, f"hydra.run.dir={tmp_path / 'run'}"],
              "cwd": str(tmp_path), "root": str(tmp_path)} for args in FULL_ERROR_CASES]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT),
           "HYDRA_FULL_ERROR": "1"}
    for result in run_in_one_process(cases, env):
        assert result["code"] != 0 and "Traceback" in result["stderr"], result["stderr"][-3000:]
        assert result["changed"] == [], result["changed"]  # the traceback, and still no trace


def test_bugs_are_not_turned_into_error_lines():
    assert composition_error(RuntimeError("a bug")) is None and job_error(RuntimeError("a bug")) is None
    assert job_error(KeyError("x")) is None and job_error(UserError("x=1: no")) is not None


def test_an_argument_error_names_the_config_key_it_came_from():
    cfg = OmegaConf.create({"accel": {"tstitch": {"ratio": 1.5}, "tgate": {"gate_step": 0},
                                      "hooks": {"tstitch": {"_target_": "x", "ratio": "${accel.tstitch.ratio}"},
                                                "tgate": {"_target_": "y", "gate_step": "${accel.tgate.gate_step}"}},
                                      "pipeline": {"tgate": {"_target_": "z", "config": {"gate_step": 3}}}}})
    err = name_config_key(UserError("ratio=1.5: must be in [0, 1]"), cfg.accel.hooks.tstitch)
    assert str(err) == "accel.tstitch.ratio=1.5: must be in [0, 1]" and err.config_key == "accel.tstitch.ratio"
    err = name_config_key(UserError("tgate gate_step=0: must be >= 1"), cfg.accel.hooks.tgate)
    assert str(err) == "accel.tgate.gate_step=0: must be >= 1"
    err = name_config_key(UserError("gate_step=3: too late"), cfg.accel.pipeline.tgate)  # nested, no interpolation
    assert str(err) == "accel.pipeline.tgate.config.gate_step=3: too late"
    err = name_config_key(UserError("steps=0: must be >= 1"), cfg.accel.hooks.tgate)  # not one of the node's keys
    assert str(err) == "steps=0: must be >= 1" and err.config_key is None
