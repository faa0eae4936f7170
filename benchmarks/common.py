"""Helpers for benchmark scripts: where results go, and the timing / machine / result-file helpers of
:mod:`alignsam.bench` with this folder's ``results/`` as the default destination."""

from pathlib import Path

from alignsam import bench
from alignsam.bench import machine, sync, timeit

RESULTS = Path(__file__).parent / "results"


def write_results(
    name: str,
    results: dict[str, object],
    table: list[tuple[str, ...]],
    headers: tuple[str, ...],
    out_dir: Path = RESULTS,
) -> Path:
    """:func:`alignsam.bench.write_results` into ``benchmarks/results/`` unless told otherwise."""
    return bench.write_results(name, results, table, headers, out_dir)


__all__ = ["RESULTS", "machine", "sync", "timeit", "write_results"]
