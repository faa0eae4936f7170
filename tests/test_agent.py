"""PromptAgent: shapes, action layout, repeat masking, and independence from the rest of the batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from alignsam.agent import PromptAgent, masked_logits, policy_distribution


def _inputs(batch: int, channels: int, size: int, actions: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    embedding = torch.randn(batch, channels, size, size, generator=g)
    prev_mask = torch.rand(batch, 1, size, size, generator=g)
    history = (torch.rand(batch, actions, generator=g) < 0.2).float()
    return embedding, prev_mask, history


@pytest.mark.parametrize(
    ("channels", "size", "grid"),
    [(256, 64, (10, 10)), (32, 16, (10, 10)), (64, 32, (8, 8)), (32, 16, (4, 6))],
)
def test_forward_shapes_for_any_embedding_and_grid(channels: int, size: int, grid: tuple[int, int]) -> None:
    torch.manual_seed(0)
    agent = PromptAgent(channels, grid=grid, hidden=16)
    actions = grid[0] * grid[1]
    embedding, prev_mask, history = _inputs(3, channels, size, actions)
    logits, value = agent(embedding, prev_mask, history)
    assert logits.shape == (3, actions)
    assert value.shape == (3,)
    assert torch.isfinite(logits).all() and torch.isfinite(value).all()


def test_initial_policy_is_near_uniform() -> None:
    torch.manual_seed(0)
    agent = PromptAgent(32, grid=(10, 10), hidden=16)
    embedding, prev_mask, history = _inputs(4, 32, 16, 100)
    logits, _ = agent(embedding, prev_mask, history)
    probs = policy_distribution(logits, torch.zeros_like(history)).probs
    assert torch.allclose(probs, torch.full_like(probs, 0.01), atol=2e-3)


@pytest.mark.parametrize("use_history", [True, False])
def test_sample_logits_do_not_depend_on_the_rest_of_the_batch(use_history: bool) -> None:
    torch.manual_seed(0)
    agent = PromptAgent(32, grid=(8, 8), hidden=16, use_history=use_history)
    embedding, prev_mask, history = _inputs(5, 32, 16, 64, seed=1)
    batch_logits, batch_value = agent(embedding, prev_mask, history)
    for i in range(5):
        alone_logits, alone_value = agent(embedding[i : i + 1], prev_mask[i : i + 1], history[i : i + 1])
        torch.testing.assert_close(alone_logits[0], batch_logits[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(alone_value[0], batch_value[i], rtol=1e-5, atol=1e-5)
    assert not any(
        isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d | nn.MultiheadAttention) for m in agent.modules()
    )


def test_state_is_embedding_times_previous_mask() -> None:
    torch.manual_seed(0)
    agent = PromptAgent(8, grid=(4, 4), hidden=8)
    embedding, _, history = _inputs(2, 8, 16, 16)
    zero_mask = torch.zeros(2, 1, 16, 16)
    # With M = 0 the state is 0 whatever the image: both images look the same to the agent.
    logits, value = agent(embedding, zero_mask, history[:1].expand(2, -1))
    torch.testing.assert_close(logits[0], logits[1])
    torch.testing.assert_close(value[0], value[1])


def test_history_channel_is_row_major() -> None:
    # Wire the policy head so the logit of each cell is just its history bit: the hot logit must sit at the
    # action a = row * grid_w + col that was marked, on a non-square grid.
    grid = (3, 5)
    agent = PromptAgent(4, grid=grid, hidden=8, use_history=True)
    with torch.no_grad():
        agent.stem.weight.zero_()
        agent.stem.bias.zero_()
        agent.stem_history.zero_()
        agent.stem_history[0] = 1.0  # hidden unit 0 <- history bit
        agent.policy_cell.weight.zero_()
        agent.policy_cell.bias.zero_()
        agent.policy_cell.weight[0, 0] = 1.0
        agent.policy_global.weight.zero_()
        agent.policy_out.weight.zero_()
        agent.policy_out.bias.zero_()
        agent.policy_out.weight[0, 0] = 1.0
    history = torch.zeros(1, 15)
    row, col = 2, 3
    history[0, row * grid[1] + col] = 1.0
    logits, _ = agent(torch.randn(1, 4, 12, 12), torch.ones(1, 1, 12, 12), history)
    assert int(logits.argmax()) == row * grid[1] + col
    assert divmod(int(logits.argmax()), grid[1]) == (row, col)


def test_without_history_the_agent_ignores_it() -> None:
    torch.manual_seed(0)
    agent = PromptAgent(8, grid=(4, 4), hidden=8, use_history=False)
    embedding, prev_mask, history = _inputs(2, 8, 16, 16)
    a = agent(embedding, prev_mask, history)
    b = agent(embedding, prev_mask, torch.zeros_like(history))
    torch.testing.assert_close(a, b)


def test_masked_logits_forbid_chosen_actions_without_nan() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]], requires_grad=True)
    history = torch.tensor([[0, 1, 0, 1]], dtype=torch.bool)
    dist = policy_distribution(logits, history)
    assert dist.probs[0, 1] == 0 and dist.probs[0, 3] == 0
    # The remaining two share the mass: softmax([0, 2]).
    torch.testing.assert_close(dist.probs[0, [0, 2]], torch.softmax(torch.tensor([0.0, 2.0]), 0))
    entropy = dist.entropy()
    entropy.sum().backward()
    assert torch.isfinite(entropy).all() and torch.isfinite(logits.grad).all()
    assert logits.grad[0, 1] == 0 and logits.grad[0, 3] == 0

    # Degenerate: everything chosen -> uniform, still finite.
    everything = policy_distribution(logits.detach(), torch.ones(1, 4, dtype=torch.bool))
    torch.testing.assert_close(everything.probs, torch.full((1, 4), 0.25))
    assert torch.isfinite(everything.entropy()).all()

    # Unmasked distribution leaves the logits alone; masked_logits keeps dtype.
    assert (policy_distribution(logits, history, mask_repeats=False).probs > 0).all()
    half = masked_logits(torch.zeros(1, 4, dtype=torch.float16), history)
    assert half.dtype == torch.float16 and torch.isfinite(half).all()


def test_act_never_repeats_an_action_within_an_episode() -> None:
    torch.manual_seed(0)
    grid = (3, 3)
    agent = PromptAgent(8, grid=grid, hidden=8)
    embedding, prev_mask, _ = _inputs(4, 8, 12, 9)
    history = torch.zeros(4, 9)
    generator = torch.Generator().manual_seed(0)
    for _ in range(9):
        action, logprob, value = agent.act(embedding, prev_mask, history, generator=generator)
        assert action.shape == logprob.shape == value.shape == (4,)
        assert not history.gather(1, action[:, None]).bool().any()
        history.scatter_(1, action[:, None], 1.0)
    assert history.bool().all()

    greedy, _, _ = agent.act(embedding, prev_mask, torch.zeros(4, 9), deterministic=True)
    logits, _ = agent(embedding, prev_mask, torch.zeros(4, 9))
    assert torch.equal(greedy, logits.argmax(dim=1))


def test_float16_embeddings_and_masks_are_accepted() -> None:
    torch.manual_seed(0)
    agent = PromptAgent(8, grid=(4, 4), hidden=8)
    embedding, prev_mask, history = _inputs(2, 8, 16, 16)
    full = agent(embedding, prev_mask, history)
    half = agent(embedding.half(), prev_mask.half(), history.bool())
    assert half[0].dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=1e-2, atol=1e-2)


def _reference_forward(agent: PromptAgent, pooled: torch.Tensor, history: torch.Tensor):
    """The agent's function written out op by op, as the module docstring states it (no fused kernels)."""
    tokens = pooled.flatten(2).transpose(1, 2)
    f = agent.stem(tokens)
    if agent.stem_history is not None:
        f = f + history[:, :, None] * agent.stem_history
    f = torch.relu(agent.stem_norm(f))
    g = f.mean(dim=1)
    z = torch.relu(agent.policy_cell(f) + agent.policy_global(g)[:, None])
    logits = agent.policy_out(z).squeeze(2)
    value_in = [g, history] if agent.stem_history is not None else [g]
    return logits, agent.value_head(torch.cat(value_in, dim=1)).squeeze(1)


