"""Benchmarks of the branching op: every backend against the naive Learning-to-Branch implementation."""
