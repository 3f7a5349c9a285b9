"""Interactive demo: python scripts/demo.py [--host 127.0.0.1] [--port 7860] [--share] [--threads N]

Serves a Gradio page to pick a model pair (the shipped digits pair by default), the T-Stitch
fraction, T-GATE, sampler and steps; Generate shows the images, the sampling time, the MACs and
the speed-up against the large model alone, Sweep plots quality and time against the fraction.
Needs the demo extra: pip install -e ".[demo]".
"""
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's packages, from any folder


def main(argv=None) -> int:
    from runs.script import ArgumentParser

    parser = ArgumentParser(description=__doc__.splitlines()[0].split(":")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--share", action="store_true", help="also ask Gradio for a public share link (off by default)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads per run (default: each config's num_threads; digits: 1)")
    parser.add_argument("--work-dir", default=None, help="folder for the runs' temporary files (default: the system's)")
    parser.add_argument("--check", nargs="?", const="digits", metavar="PAIR",
                        help="no server: one Generate click with PAIR's page defaults (default: digits), "
                             "printed as the page would show it; needs no gradio")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.check:
        return check(args.check, args.threads, args.work_dir)
    try:
        from demo.app import build_app, launch
    except ImportError as e:
        print(f"the demo needs its extra: pip install -e \".[demo]\" ({e})", file=sys.stderr)
        return 2
    from demo.backend import DemoBackend

    launch(build_app(DemoBackend(num_threads=args.threads, work_dir=args.work_dir)),
           host=args.host, port=args.port, share=args.share)
    return 0


def check(pair: str, threads, work_dir) -> int:
    import time

    from demo.backend import DemoBackend, DemoError
    from demo.report import generate_summary
    from demo.settings import SettingsError, default_settings

    try:
        start = time.perf_counter()
        result = DemoBackend(num_threads=threads, work_dir=work_dir).generate(default_settings(pair))
    except (DemoError, SettingsError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    print(generate_summary(result))
    print(f"(the click, with the first-time timing of the large model alone: {time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    from runs.script import run_script

    sys.exit(run_script(main))
