"""The PPO actor-critic that chooses where to prompt SAM (paper section 3.2).

The state is ``s_t = F_I * M_{t-1}``: the frozen SAM image embedding times the previous mask probability,
resized to the embedding grid. The action is one cell of a ``grid_h x grid_w`` grid laid over the image
(paper: 10 x 10 patches of 80 px on an 800 x 800 image); action ``a = row * grid_w + col`` (row-major, row = y).
The trainer prompts SAM at the chosen cell's centre.

Architecture (and why it differs from a plain "convs at the embedding resolution" network)::

    [F_I * M, M]  (B, C+1, h, w)
      -> adaptive average pool to the action grid           (B, C+1, gh, gw)   parameter-free, see below
      -> 1x1 conv stem -> GroupNorm -> ReLU                  (B, hidden, gh, gw)
      -> 2 x [3x3 conv -> GroupNorm -> ReLU]                 neighbouring cells see each other
      -> policy head: 1x1 convs on [cell features, global mean features, history map] -> one logit per cell
      -> value head: MLP on [global mean features, history] -> scalar

* A 1x1 convolution commutes with average pooling, so pooling first and then applying the stem is exactly the
  same function as stem-then-pool, at (h*w)/(gh*gw) ~ 40x less compute for a 64 x 64 embedding. The cost that
  matters: PPO runs K=20 epochs of forward+backward over every stored step, and the issue caps everything that is
  not SAM at +50% over the SAM decoder calls. Measured on one CPU thread (vit_b sizes, C=256): SAM's decoder is
  ~220 ms per sample, this network ~1 ms forward+backward per sample at a 10 x 10 grid, while the same layers at a
  20 x 20 resolution cost ~4.7 ms (x20 epochs ~ 40% of the budget on their own).
* Because the pooling has no parameters, :meth:`PromptAgent.pool_state` can run once per PPO update under
  ``no_grad`` and the K epochs reuse its output (the ``F_I * M`` product over the full embedding is the single
  most expensive step, ~5 ms per sample).
* GroupNorm (not BatchNorm) and no attention: every operation is per sample, so a sample's logits never depend
  on the other samples in its batch (rollout and update see the same policy).
* The global-mean features broadcast to every cell let a cell be scored relative to the whole image (what the
  current mask believes the target looks like), which a purely local head cannot do.
* History: with ``use_history`` the map of already-chosen cells is an extra input channel of the policy head
  and part of the value input (it also tells the critic how far into the episode it is). Independently,
  :func:`masked_logits` forbids repeats outright; both are on by default and can be switched off to measure.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Categorical


def masked_logits(logits: Tensor, history: Tensor) -> Tensor:
    """Forbid actions already chosen in this episode.

    Arguments:
      logits (Tensor): (B, A) raw policy logits.
      history (Tensor): (B, A), nonzero where the action was already chosen.

    Returns:
      (Tensor): (B, A) logits with chosen actions set to ``finfo(dtype).min / 2``. A finite value rather than
        ``-inf`` keeps ``softmax``, ``log_softmax`` and the entropy free of NaN (``0 * -inf``), even in the
        degenerate case where every action was chosen (then the distribution is uniform).
    """
    very_negative = torch.finfo(logits.dtype).min / 2
    return logits.masked_fill(history.bool(), very_negative)


def policy_distribution(logits: Tensor, history: Tensor, mask_repeats: bool = True) -> Categorical:
    """The categorical policy over the action grid.

    Arguments:
      logits (Tensor): (B, A) raw policy logits from :class:`PromptAgent`.
      history (Tensor): (B, A), nonzero where the action was already chosen this episode.
      mask_repeats (bool): if True, already-chosen actions get (numerically) zero probability.

    Returns:
      (Categorical): batch shape (B,), over A actions.
    """
    if mask_repeats:
        logits = masked_logits(logits, history)
    return Categorical(logits=logits)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


class PromptAgent(nn.Module):
    """Actor-critic over the prompt grid.

    Arguments:
      embed_dim (int): C, the channel count of SAM's image embedding.
      grid (tuple[int, int]): (grid_h, grid_w) of the action grid; A = grid_h * grid_w.
      hidden (int): channel width of the trunk.
      use_history (bool): feed the map of already-chosen actions to the policy and value heads.
    """

    def __init__(
        self,
        embed_dim: int,
        grid: tuple[int, int] = (10, 10),
        hidden: int = 64,
        use_history: bool = True,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.grid = (int(grid[0]), int(grid[1]))
        self.num_actions = self.grid[0] * self.grid[1]
        self.hidden = hidden
        self.use_history = use_history

        self.trunk = nn.Sequential(
            nn.Conv2d(embed_dim + 1, hidden, kernel_size=1),
            _group_norm(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, kernel_size=3, padding=1),
            _group_norm(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, kernel_size=3, padding=1),
            _group_norm(hidden),
            nn.ReLU(),
        )
        history_channels = 1 if use_history else 0
        self.policy_head = nn.Sequential(
            nn.Conv2d(2 * hidden + history_channels, hidden, kernel_size=1),
            nn.ReLU(),
            nn.Conv2d(hidden, 1, kernel_size=1),
        )
        history_features = self.num_actions if use_history else 0
        self.value_head = nn.Sequential(
            nn.Linear(hidden + history_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )
        self._init_heads()

    def _init_heads(self) -> None:
        # As in CleanRL: a tiny last policy layer starts the policy near uniform (explores every cell);
        # the value head starts at unit scale.
        last_policy = self.policy_head[-1]
        nn.init.orthogonal_(last_policy.weight, gain=0.01)
        nn.init.zeros_(last_policy.bias)
        last_value = self.value_head[-1]
        nn.init.orthogonal_(last_value.weight, gain=1.0)
        nn.init.zeros_(last_value.bias)

    def pool_state(self, embedding: Tensor, prev_mask: Tensor) -> Tensor:
        """Form the state ``F_I * M_{t-1}`` and average-pool it to the action grid. Has no parameters.

        Arguments:
          embedding (Tensor): (B, C, h, w) SAM image embeddings F_I.
          prev_mask (Tensor): (B, 1, h, w) previous mask probability M_{t-1} in [0, 1].

        Returns:
          (Tensor): (B, C+1, grid_h, grid_w), the pooled state with the pooled mask as its last channel.
        """
        if embedding.shape[1] != self.embed_dim:
            raise ValueError(f"embedding has {embedding.shape[1]} channels, agent expects {self.embed_dim}")
        dtype = self.trunk[0].weight.dtype  # e.g. float16 cached embeddings, float32 agent
        embedding, prev_mask = embedding.to(dtype), prev_mask.to(dtype)
        state = torch.cat([embedding * prev_mask, prev_mask], dim=1)
        return F.adaptive_avg_pool2d(state, self.grid)

    def forward_pooled(self, pooled: Tensor, history: Tensor) -> tuple[Tensor, Tensor]:
        """Policy logits and value from an already pooled state (see :meth:`pool_state`).

        Arguments:
          pooled (Tensor): (B, C+1, grid_h, grid_w) from :meth:`pool_state`.
          history (Tensor): (B, A), 1.0 where the action was already chosen this episode, else 0.

        Returns:
          (Tensor): (B, A) raw policy logits (apply :func:`policy_distribution` to sample).
          (Tensor): (B,) state value V(s_t).
        """
        batch = pooled.shape[0]
        features = self.trunk(pooled)  # B x hidden x gh x gw
        global_features = features.mean(dim=(2, 3))  # B x hidden
        policy_inputs = [features, global_features[:, :, None, None].expand_as(features)]
        value_inputs = [global_features]
        if self.use_history:
            history = history.to(features.dtype)
            policy_inputs.append(history.reshape(batch, 1, *self.grid))
            value_inputs.append(history)
        logits = self.policy_head(torch.cat(policy_inputs, dim=1)).reshape(batch, self.num_actions)
        value = self.value_head(torch.cat(value_inputs, dim=1)).squeeze(1)
        return logits, value

    def forward(self, embedding: Tensor, prev_mask: Tensor, history: Tensor) -> tuple[Tensor, Tensor]:
        """Policy logits and state value.

        Arguments:
          embedding (Tensor): (B, C, h, w) SAM image embeddings F_I.
          prev_mask (Tensor): (B, 1, h, w) previous mask probabilities M_{t-1} in [0, 1].
          history (Tensor): (B, A), 1.0 where the action was already chosen this episode, else 0.

        Returns:
          (Tensor): (B, A) raw policy logits, action a = row * grid_w + col.
          (Tensor): (B,) state value V(s_t).
        """
        return self.forward_pooled(self.pool_state(embedding, prev_mask), history)

    @torch.no_grad()
    def act(
        self,
        embedding: Tensor,
        prev_mask: Tensor,
        history: Tensor,
        mask_repeats: bool = True,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Choose one action per sample (rollouts: sampled; inference: ``deterministic=True`` takes the argmax).

        Arguments:
          embedding (Tensor): (B, C, h, w); prev_mask (Tensor): (B, 1, h, w); history (Tensor): (B, A).
          mask_repeats (bool): forbid already-chosen actions (use the same value as in PPO updates).
          deterministic (bool): argmax instead of sampling.
          generator (torch.Generator | None): for reproducible sampling.

        Returns:
          (Tensor): (B,) long actions; (Tensor): (B,) their log-probabilities; (Tensor): (B,) values.
        """
        logits, value = self(embedding, prev_mask, history)
        dist = policy_distribution(logits, history, mask_repeats)
        if deterministic:
            action = dist.probs.argmax(dim=1)
        else:
            action = torch.multinomial(dist.probs, 1, generator=generator).squeeze(1)
        return action, dist.log_prob(action), value


def action_to_cell(action: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Grid (row, col) of row-major actions. action (Tensor): (...,) long. Returns two (...,) long tensors."""
    return action // grid[1], action % grid[1]
