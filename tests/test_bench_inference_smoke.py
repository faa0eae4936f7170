"""The inference-cost harness (``benchmarks/bench_inference.py``) still runs: a briefly trained policy on the bundled
small SAM predicts multi-instance scenes in each setting; SAM's own time is found inside the call and the wall time
is at least that (the floor), and per-instance prompting decodes more prompt sets than one mask."""

from __future__ import annotations

import pytest

from benchmarks import bench_inference

pytestmark = pytest.mark.integration


def test_inference_harness_splits_wall_time_into_sam_and_overhead() -> None:
    r = bench_inference.run("small", "cpu", n_images=2, repeat=1, n_train=3)
    assert set(r) == set(bench_inference.SETTINGS)
    for v in r.values():
        assert 0 < v["floor_s"] <= v["wall_s"] and v["ratio"] >= 1.0
        assert v["encoder_calls"] >= 1 and v["decode_calls"] >= 16  # T=15 steps + the initial pair, at least
        assert v["prompt_sets_per_image"] >= 16
    assert r["per instance"]["prompt_sets_per_image"] >= r["one mask"]["prompt_sets_per_image"]
