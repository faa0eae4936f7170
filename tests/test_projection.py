"""The fixed state projection (alignsam.projection): what it fits, and that projecting the pooled state is the
same as pooling states built from projected embeddings (the identity the agent and SRM rely on)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from alignsam.agent import PromptAgent
from alignsam.env import PromptEnv
from alignsam.policy import TrainConfig
from alignsam.ppo import PPOConfig
from alignsam.projection import ChannelProjection
from alignsam.rollout import SrmInputs, encode, rollout
from alignsam.sam import FrozenSam
from alignsam.srm import SRM, SRMConfig
from alignsam.train import train
from tests.helpers import bright_disc_samples


def _embeddings(n: int = 6, c: int = 16, size: int = 12, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(c, c, generator=gen) * torch.logspace(0, -2, c)  # decaying energy per direction
    x = torch.randn(n, size, size, c, generator=gen) @ mixing.T
    return x.permute(0, 3, 1, 2).contiguous()


def test_unfitted_projection_keeps_the_first_channels():
    proj = ChannelProjection(8, 3)
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(proj(x), x[:, :3])


def test_fit_whitens_the_leading_directions():
    emb = _embeddings()
    proj = ChannelProjection(16, 4)
    eigvals = proj.fit(emb)
    assert torch.all(eigvals[:-1] >= eigvals[1:])  # largest first
    y = proj(emb).permute(0, 2, 3, 1).reshape(-1, 4)
    second_moment = y.T @ y / y.shape[0]
    torch.testing.assert_close(second_moment, torch.eye(4), atol=1e-3, rtol=1e-3)
    # The kept directions are the leading eigenvectors: they carry more energy than any other unit direction.
    x = emb.permute(0, 2, 3, 1).reshape(-1, 16)
    kept = torch.linalg.qr(proj.weight.T).Q  # orthonormal basis of the kept subspace
    captured = (x @ kept).pow(2).sum() / x.pow(2).sum()
    assert captured > 0.9
    assert torch.isclose(captured, eigvals[:4].sum() / eigvals.sum(), rtol=1e-3)


def test_fit_is_deterministic():
    emb = _embeddings()
    a, b = ChannelProjection(16, 4), ChannelProjection(16, 4)
    a.fit(emb)
    b.fit(emb.clone())
    assert torch.equal(a.weight, b.weight)


def test_rank_is_checked():
    with pytest.raises(ValueError, match="rank"):
        ChannelProjection(8, 9)


def test_agent_state_equals_pooling_a_state_built_from_projected_embeddings():
    torch.manual_seed(0)
    emb = _embeddings(n=3)
    mask = torch.rand(3, 1, 12, 12)
    agent = PromptAgent(16, grid=(5, 5), hidden=8, state_channels=6)
    agent.fit_projection(emb)
    projected = agent.projection(emb)  # (P F) at full resolution, then the state and the pooling
    expected = torch.cat([F.adaptive_avg_pool2d(projected * mask, (5, 5)), F.adaptive_avg_pool2d(mask, (5, 5))], 1)
    pooled = agent.pool_state(emb, mask)
    torch.testing.assert_close(pooled[:, :7], expected, atol=1e-5, rtol=1e-5)
    # ... followed by each cell's 3x3 neighbourhood mean (the cells that exist): the corner cell averages 4 cells.
    torch.testing.assert_close(pooled[:, 7:, 0, 0], expected[:, :, :2, :2].mean(dim=(2, 3)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled[:, 7:, 2, 3], expected[:, :, 1:4, 2:5].mean(dim=(2, 3)), atol=1e-5, rtol=1e-5)
    # Embeddings projected beforehand (what the trainer does once per run) give the same state.
    torch.testing.assert_close(agent.pool_state(agent.project(emb), mask), pooled, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("branch", ["implicit", "explicit"])
def test_srm_states_equal_pooling_states_built_from_projected_embeddings(branch):
    torch.manual_seed(0)
    emb = _embeddings(n=2, size=12)
    prob = torch.rand(2, 1, 12, 12)
    srm = SRM(16, branch, hidden=8, work_grid=5, state_channels=6)
    srm.fit_projection(emb)
    projected = srm.projection(emb)
    expected = torch.cat([F.adaptive_avg_pool2d(projected * prob, (5, 5)), F.adaptive_avg_pool2d(prob, (5, 5))], 1)
    torch.testing.assert_close(srm.pool_spatial(emb, prob), expected, atol=1e-5, rtol=1e-5)


def test_projection_travels_in_the_state_dict():
    emb = _embeddings()
    agent = PromptAgent(16, grid=(4, 4), hidden=8, state_channels=6)
    agent.fit_projection(emb)
    fresh = PromptAgent(16, grid=(4, 4), hidden=8, state_channels=6)
    fresh.load_state_dict(agent.state_dict())
    assert torch.equal(fresh.projection.weight, agent.projection.weight)


def test_inference_projects_each_image_once_and_reads_the_same_states():
    """``SrmInputs.projected`` and the rollout's agent states (what prediction uses): the SRM's logits and the
    episode's points match those from the C-channel embeddings, the caller's inputs are left as they were."""
    sam = FrozenSam.from_preset("tiny", seed=0)
    samples = bright_disc_samples(4, seed=5)
    cfg = TrainConfig(ppo=PPOConfig(episodes=1, steps=3, epochs=1), grid=(6, 6), branch="implicit", seed=1,
                      agent_state_channels=8, srm=SRMConfig(state_channels=8))  # tiny SAM: 32 channels
    policy = train(sam, samples, cfg).policy
    enc = encode(sam, [s.image for s in samples], masks=[s.mask for s in samples])
    full = SrmInputs(sam, enc)
    projected = full.projected(policy.srm)
    assert policy.srm.projection is not None
    assert projected.embeddings.shape[1] == policy.srm.projection.rank and full.embeddings.shape[1] == sam.embed_dim
    assert projected.projected(policy.srm) is projected  # already on the projection: nothing to do
    idx = torch.arange(len(samples))
    with torch.no_grad():
        torch.testing.assert_close(projected.forward(policy.srm, idx, None).logits,
                                   full.forward(policy.srm, idx, None).logits, atol=1e-4, rtol=1e-4)
    env = PromptEnv(sam, enc.embeddings, enc.sizes, enc.masks, policy.config.env_config())
    a = rollout(sam, env, full, policy.agent, policy.srm, idx, 3)
    b = rollout(sam, env, projected, policy.agent, policy.srm, idx, 3)
    assert torch.equal(a.points, b.points) and torch.equal(a.labels, b.labels)
