"""Run several script command lines in one process, one after another, as `python scripts/X.py ARGS`
from a given folder would (imports paid once: a case costs about a second instead of a fresh Python's
start-up). Used by tests/test_refusals.py through a subprocess, so the test process keeps its own state.

stdin: a JSON list of cases {"script": path, "args": [...], "cwd": folder, "root": folder to compare};
stdout: one JSON object per case: {"code": exit status, "stderr": ..., "stdout": ..., "changed": [paths
under root added, removed or changed by the run]}.
"""
import contextlib
import hashlib
import io
import json
import os
import runpy
import sys
import traceback
from pathlib import Path


def tree(folder: Path) -> dict[str, str | None]:
    """Every file (its sha256) and folder (None) under folder."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    return out


def run(script: str, args: list[str], cwd: str) -> tuple[int, str, str]:
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    err, out = io.StringIO(), io.StringIO()
    argv, here = sys.argv, os.getcwd()
    sys.argv = [script, *args]
    os.chdir(cwd)
    code = 0
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            runpy.run_path(script, run_name="__main__")
    except SystemExit as ex:
        code = ex.code if isinstance(ex.code, int) else (0 if ex.code is None else 1)
    except BaseException:  # a bug: reported like Python would, status 1
        err.write(traceback.format_exc())
        code = 1
    finally:
        sys.argv = argv
        os.chdir(here)
        GlobalHydra.instance().clear()
    return code, err.getvalue(), out.getvalue()


def run_in_one_process(cases: list[dict], env: dict, timeout: float = 900) -> list[dict]:
    """Run the cases in one fresh Python (this file as a script); their results in order."""
    import subprocess

    proc = subprocess.run([sys.executable, __file__], input=json.dumps(cases), capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(out) == len(cases), proc.stderr[-3000:]
    return out


def main() -> None:
    for case in json.load(sys.stdin):
        root = Path(case["root"])
        before = tree(root)
        code, err, out = run(case["script"], case["args"], case["cwd"])
        after = tree(root)
        changed = sorted(k for k in set(before) | set(after) if before.get(k, "-") != after.get(k, "-"))
        print(json.dumps({"code": code, "stderr": err, "stdout": out, "changed": changed}), flush=True)


if __name__ == "__main__":
    main()
