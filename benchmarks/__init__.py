"""Benchmarks of the embedding service (see run.py)."""
