"""The PPO actor-critic that chooses where to prompt SAM (paper section 3.2).

The state is ``s_t = F_I * M_{t-1}``: the frozen SAM image embedding times the previous mask probability,
resized to the embedding grid. The action is one cell of a ``grid_h x grid_w`` grid laid over the image
(paper: 10 x 10 patches of 80 px on an 800 x 800 image); action ``a = row * grid_w + col`` (row-major, row = y).
The trainer prompts SAM at the chosen cell's centre.

Architecture (and why it differs from a plain "convs at the embedding resolution" network)::

    [P(F_I * M), M]  (B, r+1, h, w)           P: a fixed projection onto r of C channels (alignsam.projection)
      -> adaptive average pool to the action grid, one token per cell       (B, A, r+1)   parameter-free
      -> with each cell's 3x3 neighbourhood mean appended                   (B, A, 2r+2)  parameter-free
      -> stem: ReLU(LayerNorm(W x + w_h history + b))                       (B, A, hidden)
         (the history bit is the stem input's last channel, w_h its weight column: one matmul)
      -> policy head: ReLU(W_f f + W_g mean(f)) -> linear                   one logit per cell
      -> value head: MLP on [mean(f), history] -> scalar

* Cost is the design constraint: PPO runs K=20 epochs of forward+backward over every stored step, and an epoch
  over cell tokens is memory-bound, so the network is as few token-sized ops as will learn: a fixed channel
  projection (the stem reads 2r+2 channels), linear layers over cell tokens instead of small convolutions, the
  neighbourhood as parameter-free input channels, history as a rank-1 term, sums instead of concatenations,
  channels-last pooled states (the cell tokens are a view). The stem's LayerNorm is kept: the agent learns
  worse without it. Measurements: ``benchmarks/results/method_notes.md`` and ``policy_choices.md``.
* A linear map commutes with average pooling, so pooling the state to the action grid first and then applying
  the stem (and the projection) is exactly the same function as stem-then-pool, at (h*w)/A less compute.
  Because pooling, projection and the neighbourhood mean have no trained parameters,
  :meth:`PromptAgent.pool_state` runs once per PPO update under ``no_grad`` and the K epochs reuse its output.
* LayerNorm over each cell's channels, no BatchNorm and no attention across samples: a sample's logits never
  depend on the other samples in its batch (rollout and update see the same policy).
* The global-mean features enter every cell's logit, so a cell is scored relative to the whole image (what the
  current mask believes the target looks like), which a purely local head cannot do; the neighbourhood channels
  let a cell's score depend on what surrounds it.
* History: with ``use_history`` the map of already-chosen cells enters the stem and the value input (it
  also tells the critic how far into the episode it is). Independently, :func:`masked_logits` forbids repeats
  outright; both are on by default and can be switched off to measure.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Categorical

from alignsam.projection import ChannelProjection


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


class PromptAgent(nn.Module):
    """Actor-critic over the prompt grid.

    Arguments:
      embed_dim (int): C, the channel count of SAM's image embedding.
      grid (tuple[int, int]): (grid_h, grid_w) of the action grid; A = grid_h * grid_w.
      hidden (int): channel width.
      use_history (bool): feed the map of already-chosen actions to the stem and the value head.
      state_channels (int | None): r, the embedding channels kept by the fixed projection (fit it with
        :meth:`fit_projection`); None or >= C keeps all C channels unprojected.
    """

    def __init__(
        self,
        embed_dim: int,
        grid: tuple[int, int] = (10, 10),
        hidden: int = 16,
        use_history: bool = True,
        state_channels: int | None = 32,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.grid = (int(grid[0]), int(grid[1]))
        self.num_actions = self.grid[0] * self.grid[1]
        self.hidden = hidden
        self.use_history = use_history
        self.projection = (
            ChannelProjection(embed_dim, state_channels)
            if state_channels is not None and state_channels < embed_dim else None
        )
        state_dim = (state_channels if self.projection is not None else embed_dim) + 1

        self.stem = nn.Linear(2 * state_dim, hidden)  # the cell's state and its 3x3 neighbourhood mean
        self.stem_history = nn.Parameter(torch.zeros(hidden)) if use_history else None
        self.stem_norm = nn.LayerNorm(hidden)
        self.policy_cell = nn.Linear(hidden, hidden)
        self.policy_global = nn.Linear(hidden, hidden, bias=False)
        self.policy_out = nn.Linear(hidden, 1)
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
        nn.init.orthogonal_(self.policy_out.weight, gain=0.01)
        nn.init.zeros_(self.policy_out.bias)
        last_value = self.value_head[-1]
        nn.init.orthogonal_(last_value.weight, gain=1.0)
        nn.init.zeros_(last_value.bias)
        if self.stem_history is not None:
            nn.init.normal_(self.stem_history, std=0.1)

    @torch.no_grad()
    def fit_projection(self, embeddings: Tensor, seed: int = 0) -> None:
        """Fit the state projection to the training images' embeddings ``(N, C, h, w)`` (no-op without one)."""
        if self.projection is not None:
            self.projection.fit(embeddings, seed=seed)

    @torch.no_grad()
    def project(self, embeddings: Tensor) -> Tensor:
        """``(N, C, h, w)`` embeddings -> ``(N, r, h, w)`` in the agent's dtype, for :meth:`pool_state` (the
        embeddings themselves, in that dtype, without a projection)."""
        embeddings = embeddings.to(self.stem.weight.dtype)
        return self.projection(embeddings) if self.projection is not None else embeddings

    def pool_state(self, embedding: Tensor, prev_mask: Tensor) -> Tensor:
        """Form the state ``F_I * M_{t-1}``, average-pool it to the action grid and project it. No trained
        parameters.

        Arguments:
          embedding (Tensor): (B, C, h, w) SAM image embeddings F_I, or (B, r, h, w) embeddings already
            projected by :meth:`project` (the same state: the projection commutes with the product and the pooling;
            the trainer projects each image once per run instead of every state at every step).
          prev_mask (Tensor): (B, 1, h, w) previous mask probability M_{t-1} in [0, 1].

        Returns:
          (Tensor): (B, 2r+2, grid_h, grid_w): the pooled state (r channels, then the pooled mask), then the
            mean of the same r+1 channels over each cell's 3x3 neighbourhood (the cells that exist, at borders).
        """
        projected = self.projection is not None and embedding.shape[1] == self.projection.rank
        if embedding.shape[1] != self.embed_dim and not projected:
            raise ValueError(f"embedding has {embedding.shape[1]} channels, agent expects {self.embed_dim}")
        dtype = self.stem.weight.dtype  # e.g. float16 cached embeddings, float32 agent
        embedding, prev_mask = embedding.to(dtype), prev_mask.to(dtype)
        # Channels-last memory throughout: PyTorch's CPU pooling kernels are several times faster on it at these
        # sizes, and forward_pooled's cell tokens (B, A, 2r+2) are then a view, not a copy per epoch.
        channels_last = torch.channels_last
        if self.projection is not None and not projected:
            pooled = F.adaptive_avg_pool2d((embedding * prev_mask).contiguous(memory_format=channels_last), self.grid)
            pooled = self.projection(pooled)
            state = torch.cat([pooled, F.adaptive_avg_pool2d(prev_mask, self.grid)], dim=1)
            state = state.contiguous(memory_format=channels_last)
        else:  # pooling a channels-last input gives a channels-last output
            state = torch.cat([embedding * prev_mask, prev_mask], dim=1).contiguous(memory_format=channels_last)
            state = F.adaptive_avg_pool2d(state, self.grid)
        neighbours = F.avg_pool2d(state, 3, stride=1, padding=1, count_include_pad=False)  # borders: what exists
        return torch.cat([state, neighbours], dim=1).contiguous(memory_format=channels_last)

    def stem_inputs(self, pooled: Tensor, history: Tensor) -> Tensor:
        """The stem's input per cell: the pooled state's channels, then (with ``use_history``) the history bit.

        No trained parameters, so a PPO update builds it once and its K epochs reuse it (see
        :meth:`forward_tokens`).

        Arguments:
          pooled (Tensor): (B, 2r+2, grid_h, grid_w) from :meth:`pool_state`.
          history (Tensor): (B, A), nonzero where the action was already chosen this episode.

        Returns:
          (Tensor): (B, A, 2r+3) contiguous (B, A, 2r+2 without history), in the pooled state's dtype.
        """
        tokens = pooled.flatten(2).transpose(1, 2)  # B x A x (2r+2), a view of the channels-last state
        if self.stem_history is None:
            return tokens
        return torch.cat([tokens, history.to(tokens.dtype)[:, :, None]], dim=2)

    def forward_tokens(self, tokens: Tensor, history: Tensor) -> tuple[Tensor, Tensor]:
        """Policy logits and value from :meth:`stem_inputs` (the same function as :meth:`forward_pooled`).

        Arguments:
          tokens (Tensor): (B, A, 2r+3) (2r+2 without history) from :meth:`stem_inputs`.
          history (Tensor): (B, A), 1.0 where the action was already chosen this episode, else 0 (value input).

        Returns:
          (Tensor): (B, A) raw policy logits. (Tensor): (B,) state value V(s_t).
        """
        # PPO's K epochs run this over every stored step, and its cost is memory passes over (B, A, hidden)
        # tensors, so it is written in as few as give the same function: the history term is the stem weight's
        # last column (the rank-1 addcmul folded into the matmul), the global term is baddbmm's per-sample
        # bias (no broadcast add), and the ReLUs run in place (LayerNorm's and baddbmm's backward do not read
        # their outputs). 16 x 16 grid: 20-28% less per epoch (benchmarks/results/method_notes.md).
        weight = self.stem.weight
        if self.stem_history is not None:
            weight = torch.cat([weight, self.stem_history[:, None]], dim=1)
        f = F.relu(self.stem_norm(F.linear(tokens, weight, self.stem.bias)), inplace=True)  # B x A x hidden
        global_features = f.mean(dim=1)  # B x hidden
        bias = (self.policy_global(global_features) + self.policy_cell.bias)[:, None]  # B x 1 x hidden
        cell = self.policy_cell.weight.t().expand(f.shape[0], -1, -1)
        z = F.relu(torch.baddbmm(bias, f, cell), inplace=True)
        logits = self.policy_out(z).squeeze(2)
        value_inputs = [global_features]
        if self.stem_history is not None:
            value_inputs.append(history.to(f.dtype))
        value = self.value_head(torch.cat(value_inputs, dim=1)).squeeze(1)
        return logits, value

    def forward_pooled(self, pooled: Tensor, history: Tensor) -> tuple[Tensor, Tensor]:
        """Policy logits and value from an already pooled state (see :meth:`pool_state`).

        Arguments:
          pooled (Tensor): (B, 2r+2, grid_h, grid_w) from :meth:`pool_state`.
          history (Tensor): (B, A), 1.0 where the action was already chosen this episode, else 0.

        Returns:
          (Tensor): (B, A) raw policy logits (apply :func:`policy_distribution` to sample).
          (Tensor): (B,) state value V(s_t).
        """
        return self.forward_tokens(self.stem_inputs(pooled, history), history)

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
