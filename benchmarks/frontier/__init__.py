"""The speed-quality frontier of a model pair over T-Stitch fractions and T-GATE settings.

points.py (the grid), timing.py (round-robin sampling time), report.py (standard errors, the pick,
the table), pareto.py (frontiers and the figure), sweep.py (the whole sweep; scripts/frontier.py).
"""
from benchmarks.frontier.pareto import pareto_front, plot_frontier
from benchmarks.frontier.points import Gate, Point, grid_points
from benchmarks.frontier.report import agreement_stats, markdown_table, pick_fastest
from benchmarks.frontier.sweep import replot, run_frontier
from benchmarks.frontier.timing import time_round_robin

__all__ = ["Gate", "Point", "agreement_stats", "grid_points", "markdown_table", "pareto_front",
           "pick_fastest", "plot_frontier", "replot", "run_frontier", "time_round_robin"]
