"""Benchmarks that compose models, techniques and peers (scripts/bench_peers.py)."""
