"""Benchmarks of the LoRA implementation: `python benchmarks/run.py` (see docs/benchmarks.md)."""
