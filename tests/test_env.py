"""The prompting environment: actions, rewards, state, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignsam.env import EnvConfig, PromptEnv, action_points
from alignsam.sam import FrozenSam


@pytest.fixture(scope="module")
def sam() -> FrozenSam:
    return FrozenSam.from_preset("tiny", seed=0)


def _setup(sam: FrozenSam, n: int = 3, steps: int = 4):
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (100, 100, 3), dtype=np.uint8) for _ in range(n)]
    # Hand-made ground truth: the left 30 columns are foreground.
    gt = np.zeros((100, 100), bool)
    gt[:, :30] = True
    embs = torch.stack([e.features for e in sam.embed_many(imgs)])
    env = PromptEnv(sam, embs, [(100, 100)] * n, [gt] * n, EnvConfig(grid=(10, 10), steps=steps))
    return env, gt


def test_action_points_are_patch_centres():
    pts = action_points((800, 800), (10, 10))
    assert pts.shape == (100, 2)
    assert pts[0].tolist() == [40.0, 40.0]  # row 0, col 0
    assert pts[9].tolist() == [760.0, 40.0]  # row 0, col 9: x grows with the column
    assert pts[10].tolist() == [40.0, 120.0]  # row 1, col 0
    # A non-square image: same grid, per-axis scale.
    assert action_points((200, 400), (10, 10))[99].tolist() == [380.0, 190.0]


def test_rewards_on_hand_made_mask(sam):
    env, _ = _setup(sam)
    env.reset(torch.tensor([0, 1, 2]), generator=torch.Generator().manual_seed(0))
    # Column 0..2 centres are x = 5, 15, 25 (foreground); column 3 is x = 35 (background).
    res = env.step(torch.tensor([0, 2, 3]), torch.tensor([1, 1, 0]))
    assert res.reward.tolist() == [1.0, 1.0, -1.0]
    assert res.hit.tolist() == [True, True, False]
    res = env.step(torch.tensor([99, 52, 20]), torch.ones(3, dtype=torch.long))
    assert res.reward.tolist() == [-1.0, 1.0, 1.0]
    assert env.foreground_rate().tolist() == [0.5, 1.0, 0.5]
    assert env.history.sum(dim=1).tolist() == [2.0, 2.0, 2.0]


def test_initial_points_are_labelled_by_ground_truth(sam):
    env, gt = _setup(sam)
    pts, labels = env.sample_initial_points(torch.tensor([0, 1, 2] * 20), torch.Generator().manual_seed(1))
    assert labels[:, 0].eq(1).all() and labels[:, 1].eq(0).all()
    xy = pts.long()
    assert gt[xy[:, 0, 1], xy[:, 0, 0]].all()
    assert not gt[xy[:, 1, 1], xy[:, 1, 0]].any()


def test_empty_mask_gives_no_positive_point(sam):
    emb = sam.embed(np.zeros((50, 60, 3), np.uint8)).features[None]
    env = PromptEnv(sam, emb, [(50, 60)], [np.zeros((50, 60), bool)], EnvConfig(steps=2))
    _, labels = env.sample_initial_points(torch.tensor([0]))
    assert labels.tolist() == [[-1, 0]]
    env.reset(torch.tensor([0]))
    assert env.step(torch.tensor([5]), torch.tensor([1])).reward.tolist() == [-1.0]


def test_state_is_embedding_times_previous_mask(sam):
    env, _ = _setup(sam)
    env.reset(torch.tensor([2, 0]), generator=torch.Generator().manual_seed(0))
    before = env.prev_mask.clone()
    env.step(torch.tensor([1, 1]), torch.tensor([1, 1]))
    assert env.prev_mask.shape == (2, 1, 16, 16)
    assert not torch.equal(before, env.prev_mask)
    torch.testing.assert_close(env.state(), env.embeddings[torch.tensor([2, 0])] * env.prev_mask)
    assert env.probs().shape == (2, 100, 100)


def test_batched_episode_equals_single_episodes(sam):
    env, _ = _setup(sam)
    init = torch.tensor([[[10.0, 50.0], [80.0, 50.0]]] * 3)
    init_labels = torch.tensor([[1, 0]] * 3)
    acts = [torch.tensor([0, 44, 99]), torch.tensor([12, 3, 30])]
    labs = [torch.tensor([1, 0, 1]), torch.tensor([0, 1, 1])]
    env.reset(torch.arange(3), init, init_labels)
    for a, lab in zip(acts, labs, strict=True):
        env.step(a, lab)
    batched = env.low_res.clone()
    for i in range(3):
        env.reset(torch.tensor([i]), init[i : i + 1], init_labels[i : i + 1])
        for a, lab in zip(acts, labs, strict=True):
            env.step(a[i : i + 1], lab[i : i + 1])
        torch.testing.assert_close(env.low_res[0], batched[i], atol=1e-5, rtol=1e-4)


def test_episode_length_is_enforced(sam):
    env, _ = _setup(sam, steps=1)
    env.reset(torch.tensor([0]))
    env.step(torch.tensor([0]), torch.tensor([1]))
    with pytest.raises(RuntimeError, match="reset"):
        env.step(torch.tensor([1]), torch.tensor([1]))


def test_mask_input_feedback_changes_decoding(sam):
    env, _ = _setup(sam, n=1)
    init = torch.tensor([[[10.0, 50.0], [80.0, 50.0]]])
    lab = torch.tensor([[1, 0]])
    env.reset(torch.tensor([0]), init, lab)
    env.step(torch.tensor([3]), torch.tensor([1]))
    plain = env.low_res.clone()
    env.cfg.use_mask_input = True
    env.reset(torch.tensor([0]), init, lab)
    env.step(torch.tensor([3]), torch.tensor([1]))
    assert not torch.allclose(plain, env.low_res)
