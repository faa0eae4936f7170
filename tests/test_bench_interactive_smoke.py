"""The click latency harness (``benchmarks/bench_interactive.py``) still runs end to end: the real gunicorn, a real
worker answering clicks from its thread, Redis and the Label Studio stub; every click answered 200 with a region (the
bundled small SAM on the stub's shapes), per-click decode times read from the worker's log, results written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench_interactive

pytestmark = pytest.mark.integration


def test_click_harness_measures_every_click(tmp_path: Path) -> None:
    status = bench_interactive.main(["--clicks", "8", "--warm-tasks", "2", "--prelabel-tasks", "0",
                                     "--out", str(tmp_path), "--name", "smoke"])
    assert status == 0
    results = json.loads((tmp_path / "smoke.json").read_text())["results"]
    idle = results["idle"]
    assert idle["clicks"] == idle["counted"] == 8 and idle["non_200"] == 0 and idle["empty_answers"] == 0
    assert idle["sam_decode_ms"]["p50"] > 0 and idle["overhead_ms"]["p50"] is not None
    assert idle["click_to_answer_ms"]["p50"] >= idle["sam_decode_ms"]["p50"]
    assert idle["strategies"] == sorted(f"Shape clicks (start none, {n} clicks)" for n in (1, 2, 3, 4))
    assert "during_prelabel" not in results
    assert (tmp_path / "smoke.md").read_text().count("|") > 10
