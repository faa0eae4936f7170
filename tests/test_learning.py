"""The agent learns: on a task whose foreground is visually distinct (a bright disc on a dark
textured background), the trained policy's Foreground Rate on held-out images beats random
actions by a wide, stated margin. Seeded; cannot pass by chance (120 held-out clicks each)."""

from __future__ import annotations

import pytest

from alignsam.bundle import Bundle
from alignsam.evaluate import evaluate
from alignsam.policy import TrainConfig
from alignsam.ppo import PPOConfig
from alignsam.predict import AlignSAM
from alignsam.sam import FrozenSam
from alignsam.train import train
from tests.helpers import bright_disc_samples

MARGIN = 0.30  # FR points over random actions; seen: 0.88 vs 0.04


@pytest.mark.slow
def test_trained_agent_clicks_the_target_far_more_often_than_random():
    sam = FrozenSam.from_preset("tiny", seed=0)
    # K=10 PPO epochs (the paper's 20 halved for time): with the default 16-wide agent and only 4 epochs the
    # sampled policy sharpens too slowly to show the training-reward rise below within 30 episodes.
    cfg = TrainConfig(ppo=PPOConfig(episodes=30, steps=5, epochs=10), grid=(8, 8), branch="implicit",
                      seed=0, val_fraction=0.0)
    result = train(sam, bright_disc_samples(24, seed=0), cfg)
    p = result.policy
    model = AlignSAM(sam, Bundle(p.agent, p.srm, p.config, {"text": "bright disc", "version": "t", "branch": p.branch}))
    table = evaluate(model, bright_disc_samples(24, seed=100), ablations=True)
    agent_fr, random_fr = table["AlignSAM"]["fr"], table["w/o RL"]["fr"]
    assert agent_fr >= random_fr + MARGIN, table
    # The rewards seen during training rose too: the last episodes beat the first ones.
    first = sum(h["foreground_rate"] for h in p.history[:5]) / 5
    last = sum(h["foreground_rate"] for h in p.history[-5:]) / 5
    assert last > first + 0.2, [h["foreground_rate"] for h in p.history]  # seen: 0.10 -> 0.47
