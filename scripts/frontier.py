"""The speed-quality frontier: python scripts/frontier.py [key=value ...]; --help for more.

Sweeps samplers x steps x T-Stitch fractions x T-GATE settings (configs/frontier.yaml; recipes for other
models in configs/frontier/, `+frontier=<recipe>`), chooses on the selection seeds, reports on the disjoint
report seeds, and writes the tables, the numbers and the figures into the run folder (benchmarks/frontier/).
"""
import hydra
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from benchmarks.frontier import replot, run_frontier
from runs.script import hydra_errors, job_errors


def compose_sample(overrides: list[str]) -> DictConfig:
    """configs/sample.yaml with the overrides, as `scripts/sample.py OVERRIDES` would compose it."""
    return compose(config_name="sample", overrides=overrides)


@hydra_errors  # an unknown config or a bad override: one `error: ...` line, exit status 2
@hydra.main(config_path="../configs", config_name="frontier", version_base="1.3")
@job_errors  # bad settings, a folder in use, a full disk: one `error: ...` line
def main(cfg: DictConfig) -> None:
    if cfg.replot:  # the figure again from the run folder's frontier.json
        print(f"figure: {replot(HydraConfig.get().runtime.output_dir, cfg.figure)}")
        return
    result = run_frontier(cfg, compose_sample, HydraConfig.get().runtime.output_dir)
    print(f"\n{result['title']}\n\n{result['summary']}\n\n{result['table']}\n\nfigure: {result['figure']}"
          + (f"\nsteps x samplers figure: {result['steps_figure']}" if result["steps_figure"] else ""))


if __name__ == "__main__":
    main()
