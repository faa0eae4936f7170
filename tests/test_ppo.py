"""PPO: hand-computed returns and clipped losses, GAE, the rollout buffer, and a contextual bandit it must learn."""

from __future__ import annotations

import math

import pytest
import torch

from alignsam.agent import PromptAgent
from alignsam.ppo import PPOConfig, RolloutBuffer, discounted_returns, gae, ppo_losses, ppo_update


def test_config_has_the_papers_defaults() -> None:
    cfg = PPOConfig()
    assert (cfg.gamma, cfg.clip_eps, cfg.steps, cfg.episodes, cfg.epochs) == (0.99, 0.2, 15, 50, 20)
    assert cfg.gae_lambda is None and cfg.minibatch_size is None


def test_discounted_returns_by_hand() -> None:
    # gamma = 0.5, column 0 rewards (1, -1, 1):
    #   Q2 = 1;  Q1 = -1 + 0.5 * 1 = -0.5;  Q0 = 1 + 0.5 * -0.5 = 0.75
    # column 1 rewards (-1, -1, -1):
    #   Q2 = -1; Q1 = -1 + 0.5 * -1 = -1.5;  Q0 = -1 + 0.5 * -1.5 = -1.75
    rewards = torch.tensor([[1.0, -1.0], [-1.0, -1.0], [1.0, -1.0]])
    expected = torch.tensor([[0.75, -1.75], [-0.5, -1.5], [1.0, -1.0]])
    torch.testing.assert_close(discounted_returns(rewards, 0.5), expected)
    # An episode ending after step 0 in column 0 cuts the flow back: Q0 = r0 = 1.
    dones = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    cut = discounted_returns(rewards, 0.5, dones=dones)
    assert cut[0, 0] == 1.0 and cut[0, 1] == -1.75
    # Bootstrapping with V(s_T) = 2: Q2 = 1 + 0.5 * 2 = 2 in column 0.
    assert discounted_returns(rewards, 0.5, last_value=torch.tensor([2.0, 0.0]))[2, 0] == 2.0


def test_gae_with_lambda_one_is_return_minus_value_and_lambda_zero_is_td() -> None:
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(7, 3, generator=g)
    values = torch.randn(7, 3, generator=g)
    zero = torch.zeros(3)
    advantages, returns = gae(rewards, values, zero, gamma=0.9, lam=1.0)
    q = discounted_returns(rewards, 0.9)
    torch.testing.assert_close(advantages, q - values)
    torch.testing.assert_close(returns, q)
    # lambda = 0: one-step TD error r_t + gamma * V_{t+1} - V_t.
    td, _ = gae(rewards, values, zero, gamma=0.9, lam=0.0)
    next_values = torch.cat([values[1:], zero[None]])
    torch.testing.assert_close(td, rewards + 0.9 * next_values - values)


def test_clipped_surrogate_by_hand() -> None:
    cfg = PPOConfig(clip_eps=0.2, value_coef=0.5, entropy_coef=0.01)
    old = torch.log(torch.tensor([0.5, 0.5, 0.5]))
    ratio = torch.tensor([1.5, 0.5, 1.1])
    new = (old + ratio.log()).requires_grad_()
    advantages = torch.tensor([1.0, -2.0, 3.0])
    values = torch.tensor([0.5, 0.0, 1.0])
    returns = torch.tensor([1.0, -1.0, 1.0])
    entropy = torch.tensor([1.0, 2.0, 3.0])
    out = ppo_losses(new, old, advantages, values, returns, entropy, cfg)
    # per sample max(-A * r, -A * clip(r, 0.8, 1.2)):
    #   A = 1,  r = 1.5: max(-1.5, -1.2) = -1.2   (clipped)
    #   A = -2, r = 0.5: max( 1.0,  1.6) =  1.6   (clipped, the pessimistic side)
    #   A = 3,  r = 1.1: max(-3.3, -3.3) = -3.3   (inside the range)
    # actor = (-1.2 + 1.6 - 3.3) / 3 = -0.966667
    # value = ((0.5 - 1)^2 + (0 + 1)^2 + 0^2) / 3 = 1.25 / 3 = 0.416667
    # entropy = 2;  loss = -0.966667 + 0.5 * 0.416667 - 0.01 * 2 = -0.778333
    # clip_frac: |r - 1| > 0.2 for 2 of 3
    # approx_kl = mean((r - 1) - log r) = (0.094535 + 0.193147 + 0.004690) / 3 = 0.097457
    assert out["actor_loss"].item() == pytest.approx(-2.9 / 3, abs=1e-6)
    assert out["value_loss"].item() == pytest.approx(1.25 / 3, abs=1e-6)
    assert out["entropy"].item() == pytest.approx(2.0)
    assert out["loss"].item() == pytest.approx(-2.9 / 3 + 0.5 * 1.25 / 3 - 0.02, abs=1e-6)
    assert out["clip_frac"].item() == pytest.approx(2 / 3)
    expected_kl = sum((r - 1) - math.log(r) for r in (1.5, 0.5, 1.1)) / 3
    assert out["approx_kl"].item() == pytest.approx(expected_kl, abs=1e-6)
    # Clipped samples get no gradient; the third gets d/dlogp (-A r / 3) = -A r / 3 = -1.1.
    out["actor_loss"].backward()
    torch.testing.assert_close(new.grad, torch.tensor([0.0, 0.0, -1.1]))


