"""Helpers for benchmark scripts (they live in the package so `alignsam bench` works from an install)."""

from pathlib import Path

from alignsam.bench import machine, sync, timeit, write_results

RESULTS = Path(__file__).parent / "results"

__all__ = ["RESULTS", "machine", "sync", "timeit", "write_results"]