@pytest.mark.parametrize("use_history", [True, False])
def test_fused_forward_is_the_reference_function_with_the_same_gradients(use_history: bool) -> None:
    torch.manual_seed(3)
    agent = PromptAgent(24, grid=(6, 5), hidden=8, use_history=use_history, state_channels=6)
    emb, mask = torch.randn(4, 24, 12, 12), torch.rand(4, 1, 12, 12)
    agent.fit_projection(emb)
    pooled = agent.pool_state(emb, mask)
    history = (torch.rand(4, 30) < 0.3).float()

    def loss_and_grads(fn):
        agent.zero_grad()
        logits, value = fn(pooled, history)
        loss = (logits.sin() * torch.arange(30.0)).sum() + value.pow(2).sum()
        loss.backward()
        return logits.detach(), value.detach(), [p.grad.clone() for p in agent.parameters() if p.grad is not None]

    got = loss_and_grads(agent.forward_pooled)
    want = loss_and_grads(lambda p, h: _reference_forward(agent, p, h))
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    assert len(got[2]) == len(want[2])
    for a, b in zip(got[2], want[2], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # PPO's path (inputs built once, reused by every epoch) is the same function.
    tokens = agent.stem_inputs(pooled, history)
    torch.testing.assert_close(agent.forward_tokens(tokens, history)[0], got[0])
