"""Microbenchmarks (pytest-benchmark): kernels against the eager reference."""
