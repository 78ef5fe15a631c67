"""LeMoE benchmarks: run from the repository root with `venv/bin/python -m bench.run_all`."""
