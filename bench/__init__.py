"""Benchmarks of fastground (pytest-benchmark suites); see bench/README.md."""