def test_rollout_buffer_stores_indices_and_half_masks_then_flattens_step_major() -> None:
    steps, batch, actions = 3, 2, 16
    buffer = RolloutBuffer.allocate(steps, batch, mask_size=(8, 8), num_actions=actions)
    for t in range(steps):
        buffer.add(
            t,
            image_index=torch.tensor([5, 7]),
            prev_mask=torch.full((batch, 1, 8, 8), 0.25 * t),
            history=torch.zeros(batch, actions),
            action=torch.tensor([t, t + 1]),
            logprob=torch.zeros(batch),
            value=torch.zeros(batch),
            reward=torch.tensor([1.0, -1.0]),
        )
    assert buffer.prev_mask.dtype == torch.float16 and buffer.history.dtype == torch.bool
    flat = buffer.flatten()
    assert flat["image_index"].tolist() == [5, 7] * 3
    assert flat["action"].tolist() == [0, 1, 1, 2, 2, 3]
    assert flat["prev_mask"].shape == (6, 1, 8, 8) and flat["history"].shape == (6, actions)
    assert float(flat["prev_mask"][4].max()) == 0.5


def test_update_refuses_an_incomplete_buffer() -> None:
    agent = PromptAgent(4, grid=(2, 2), hidden=8)
    buffer = RolloutBuffer.allocate(2, 1, mask_size=(4, 4), num_actions=4)
    optimizer = torch.optim.Adam(agent.parameters())
    with pytest.raises(ValueError, match="never added"):
        ppo_update(agent, optimizer, buffer, torch.zeros(1, 4, 4, 4), PPOConfig(steps=2))


def _bright_cell_images(
    n: int, grid: int, size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Textured embeddings (N, 8, size, size) with one bright grid cell each; returns them and the cell index."""
    embeddings = 0.5 * torch.randn(n, 8, size, size, generator=generator)
    target = torch.randint(0, grid * grid, (n,), generator=generator)
    cell = size // grid
    for i in range(n):
        row, col = divmod(int(target[i]), grid)
        embeddings[i, :4, row * cell : (row + 1) * cell, col * cell : (col + 1) * cell] += 2.0
    return embeddings, target


@pytest.mark.parametrize("gae_lambda", [None, 0.95])
def test_ppo_learns_a_contextual_bandit(gae_lambda: float | None) -> None:
    # One grid cell per image is bright; choosing it pays +1, anything else -1. A random policy picks it with
    # probability 1/16. After training, the greedy policy must find it on fresh images too.
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    grid, size, n = 4, 16, 32
    embeddings, target = _bright_cell_images(n, grid, size, g)
    agent = PromptAgent(8, grid=(grid, grid), hidden=16)
    cfg = PPOConfig(steps=1, epochs=4, lr=3e-3, gae_lambda=gae_lambda, minibatch_size=16)
    optimizer = torch.optim.Adam(agent.parameters(), lr=cfg.lr)
    ones = torch.ones(n, 1, size, size)
    no_history = torch.zeros(n, grid * grid)
    for _ in range(20):
        buffer = RolloutBuffer.allocate(cfg.steps, n, (size, size), grid * grid)
        action, logprob, value = agent.act(embeddings, ones, no_history, generator=g)
        reward = torch.where(action == target, 1.0, -1.0)
        buffer.add(0, torch.arange(n), ones, no_history, action, logprob, value, reward)
        stats = ppo_update(agent, optimizer, buffer, embeddings, cfg, generator=g)
    assert set(stats) == {"actor_loss", "value_loss", "entropy", "approx_kl", "clip_frac"}
    assert all(math.isfinite(v) for v in stats.values())

    held_out, held_out_target = _bright_cell_images(64, grid, size, g)
    with torch.no_grad():
        logits, _ = agent(held_out, torch.ones(64, 1, size, size), torch.zeros(64, grid * grid))
    p_target = torch.softmax(logits, dim=1).gather(1, held_out_target[:, None]).mean()
    assert p_target > 0.8
