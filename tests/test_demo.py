"""`alignsam demo --quick` (the offline method demo the README documents) runs end to end."""

from __future__ import annotations

import json

import pytest

from alignsam.cli import main


@pytest.mark.slow
def test_demo_writes_maps_masks_overlays_and_metrics(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--device", "cpu"]) == 0
    for name in ("clip_map.png", "sam_one_click.png", "sam_one_click.overlay.png", "saliency.pt", "saliency.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["test"]) == {"AlignSAM", "w/o RL", "w/o SRM", "w/o multi-step"}
    assert len(list((out / "test").glob("*.overlay.png"))) == summary["test_samples"] == 8
