"""Benchmarks behind ``pqcnet bench <name>``: each prints JSON with the same-run
baseline and the ratio (results are recorded in the repository's benchmarks/README.md)."""
