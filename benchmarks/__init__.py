"""Runnable benchmarks: ``python -m benchmarks.run`` prints the tables quoted in the README."""
