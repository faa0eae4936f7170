"""The worker's end-of-training pictures hook (``workers.jobs._draw_pictures``) never fails a training: whatever
goes wrong while drawing is a warning in the log, and the job goes on. ``test_wk_pictures.py`` draws them after a
real training."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from workers.jobs import _draw_pictures


def test_a_drawing_error_is_a_warning_not_a_failed_training(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bundle = tmp_path / "20261202-010203-aaaa1111.pt"
    bundle.write_bytes(b"not a bundle")
    # An empty learning curve cannot be drawn, and the held-out "predictions" are not predictions.
    result = SimpleNamespace(policy=SimpleNamespace(branch="implicit", history=[]), histories={},
                             candidates={}, baseline_metrics=None, val_names=[])
    run = SimpleNamespace(project_id=7, m=SimpleNamespace(sam=None, clip=None))
    with caplog.at_level(logging.WARNING, logger="workers.jobs"):
        _draw_pictures(run, "Shape", result, bundle, ([], [None]))  # type: ignore[arg-type]
    [record] = [r for r in caplog.records if "pictures were not drawn" in r.getMessage()]
    assert record.levelno == logging.WARNING and "project 7 label Shape" in record.getMessage()
    assert not list(tmp_path.glob("*.png"))
