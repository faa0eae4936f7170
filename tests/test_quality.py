"""Issue 4's CI check, a reduced quality benchmark: AlignSAM, trained on a synthetic task's 50-sample train split
with the bundled small SAM (frozen), beats its random-action (w/o RL) and all-positive (w/o SRM) ablations on
held-out test scenes by stated margins, and its agent clicks the target far more often than random actions.

Seeded end to end (scenes, training, the random ablation), so the numbers are the same on every run on the same
software; the margins are about half the gaps measured with these settings (see ``SEEN``), so they hold across
CPU kernels' floating-point differences without being loose enough to pass by accident. The full table (five
tasks, 200 test scenes, E=50) is ``python -m benchmarks.quality``.
"""

from __future__ import annotations

import pytest

from alignsam.loading import BUNDLED_SMALL_SAM, load_sam
from alignsam.policy import TrainConfig
from alignsam.ppo import PPOConfig
from alignsam.synthetic.quality import run_task

EPISODES = 25  # paper: 50 (halved for CI time); K = 20 and T = 15 as in the paper
N_TEST = 40

# task -> (mIoU over w/o RL, mIoU over w/o SRM, FR over random actions): the margins this test asserts.
MARGINS = {
    "blur": (0.04, 0.03, 0.30),
    "mirror": (0.07, 0.05, 0.27),
}
# What these settings measured on the development machine (same order; small SAM small-e7cc7dd966ca, 384 px), for
# reference. The families are the two where the agent's choice of points shows most in mIoU. On saliency and
# semantic:circle the SRM-labelled random clicks of the w/o-RL ablation nearly catch up: saliency (0.030, 0.068,
# 0.367), semantic:circle (0.009, 0.059, 0.207). The agent still clicks the target far more often than random
# actions there (the FR gaps); the full table is benchmarks/results/quality.md. The previous SAM,
# small-80a21994c0d2, measured blur (0.097, 0.045, 0.577) and mirror (0.143, 0.073, 0.523).
SEEN = {
    "blur": (0.081, 0.059, 0.612),
    "mirror": (0.144, 0.099, 0.542),
}


@pytest.fixture(scope="module")
def sam():
    assert BUNDLED_SMALL_SAM.is_file(), "the bundled small SAM checkpoint is missing"
    return load_sam("small", None, "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("task", list(MARGINS))
def test_alignsam_beats_its_ablations(sam, task):
    cfg = TrainConfig(ppo=PPOConfig(episodes=EPISODES), branch="implicit", seed=0)
    result = run_task(sam, task, cfg, n_train=50, n_test=N_TEST, baselines=False, seed=0)
    t = result["table"]
    ours, wo_rl, wo_srm = t["AlignSAM"], t["w/o RL"], t["w/o SRM"]
    over_rl, over_srm, over_fr = MARGINS[task]
    gaps = (ours["miou"] - wo_rl["miou"], ours["miou"] - wo_srm["miou"], ours["fr"] - wo_rl["fr"])
    report = f"{task}: gaps (mIoU vs w/o RL, mIoU vs w/o SRM, FR vs random) = {tuple(round(g, 3) for g in gaps)}; {t}"
    print(report.split(";")[0])
    assert gaps[0] >= over_rl, report
    assert gaps[1] >= over_srm, report
    assert gaps[2] >= over_fr, report


# The multi-instance family (issue 17): the backend's training chooses per-instance prompts by validation; on 3-6
# red circles among same-coloured and same-shaped distractors they must win, and beat their own w/o-RL ablation.
INSTANCE_MARGINS = (0.15, 0.06)  # (per instance over one mask, FR over random actions): about half of SEEN
INSTANCE_SEEN = (0.391, 0.123)  # these settings on the development machine (small SAM small-e7cc7dd966ca); the
# first gain was 0.293 before the instance filter, which validation keeps here, 0.378 with a linear one (2026-12-03),
# 0.371 before its weak components (2026-12-06)


@pytest.mark.slow
def test_every_instance_of_the_multi_instance_family(sam):
    cfg = TrainConfig(ppo=PPOConfig(episodes=EPISODES), branch="implicit", seed=0, instances="auto")
    result = run_task(sam, "instances", cfg, n_train=50, n_test=N_TEST, baselines=False, seed=0)
    t = result["table"]
    assert result["instances"] is True, result
    one_mask = result["one_mask_miou"]
    gains = (t["AlignSAM"]["miou"] - one_mask, t["AlignSAM"]["fr"] - t["w/o RL"]["fr"])
    report = f"instances: gains (per instance over one mask, FR vs random) = {tuple(round(g, 3) for g in gains)}; {t}"
    print(report.split(";")[0])
    assert gains[0] >= INSTANCE_MARGINS[0], report
    assert gains[1] >= INSTANCE_MARGINS[1], report
