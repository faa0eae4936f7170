"""Issue 20's fuzz suite, bounded for CI: every HTTP route, the label-config parser and the RLE / polygon
converters get Hypothesis-generated input (benchmarks/fuzz.py); no 5xx, no exception other than the named ones."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from benchmarks.fuzz import run

EXAMPLES = 120


def test_fuzzed_input_never_crashes_the_backend(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL)  # the app logs each refused input; thousands of lines say nothing here
    report = run(EXAMPLES, seed=0, workdir=tmp_path)
    assert report.crashes == []
    for target, counts in report.counts.items():
        assert sum(counts.values()) >= EXAMPLES // 2, target  # Hypothesis may stop early on a small space
    # not a vacuous fuzz: accepted and refused inputs both reach every target that can refuse
    for target in ("/setup", "/predict", "/webhook", "label config", "brush RLE", "polygon"):
        outcomes = report.counts[target]
        assert len(outcomes) >= 2, (target, dict(outcomes))
        assert not any(code.startswith("5") for code in outcomes), (target, dict(outcomes))
