"""Proximal Policy Optimization for the prompt agent (paper section 3.2, Schulman et al. 2017).

Reads top to bottom like CleanRL's ``ppo.py``: the config with the paper's defaults, returns and advantages,
the rollout buffer, the clipped losses, and the update (K epochs of minibatch steps).

One buffer holds one episode of T steps for B samples (images). An episode ends after step T (the paper's fixed
number of interaction rounds), so the return after the last step is 0 and nothing is bootstrapped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from alignsam.agent import PromptAgent, policy_distribution


@dataclass
class PPOConfig:
    """PPO hyperparameters. Defaults are the paper's (section 4.1) where it gives one, CleanRL's otherwise."""

    gamma: float = 0.99
    """discount factor of the return Q_t"""
    clip_eps: float = 0.2
    """clipping range of the probability ratio"""
    steps: int = 15
    """T: prompting steps per episode"""
    episodes: int = 50
    """E: training episodes"""
    epochs: int = 20
    """K: optimisation epochs over each episode's buffer"""
    lr: float = 3e-4
    """Adam learning rate"""
    gae_lambda: float | None = None
    """None: the paper's A_t = Q_t - V(s_t) with Q_t the discounted return; a float: GAE(lambda)"""
    value_coef: float = 0.5
    """weight of the critic's squared error"""
    entropy_coef: float = 0.01
    """weight of the entropy bonus"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip"""
    minibatch_size: int | None = None
    """samples per gradient step; None: the whole buffer (T*B) in one step per epoch"""
    normalize_advantages: bool = True
    """standardise advantages over the whole buffer before the epochs"""
    mask_repeats: bool = True
    """forbid already-chosen actions; rollouts must sample with the same setting"""


# ---------------------------------------------------------------------------------------------------------------
# Returns and advantages
# ---------------------------------------------------------------------------------------------------------------


def discounted_returns(
    rewards: Tensor, gamma: float, dones: Tensor | None = None, last_value: Tensor | None = None
) -> Tensor:
    """Q_t = r_t + gamma * Q_{t+1} (paper Eq. 6), computed backwards.

    Arguments:
      rewards (Tensor): (T, B) rewards r_t.
      gamma (float): discount factor.
      dones (Tensor | None): (T, B), nonzero where the episode ends after step t (no value flows back across it).
        None: only the last step ends an episode.
      last_value (Tensor | None): (B,) value bootstrapped after step T-1; None: 0 (episode over).

    Returns:
      (Tensor): (T, B) discounted returns Q_t.
    """
    steps = rewards.shape[0]
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0]) if last_value is None else last_value.to(rewards.dtype)
    for t in reversed(range(steps)):
        if dones is not None:
            running = running * (1.0 - dones[t].to(rewards.dtype))
        running = rewards[t] + gamma * running
        returns[t] = running
    return returns


