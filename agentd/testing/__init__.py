"""Helpers that tests, benchmarks and demos share: model files and local clusters built from real parts."""
