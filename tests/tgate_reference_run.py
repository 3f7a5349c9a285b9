"""Run parity cases with the reference tgate 1.0.0 package; save their latents.

Usage: PYTHONPATH=<dir holding the reference tgate>:<tests dir> python tgate_reference_run.py FOLDER OUT.pt CASE...
Run it from a directory that holds no `tgate` package of its own (the tests run it
from a temporary directory), so that `import tgate` finds the reference.
"""
import sys
from pathlib import Path

import torch


def main(folder: str, out: str, *cases: str) -> None:
    import tgate

    torch.set_num_threads(1)  # as the in-process side: tiny models, shared cores

    from tgate_parity import run_case

    results = {case: run_case(tgate, case, folder) for case in cases}
    tmp = Path(out).with_suffix(".tmp")
    torch.save({"latents": results, "tgate_file": tgate.__file__}, tmp)
    tmp.replace(out)


if __name__ == "__main__":
    main(*sys.argv[1:])
