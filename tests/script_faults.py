"""Run a script (scripts/sample.py, scripts/train.py) with a fault or a pause injected, in a subprocess.

Usage: python tests/script_faults.py SCRIPT [hydra overrides ...], settings in the environment:

* FAULT_WAIT_FOR=PATH: sampling waits (before its first batch) until PATH exists: a run that
  holds its folder for as long as a test needs;
* FAULT_FILL_AT_BATCH=N, FAULT_FILL_PATH=PATH: before the N-th batch's PNGs are written, fill the
  file system holding PATH (a small tmpfs) with PATH itself: the run meets a real ENOSPC;
* FAULT_ENOSPC_AT_BATCH=N: the same simulated (where no small file system can be mounted): writes
  of the N-th batch's PNGs raise OSError(ENOSPC) as a full disk would;
* FAULT_KILL_AFTER_CHECKPOINT=N: training is killed (SIGKILL, no cleanup) right after its
  checkpoint of step N is written.
"""
import errno
import importlib
import os
import signal
import sys
import time
from pathlib import Path


def _patch_sampling() -> None:
    generate = importlib.import_module("runs.generate")  # the package exports a function of that name
    run = importlib.import_module("runs.run")
    real_generate, real_save, calls = run.generate, generate.save_sample_pngs, []

    def waiting_generate(*args, **kwargs):
        gate = Path(os.environ["FAULT_WAIT_FOR"])
        while not gate.exists():
            time.sleep(0.05)
        return real_generate(*args, **kwargs)

    def save(images, indices, out_dir):
        calls.append(1)
        if len(calls) == int(os.environ.get("FAULT_FILL_AT_BATCH", 0)):
            fd = os.open(os.environ["FAULT_FILL_PATH"], os.O_WRONLY | os.O_CREAT)
            try:
                while os.write(fd, b"\0" * 4096):
                    pass
            except OSError:  # full
                pass
            os.close(fd)
        if len(calls) == int(os.environ.get("FAULT_ENOSPC_AT_BATCH", 0)):
            real_write = Path.write_bytes

            def full(self, data):
                if self.parent == Path(out_dir) and ".png.tmp" in self.name:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real_write(self, data)

            Path.write_bytes = full
        real_save(images, indices, out_dir)

    if os.environ.get("FAULT_WAIT_FOR"):
        run.generate = waiting_generate
    generate.save_sample_pngs = save


def _patch_training() -> None:
    training = importlib.import_module("training.train")
    real_save, kill_at = training.save_checkpoint, os.environ.get("FAULT_KILL_AFTER_CHECKPOINT")

    def save(path, payload):
        saved = real_save(path, payload)
        if kill_at is not None and payload.get("step") == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)
        return saved

    training.save_checkpoint = save


if __name__ == "__main__":
    script = sys.argv[1]
    sys.path.insert(0, str(Path(script).resolve().parent))
    _patch_sampling()
    _patch_training()
    sys.argv = [script] + sys.argv[2:]
    exec(compile(open(script).read(), script, "exec"), {"__name__": "__main__"})
