"""``alignsam-worker`` run by hand: a weights problem ends with one line saying what to fix, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from alignsam.loading import BUNDLED_SMALL_SAM


def test_a_checkpoint_of_another_preset_is_one_line_and_exit_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL",)}
    env.update({"MODEL_DIR": str(tmp_path), "SAM_PRESET": "tiny", "SAM_CHECKPOINT": str(BUNDLED_SMALL_SAM),
                "CLIP_PRESET": "none"})
    done = subprocess.run([sys.executable, "-m", "workers.worker", "--burst"], env=env, capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("alignsam-worker: ") and "tiny" in last
