"""The load / soak harness (``benchmarks/bench_load.py``) still runs end to end: a few seconds of Label Studio-like
clients against the real gunicorn, one real worker and Redis, no 5xx, no lost task, results written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench_load

pytestmark = pytest.mark.integration


def test_load_harness_runs_a_few_seconds_without_errors_or_lost_tasks(tmp_path: Path) -> None:
    status = bench_load.main(["--seconds", "6", "--clients", "2", "--workers", "1", "--tasks", "200",
                              "--sweep-s", "30", "--out", str(tmp_path), "--name", "smoke"])
    assert status == 0
    results = json.loads((tmp_path / "smoke.json").read_text())["results"]
    requests = results["requests"]
    for kind in ("health", "setup"):
        assert requests[kind]["requests"] > 0, requests.keys()
    predicts = [s for kind, s in requests.items() if kind.startswith("predict")]
    assert predicts and sum(s["tasks"] for s in predicts) > 0
    server_errors = {kind: s["status"] for kind, s in requests.items()
                     if any(code.startswith("5") for code in s["status"])}
    assert not server_errors, server_errors
    assert results["sweep"]["lost"] == 0
    assert results["tasks"]["asked"] > 0
    assert all(results["workers_alive_at_end"])
    assert (tmp_path / "smoke.md").read_text().count("|") > 20
