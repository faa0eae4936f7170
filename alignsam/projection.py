"""A fixed channel projection of SAM embeddings: their leading whitened principal directions.

The agent and the SRM both start with a linear layer over the C channels of a state ``F_I * M`` (C = 256 for
every SAM preset). That layer is applied in every forward *and* backward pass: K = 20 PPO epochs over every
stored step, M SRM updates after every action. Its input is the most expensive part of both networks, and next to
a cheap SAM (the ``small`` preset) it would cost more than SAM's decoder.

Because the state is a per-position product ``F_I(p) * M(p)`` and a projection ``P`` is per-position linear,
``P (F_I * M) = (P F_I) * M``, and it commutes with average pooling. So projecting the (pooled) state onto r
fixed directions is exactly the same as running the networks on r-channel embeddings. The directions are fitted
once per training run from that run's own embeddings (uncentred second moment; the state is a product with a
mask, so it has no fixed mean to remove) and whitened (unit variance per direction), and they travel with the
policy as buffers, so inference applies the same map.

Choice: r = 32 of 256 directions (``benchmarks/results/policy_choices.md``: what it costs in quality and saves in
time; ``method_notes.md``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ChannelProjection(nn.Module):
    """``(B, C, ...) -> (B, r, ...)``, a fixed (not trained) linear map over the channel dimension.

    Arguments:
      channels (int): C, the embedding's channels.
      rank (int): r <= C, the output channels. Until :meth:`fit` runs, the map keeps the first r channels.
    """

    def __init__(self, channels: int, rank: int) -> None:
        super().__init__()
        if not 0 < rank <= channels:
            raise ValueError(f"projection rank must be in 1..{channels}, got {rank}")
        self.channels = channels
        self.rank = rank
        self.register_buffer("weight", torch.eye(channels)[:rank].clone())

    @torch.no_grad()
    def fit(self, embeddings: Tensor, max_positions: int = 65536, seed: int = 0) -> Tensor:
        """Set the map to the r leading whitened eigenvectors of the channels' second moment.

        Arguments:
          embeddings (Tensor): (N, C, h, w) embeddings of the training images.
          max_positions (int): use at most this many positions (a seeded random subset).
          seed (int): for that subset.

        Returns:
          (Tensor): (C,) eigenvalues, largest first (what share of the energy the r directions keep).
        """
        if embeddings.shape[1] != self.channels:
            raise ValueError(f"embeddings have {embeddings.shape[1]} channels, the projection {self.channels}")
        x = embeddings.detach().float().permute(0, 2, 3, 1).reshape(-1, self.channels)
        if x.shape[0] > max_positions:
            gen = torch.Generator().manual_seed(seed)
            x = x[torch.randperm(x.shape[0], generator=gen)[:max_positions].to(x.device)]
        moment = (x.T @ x / max(x.shape[0], 1)).double().cpu()
        eigvals, eigvecs = torch.linalg.eigh(moment)  # ascending
        eigvals, eigvecs = eigvals.flip(0).clamp(min=0), eigvecs.flip(1)
        # A deterministic sign per direction (eigh's is arbitrary): the largest-magnitude entry is positive.
        signs = torch.sign(eigvecs.gather(0, eigvecs.abs().argmax(0, keepdim=True)))
        eigvecs = eigvecs * signs
        scale = (eigvals[: self.rank] + 1e-6 * float(eigvals[0]) + 1e-12).rsqrt()
        self.weight.copy_((eigvecs[:, : self.rank] * scale).T.to(self.weight))
        return eigvals.float()

    def forward(self, x: Tensor) -> Tensor:
        """Project ``x`` (B, C, ...) to (B, r, ...)."""
        w = self.weight.to(x.dtype)
        return torch.einsum("rc,bc...->br...", w, x)