def gae(
    rewards: Tensor,
    values: Tensor,
    last_value: Tensor,
    gamma: float,
    lam: float,
    dones: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016).

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1};  returns = A_t + V_t.
    With lam = 1 the returns equal :func:`discounted_returns` (bootstrapped with ``last_value``).

    Arguments:
      rewards (Tensor): (T, B) rewards.
      values (Tensor): (T, B) critic values V(s_t) recorded during the rollout.
      last_value (Tensor): (B,) V(s_T) after the last step; zeros when the episode is over.
      gamma (float): discount factor. lam (float): GAE lambda.
      dones (Tensor | None): (T, B), nonzero where the episode ends after step t.

    Returns:
      (Tensor): (T, B) advantages. (Tensor): (T, B) returns (value targets).
    """
    steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    next_value = last_value.to(rewards.dtype)
    next_advantage = torch.zeros_like(rewards[0])
    for t in reversed(range(steps)):
        not_done = 1.0 if dones is None else 1.0 - dones[t].to(rewards.dtype)
        delta = rewards[t] + gamma * next_value * not_done - values[t]
        next_advantage = delta + gamma * lam * not_done * next_advantage
        advantages[t] = next_advantage
        next_value = values[t]
    return advantages, advantages + values


# ---------------------------------------------------------------------------------------------------------------
# Rollout buffer: image indices and masks, never copies of embeddings
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RolloutBuffer:
    """One episode of T steps for B samples. Allocate with :meth:`allocate`, fill with :meth:`add`.

    The state ``F_I * M_{t-1}`` is not stored: ``image_index`` points into the embeddings tensor the trainer
    holds, and the previous mask is kept in float16 (a (1, 64, 64) mask is 8 KiB; an embedding is 4 MiB).
    """

    image_index: Tensor
    """(T, B) long: row of the trainer's embeddings tensor"""
    prev_mask: Tensor
    """(T, B, 1, h, w) float16: mask probability M_{t-1} seen at step t"""
    history: Tensor
    """(T, B, A) bool: actions chosen before step t"""
    action: Tensor
    """(T, B) long"""
    logprob: Tensor
    """(T, B) float: log pi_old(a_t | s_t)"""
    value: Tensor
    """(T, B) float: V_old(s_t)"""
    reward: Tensor
    """(T, B) float: r_t"""
    filled: Tensor = field(default=None)  # type: ignore[assignment]
    """(T,) bool: which steps were added"""

    def __post_init__(self) -> None:
        if self.filled is None:
            self.filled = torch.zeros(self.reward.shape[0], dtype=torch.bool)

    @classmethod
    def allocate(
        cls,
        steps: int,
        batch: int,
        mask_size: tuple[int, int],
        num_actions: int,
        device: torch.device | str | None = None,
    ) -> RolloutBuffer:
        """Empty buffer for ``steps`` (T) steps of ``batch`` (B) samples, masks of ``mask_size`` (h, w)."""
        h, w = mask_size
        return cls(
            image_index=torch.zeros(steps, batch, dtype=torch.long, device=device),
            prev_mask=torch.zeros(steps, batch, 1, h, w, dtype=torch.float16, device=device),
            history=torch.zeros(steps, batch, num_actions, dtype=torch.bool, device=device),
            action=torch.zeros(steps, batch, dtype=torch.long, device=device),
            logprob=torch.zeros(steps, batch, device=device),
            value=torch.zeros(steps, batch, device=device),
            reward=torch.zeros(steps, batch, device=device),
        )

    @property
    def steps(self) -> int:
        return self.reward.shape[0]

    @property
    def batch(self) -> int:
        return self.reward.shape[1]

    def add(
        self,
        step: int,
        image_index: Tensor,
        prev_mask: Tensor,
        history: Tensor,
        action: Tensor,
        logprob: Tensor,
        value: Tensor,
        reward: Tensor,
    ) -> None:
        """Store step ``step`` for all B samples.

        Arguments:
          image_index (Tensor): (B,) long. prev_mask (Tensor): (B, 1, h, w) probabilities.
          history (Tensor): (B, A), nonzero for actions chosen before this step.
          action (Tensor): (B,) long. logprob, value, reward (Tensor): (B,).
        """
        self.image_index[step] = image_index
        self.prev_mask[step] = prev_mask.detach().to(torch.float16)
        self.history[step] = history.bool()
        self.action[step] = action
        self.logprob[step] = logprob.detach()
        self.value[step] = value.detach()
        self.reward[step] = reward
        self.filled[step] = True

    def flatten(self) -> dict[str, Tensor]:
        """All fields with the (T, B) leading dimensions merged into one of size T*B (step-major)."""
        n = self.steps * self.batch
        return {
            "image_index": self.image_index.reshape(n),
            "prev_mask": self.prev_mask.reshape(n, *self.prev_mask.shape[2:]),
            "history": self.history.reshape(n, self.history.shape[2]),
            "action": self.action.reshape(n),
            "logprob": self.logprob.reshape(n),
            "value": self.value.reshape(n),
            "reward": self.reward.reshape(n),
        }


# ---------------------------------------------------------------------------------------------------------------
# Losses and the update
# ---------------------------------------------------------------------------------------------------------------


def ppo_losses(
    new_logprob: Tensor,
    old_logprob: Tensor,
    advantages: Tensor,
    values: Tensor,
    returns: Tensor,
    entropy: Tensor,
    cfg: PPOConfig,
) -> dict[str, Tensor]:
    """PPO's clipped surrogate (paper Eq. 8-9), the critic's squared error (Eq. 10) and the entropy bonus.

    ratio = exp(new_logprob - old_logprob)
    actor_loss = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))   (= -mean of the clipped objective)
    value_loss = mean((V - Q)^2)
    loss = actor_loss + value_coef * value_loss - entropy_coef * mean(entropy)

    Arguments:
      new_logprob, old_logprob, advantages, values, returns, entropy (Tensor): (N,) each.
      cfg (PPOConfig): clip_eps, value_coef, entropy_coef.

    Returns:
      (dict[str, Tensor]): scalars ``loss``, ``actor_loss``, ``value_loss``, ``entropy``, ``approx_kl``
        (the low-variance estimator mean((ratio - 1) - log ratio)), ``clip_frac`` (share of clipped ratios).
    """
    log_ratio = new_logprob - old_logprob
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps)
    actor_loss = torch.max(unclipped, clipped).mean()
    value_loss = (values - returns).pow(2).mean()
    entropy_mean = entropy.mean()
    loss = actor_loss + cfg.value_coef * value_loss - cfg.entropy_coef * entropy_mean
    with torch.no_grad():
        approx_kl = ((ratio - 1.0) - log_ratio).mean()
        clip_frac = ((ratio - 1.0).abs() > cfg.clip_eps).float().mean()
    return {
        "loss": loss,
        "actor_loss": actor_loss,
        "value_loss": value_loss,
        "entropy": entropy_mean,
        "approx_kl": approx_kl,
        "clip_frac": clip_frac,
    }


