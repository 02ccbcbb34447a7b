"""Benchmarks of tunesmith against TRL and a plain PyTorch loop: ``python -m bench`` (see README.md)."""