@torch.no_grad()
def _pool_states(
    agent: PromptAgent, embeddings: Tensor, image_index: Tensor, prev_mask: Tensor, chunk: int = 32
) -> Tensor:
    """Rebuild ``F_I * M_{t-1}`` from image indices and masks and pool it, in chunks (bounded memory)."""
    device = next(agent.parameters()).device
    pooled = []
    for start in range(0, image_index.shape[0], chunk):
        index = image_index[start : start + chunk].to(embeddings.device)
        embedding = embeddings[index].to(device)
        mask = prev_mask[start : start + chunk].to(device)
        pooled.append(agent.pool_state(embedding, mask))
    return torch.cat(pooled)


def ppo_update(
    agent: PromptAgent,
    optimizer: torch.optim.Optimizer,
    buffer: RolloutBuffer,
    embeddings: Tensor,
    cfg: PPOConfig,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """K epochs of clipped PPO on one episode's buffer.

    The states are rebuilt from ``embeddings[image_index] * prev_mask``. Because :meth:`PromptAgent.pool_state`
    has no parameters, this is done once per update (in chunks, without gradients) and the K epochs reuse the
    small pooled states (as the stem's inputs, :meth:`PromptAgent.stem_inputs`); it is the same computation as
    rebuilding them in every minibatch, 20x cheaper.

    Arguments:
      agent (PromptAgent): the actor-critic, trained in place.
      optimizer (torch.optim.Optimizer): over the agent's parameters (paper: Adam, ``cfg.lr``).
      buffer (RolloutBuffer): a full episode, T x B.
      embeddings (Tensor): (N, C, h, w) SAM embeddings indexed by ``buffer.image_index``.
      cfg (PPOConfig): hyperparameters.
      generator (torch.Generator | None): for the minibatch shuffles (CPU generator).

    Returns:
      (dict[str, float]): means over all minibatch steps of ``actor_loss``, ``value_loss``, ``entropy``,
        ``approx_kl``, ``clip_frac``.
    """
    if not bool(buffer.filled.all()):
        missing = (~buffer.filled).nonzero().flatten().tolist()
        raise ValueError(f"rollout buffer is incomplete: steps {missing} were never added")
    device = next(agent.parameters()).device

    # 1. Returns Q_t and advantages A_t = Q_t - V(s_t) (or GAE); the episode ends after step T.
    reward = buffer.reward.to(device)
    old_value = buffer.value.to(device)
    if cfg.gae_lambda is None:
        returns = discounted_returns(reward, cfg.gamma)
        advantages = returns - old_value
    else:
        last_value = torch.zeros_like(reward[0])
        advantages, returns = gae(reward, old_value, last_value, cfg.gamma, cfg.gae_lambda)
    advantages, returns = advantages.reshape(-1), returns.reshape(-1)
    if cfg.normalize_advantages and advantages.numel() > 1:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

    # 2. States, rebuilt from image indices and masks.
    flat = buffer.flatten()
    pooled = _pool_states(agent, embeddings, flat["image_index"], flat["prev_mask"])
    history = flat["history"].to(device)
    with torch.no_grad():  # parameter-free, so built once for the K epochs
        tokens = agent.stem_inputs(pooled, history)
    action = flat["action"].to(device)
    old_logprob = flat["logprob"].to(device)

    # 3. K epochs of minibatch steps.
    n = tokens.shape[0]
    minibatch = cfg.minibatch_size or n
    totals = {"actor_loss": 0.0, "value_loss": 0.0, "entropy": 0.0, "approx_kl": 0.0, "clip_frac": 0.0}
    updates = 0
    agent.train()
    for _ in range(cfg.epochs):
        if minibatch >= n:  # one full-batch step: the order does not matter, skip copying the buffer
            batches: list[Tensor | slice] = [slice(None)]
        else:
            order = torch.randperm(n, generator=generator).to(device)
            batches = [order[start : start + minibatch] for start in range(0, n, minibatch)]
        for idx in batches:
            logits, value = agent.forward_tokens(tokens[idx], history[idx])
            dist = policy_distribution(logits, history[idx], cfg.mask_repeats)
            losses = ppo_losses(
                dist.log_prob(action[idx]),
                old_logprob[idx],
                advantages[idx],
                value,
                returns[idx],
                dist.entropy(),
                cfg,
            )
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
            optimizer.step()
            for key in totals:
                totals[key] += float(losses[key].detach())
            updates += 1
    return {key: total / updates for key, total in totals.items()}
