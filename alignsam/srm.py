"""Semantic Recalibration Module (paper section 3.3): which prompt points are foreground.

The SRM predicts a foreground probability for every position of SAM's embedding grid from two states:

* spatial state ``F_I * P_{t-1}``: SAM's embedding times SAM's previous probability map;
* semantic state ``F_I * A_clip``: SAM's embedding times the CLIP-Surgery similarity map of the label's text.

The implicit branch (abstract targets: saliency, blur, glass) uses the spatial state only: two convolution
blocks. The explicit branch (concrete objects) fuses both states with three convolution layers, relates all
positions with one self-attention layer, and decodes with two convolution layers. Both also say whether the
target is present at all (``presence_logit``), so a label absent from an image can yield no region.

The chosen action's label is the SRM's prediction at its position, and at inference the first prompt pair is
the SRM's highest- and lowest-scoring positions inside the image (both read in :mod:`alignsam.rollout`).

Cost. The SRM is trained M times after every action (paper: M=5 for the explicit branch), so it must be cheap
next to the SAM decoder call that each action costs. Five choices keep it so (their measurements:
``benchmarks/results/method_notes.md``):

* Both states are projected onto r = 32 fixed, whitened principal directions of the run's SAM embeddings
  (:mod:`alignsam.projection`; exact for the stems, which are linear per position), so the stems read r+1
  channels instead of C+1; the width is 32.
* The inputs are average-pooled to at most ``work_grid`` x ``work_grid`` before any layer. The first layer of
  each state is a 1x1 convolution, which commutes with average pooling, so this is exact for that layer, and
  the pooling has no parameters, so :meth:`SRM.pool_spatial` / :meth:`SRM.pool_semantic` can run once per
  action (and once per image for the semantic state) while the M updates reuse them. The logits are upsampled
  bilinearly back to the embedding grid (h, w), where the loss is taken.
* Self-attention runs over at most ``attn_grid`` x ``attn_grid`` tokens (pooled, then upsampled back and added
  as a residual): its cost grows with tokens squared, and 8 x 8 tokens already relate every region of the image
  to every other, which is what the layer is for; the convolutions around it keep the 16 x 16 detail.
* GroupNorm and LayerNorm only: every operation is per sample; attention is over the positions of one sample,
  never across the batch.
* Each of the M updates after an action trains on a few images of the rollout batch, not all of it
  (:func:`update_subsets`; 8 images for the implicit branch, 2 for each of the explicit one's 5 updates). The
  paper steps one image at a time and updates on that image; updating on all B images of a batched rollout
  would cost B times its SRM work per action, for no measurable gain in quality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignsam.projection import ChannelProjection

Branch = Literal["implicit", "explicit"]


@dataclass
class SRMConfig:
    """SRM hyperparameters (paper section 4.1: M = 1 update per action for implicit, 5 for explicit)."""

    branch: Branch = "implicit"
    """which branch to train"""
    updates_implicit: int = 1
    """M for the implicit branch"""
    updates_explicit: int = 5
    """M for the explicit branch"""
    lr: float = 1e-3
    """Adam learning rate"""
    hidden: int = 32
    """channel width"""
    state_channels: int | None = 32
    """r: embedding channels kept by the fixed projection of the states (None: all); see alignsam.projection"""
    attn_grid: int = 8
    """self-attention runs on at most attn_grid x attn_grid tokens (64: see the module docstring)"""
    work_grid: int = 16
    """layers run on at most work_grid x work_grid positions (cost; see the module docstring)"""
    fuse_kernel: int = 3
    """kernel size of the explicit branch's fusion convolution (1 is cheaper; see ``SRM``)"""
    update_images_implicit: int | None = 8
    """images per SRM update, implicit branch (None: the whole rollout batch); see :func:`update_subsets`"""
    update_images_explicit: int | None = 2
    """images per SRM update, explicit branch (M=5 updates of 2: 10 image states per action)"""

    @property
    def updates_per_step(self) -> int:
        """M, the SRM updates after each action, for ``branch``."""
        return self.updates_explicit if self.branch == "explicit" else self.updates_implicit

    @property
    def update_images(self) -> int | None:
        """Images per SRM update for ``branch`` (None: the whole rollout batch)."""
        return self.update_images_explicit if self.branch == "explicit" else self.update_images_implicit


class SRMOutput(NamedTuple):
    logits: Tensor
    """(B, 1, h, w) foreground logits per embedding position"""
    presence_logit: Tensor
    """(B,) logit that the target is present in the image at all"""


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


def _conv_block(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
        _group_norm(out_channels),
        nn.ReLU(),
    )


class _PositionSelfAttention(nn.Module):
    """Pre-norm self-attention over the positions of each sample, on at most ``grid`` x ``grid`` tokens.

    Like a non-local block it has no positional encoding: it relates positions by content; where things are
    comes from the surrounding convolutions and the residual.
    """

    def __init__(self, channels: int, num_heads: int, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.norm = nn.LayerNorm(channels)
        self.attn = nn.MultiheadAttention(channels, num_heads, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        """x (Tensor): (B, D, H, W) -> (B, D, H, W)."""
        b, d, h, w = x.shape
        size = (min(h, self.grid), min(w, self.grid))
        small = F.adaptive_avg_pool2d(x, size) if size != (h, w) else x
        tokens = self.norm(small.flatten(2).transpose(1, 2))  # B x (size) x D: batch_first, per sample
        attended, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        attended = attended.transpose(1, 2).reshape(b, d, *size)
        if size != (h, w):
            attended = F.interpolate(attended, size=(h, w), mode="bilinear", align_corners=False)
        return x + attended


class SRM(nn.Module):
    """Semantic Recalibration Module.

    Arguments:
      embed_dim (int): C, the channel count of SAM's image embedding.
      branch (str): "implicit" (spatial state only) or "explicit" (spatial + CLIP semantic state, attention).
      hidden (int): channel width.
      attn_grid (int): self-attention runs on at most attn_grid x attn_grid tokens (explicit branch).
      work_grid (int): layers run on at most work_grid x work_grid positions (see the module docstring).
      num_heads (int): attention heads (explicit branch); must divide ``hidden``.
      state_channels (int | None): r, the embedding channels kept by a fixed projection of both states (fit it
        with :meth:`fit_projection`; see :mod:`alignsam.projection`); None or >= C keeps all C channels.
      fuse_kernel (int): kernel size of the explicit branch's fusion convolution. 3 (default) gives every position
        its neighbours' spatial and semantic states before the attention; 1 fuses each position alone, cheaper.
    """

    def __init__(
        self,
        embed_dim: int,
        branch: Branch,
        hidden: int = 32,
        attn_grid: int = 8,
        work_grid: int = 16,
        num_heads: int = 4,
        state_channels: int | None = 32,
        fuse_kernel: int = 3,
    ) -> None:
        super().__init__()
        if branch not in ("implicit", "explicit"):
            raise ValueError(f"SRM branch must be 'implicit' or 'explicit', got {branch!r}")
        self.embed_dim = embed_dim
        self.branch: Branch = branch
        self.hidden = hidden
        self.work_grid = work_grid
        self.projection = (
            ChannelProjection(embed_dim, state_channels)
            if state_channels is not None and state_channels < embed_dim else None
        )
        state_dim = (state_channels if self.projection is not None else embed_dim) + 1

        if branch == "implicit":
            # Two convolution blocks on the spatial state (a 1x1 stem, then 3x3 context).
            self.encoder = nn.Sequential(
                _conv_block(state_dim, hidden, 1),
                _conv_block(hidden, hidden, 3),
                _conv_block(hidden, hidden, 3),
            )
        else:
            # Three convolution layers fuse the states: one 1x1 stem per state, a fusion (3x3 by default).
            self.spatial_stem = _conv_block(state_dim, hidden, 1)
            self.semantic_stem = _conv_block(state_dim, hidden, 1)
            self.fuse = _conv_block(2 * hidden, hidden, fuse_kernel)
            if hidden % num_heads:
                raise ValueError(f"SRM hidden={hidden} must be divisible by num_heads={num_heads}")
            self.attention = _PositionSelfAttention(hidden, num_heads, attn_grid)
            # Two convolution layers decode: a 3x3 block here, the 1x1 mask head below.
            self.decoder = _conv_block(hidden, hidden, 3)
        self.mask_head = nn.Conv2d(hidden, 1, kernel_size=1)
        self.presence_head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    @classmethod
    def from_config(cls, embed_dim: int, cfg: SRMConfig) -> SRM:
        """An SRM with ``cfg``'s branch and sizes."""
        return cls(embed_dim, cfg.branch, hidden=cfg.hidden, attn_grid=cfg.attn_grid, work_grid=cfg.work_grid,
                   state_channels=cfg.state_channels, fuse_kernel=cfg.fuse_kernel)

    @torch.no_grad()
    def fit_projection(self, embeddings: Tensor, seed: int = 0) -> None:
        """Fit the states' projection to the training images' embeddings ``(N, C, h, w)`` (no-op without one)."""
        if self.projection is not None:
            self.projection.fit(embeddings, seed=seed)

    # -- states --------------------------------------------------------------------------------------------

    def _work_size(self, h: int, w: int) -> tuple[int, int]:
        return min(h, self.work_grid), min(w, self.work_grid)

    @torch.no_grad()
    def project(self, embeddings: Tensor) -> Tensor:
        """``(N, C, h, w)`` embeddings -> ``(N, r, h, w)`` in the SRM's dtype: every method that reads embeddings
        also accepts these (the same states; the projection commutes with the product and the pooling), so a
        trainer projects each image once per run (the embeddings themselves, in that dtype, without a projection)."""
        embeddings = embeddings.to(self.mask_head.weight.dtype)
        return self.projection(embeddings) if self.projection is not None else embeddings

    def _pool_product(self, embedding: Tensor, attention_map: Tensor) -> Tensor:
        projected = self.projection is not None and embedding.shape[1] == self.projection.rank
        if embedding.shape[1] != self.embed_dim and not projected:
            raise ValueError(f"embedding has {embedding.shape[1]} channels, SRM expects {self.embed_dim}")
        dtype = self.mask_head.weight.dtype  # e.g. float16 cached embeddings, float32 SRM
        embedding, attention_map = embedding.to(dtype), attention_map.to(dtype)
        if attention_map.shape[-2:] != embedding.shape[-2:]:
            raise ValueError(
                f"map of size {tuple(attention_map.shape[-2:])} does not match the embedding grid "
                f"{tuple(embedding.shape[-2:])}; resize it to the embedding grid first"
            )
        size = self._work_size(*embedding.shape[-2:])
        product = embedding * attention_map
        if size != tuple(embedding.shape[-2:]):
            product, attention_map = F.adaptive_avg_pool2d(product, size), F.adaptive_avg_pool2d(attention_map, size)
        if self.projection is not None and not projected:  # linear per position: commutes with the pooling
            product = self.projection(product)
        return torch.cat([product, attention_map], dim=1)

    def pool_spatial(self, embedding: Tensor, prev_prob: Tensor) -> Tensor:
        """Spatial state ``[F_I * P_{t-1}, P_{t-1}]`` pooled to the work grid. No parameters.

        Arguments:
          embedding (Tensor): (B, C, h, w). prev_prob (Tensor): (B, 1, h, w) in [0, 1].

        Returns:
          (Tensor): (B, r+1, h', w') with h' = min(h, work_grid), w' = min(w, work_grid) (r = C without a projection).
        """
        return self._pool_product(embedding, prev_prob)

    def pool_semantic(self, embedding: Tensor, clip_map: Tensor) -> Tensor:
        """Semantic state ``[F_I * A_clip, A_clip]`` pooled to the work grid (constant per image: cache it).

        Arguments:
          embedding (Tensor): (B, C, h, w). clip_map (Tensor): (B, 1, h, w) CLIP-Surgery similarity.

        Returns:
          (Tensor): (B, r+1, h', w').
        """
        return self._pool_product(embedding, clip_map)

    # -- network -------------------------------------------------------------------------------------------

    def forward_pooled(
        self, spatial: Tensor, semantic: Tensor | None, out_size: tuple[int, int]
    ) -> SRMOutput:
        """Predict from pooled states (see :meth:`pool_spatial`, :meth:`pool_semantic`).

        Arguments:
          spatial (Tensor): (B, r+1, h', w'). semantic (Tensor | None): (B, r+1, h', w'), explicit branch only.
          out_size (tuple[int, int]): (h, w) of the embedding grid, the size of the returned logits.

        Returns:
          (SRMOutput): logits (B, 1, h, w), presence_logit (B,).
        """
        if self.branch == "implicit":
            features = self.encoder(spatial)
        else:
            if semantic is None:
                raise ValueError(
                    "the explicit SRM branch needs the CLIP-Surgery map (clip_map) of the label's text; "
                    "pass it, or use the implicit branch"
                )
            features = self.fuse(torch.cat([self.spatial_stem(spatial), self.semantic_stem(semantic)], dim=1))
            features = self.attention(features)
            features = self.decoder(features)
        logits = self.mask_head(features)
        if tuple(logits.shape[-2:]) != tuple(out_size):
            logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
        pooled = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)
        presence_logit = self.presence_head(pooled).squeeze(1)
        return SRMOutput(logits=logits, presence_logit=presence_logit)

    def forward(self, embedding: Tensor, prev_prob: Tensor, clip_map: Tensor | None = None) -> SRMOutput:
        """Foreground logits per embedding position and the target's presence.

        Arguments:
          embedding (Tensor): (B, C, h, w) SAM image embeddings F_I.
          prev_prob (Tensor): (B, 1, h, w) SAM's previous probability map P_{t-1}, resized to (h, w). Before
            SAM has predicted anything (the first call at inference) pass ones: the state is then F_I itself.
          clip_map (Tensor | None): (B, 1, h, w) CLIP-Surgery similarity A_clip; required by the explicit
            branch, ignored by the implicit one.

        Returns:
          (SRMOutput): logits (B, 1, h, w), presence_logit (B,).
        """
        if self.branch == "explicit" and clip_map is None:
            raise ValueError(
                "the explicit SRM branch needs the CLIP-Surgery map (clip_map) of the label's text; "
                "pass it, or use the implicit branch"
            )
        spatial = self.pool_spatial(embedding, prev_prob)
        semantic = self.pool_semantic(embedding, clip_map) if self.branch == "explicit" else None
        return self.forward_pooled(spatial, semantic, tuple(embedding.shape[-2:]))


# ---------------------------------------------------------------------------------------------------------------
# Loss (paper Eq. 13): Dice + BCE
# ---------------------------------------------------------------------------------------------------------------


def dice_loss(prob: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """Soft Dice loss, per sample then averaged: ``1 - (2 sum(p g) + s) / (sum p + sum g + s)``.

    The smoothing ``s`` (1.0, in pixels of the embedding grid) keeps an empty target defined: a perfect empty
    prediction scores 0, and every predicted pixel on an empty target is penalised.

    Arguments:
      prob (Tensor): (B, ...) probabilities in [0, 1]. target (Tensor): (B, ...) in {0, 1}.

    Returns:
      (Tensor): scalar.
    """
    prob = prob.flatten(1)
    target = target.flatten(1).to(prob.dtype)
    intersection = (prob * target).sum(1)
    dice = (2 * intersection + smooth) / (prob.sum(1) + target.sum(1) + smooth)
    return (1 - dice).mean()


def bce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Binary cross-entropy on logits, averaged over all elements. logits, target (Tensor): same shape."""
    return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))


def srm_loss(out: SRMOutput, gt: Tensor, present: Tensor | None = None) -> Tensor:
    """Dice + BCE on the mask logits (paper Eq. 13), plus BCE on the presence logit.

    Arguments:
      out (SRMOutput): logits (B, 1, h, w), presence_logit (B,).
      gt (Tensor): (B, 1, h, w) ground truth in {0, 1}, downsampled to the embedding grid.
      present (Tensor | None): (B,) whether the target is in the image; default: any foreground in ``gt``.

    Returns:
      (Tensor): scalar loss.
    """
    gt = gt.to(out.logits.dtype)
    if present is None:
        present = gt.flatten(1).amax(1)
    mask = dice_loss(torch.sigmoid(out.logits), gt) + bce_loss(out.logits, gt)
    return mask + bce_loss(out.presence_logit, present)


def update_subsets(
    batch: int, updates: int, images: int | None, generator: torch.Generator | None = None
) -> list[Tensor]:
    """Which rows of a rollout batch each of the M SRM updates after an action trains on.

    The paper steps one environment (one image) at a time and updates the SRM M times on that image's state after
    each action. The trainer steps B images at once; updating M times on all B states would cost B times the
    paper's SRM work per action, more than the SAM decoder calls themselves for the ``small`` preset. Instead
    update j trains on its own ``images`` rows of a fresh random permutation, disjoint while ``M x images <= B``
    (5 updates of 8 rows of a 40-image batch see every row once), wrapping around the permutation otherwise.
    Every image's state still reaches the SRM about ``E x T x M x images / B`` times over a run.

    Arguments:
      batch (int): B, rows in the rollout batch. updates (int): M. images (int | None): rows per update; None or
        >= batch: every update trains on all rows.
      generator (torch.Generator | None): CPU generator for the permutation (reproducible).

    Returns:
      (list[Tensor]): M long tensors of row indices (CPU), each of length ``min(images, batch)``.
    """
    if images is None or images >= batch:
        every = torch.arange(batch)
        return [every] * updates
    order = torch.randperm(batch, generator=generator)
    need = updates * images
    if need > batch:
        order = order.repeat(-(-need // batch))
    return [order[j * images : (j + 1) * images] for j in range(updates)]


def srm_update(
    srm: SRM,
    optimizer: torch.optim.Optimizer,
    embedding: Tensor,
    prev_prob: Tensor,
    clip_map: Tensor | None,
    gt: Tensor,
    cfg: SRMConfig,
    present: Tensor | None = None,
    semantic: Tensor | None = None,
    subsets: list[Tensor] | None = None,
) -> float:
    """The M = ``cfg.updates_per_step`` SRM updates after one action. The states are pooled once.

    Arguments:
      srm (SRM): trained in place. optimizer: over its parameters (Adam, ``cfg.lr``).
      embedding (Tensor): (B, C, h, w). prev_prob (Tensor): (B, 1, h, w). clip_map (Tensor | None): (B, 1, h, w).
      gt (Tensor): (B, 1, h, w) in {0, 1}. present (Tensor | None): (B,).
      semantic (Tensor | None): (B, r+1, h', w') cached :meth:`SRM.pool_semantic` output; saves pooling.
      subsets (list[Tensor] | None): M row-index tensors, the rows update j trains on (see :func:`update_subsets`);
        None: every update trains on all B rows.

    Returns:
      (float): mean loss over the M updates.
    """
    m = cfg.updates_per_step
    if subsets is not None:
        if len(subsets) != m:
            raise ValueError(f"got {len(subsets)} row subsets for M={m} SRM updates")
        # Form states only for the rows some update trains on; the subsets then index those.
        used, positions = torch.cat(subsets).to(embedding.device).unique(return_inverse=True)
        subsets = list(positions.split([len(rows) for rows in subsets]))
        embedding, prev_prob, gt = embedding[used], prev_prob[used], gt[used]
        clip_map = clip_map[used] if clip_map is not None else None
        present = present[used] if present is not None else None
        semantic = semantic[used] if semantic is not None else None
    out_size = tuple(embedding.shape[-2:])
    with torch.no_grad():
        spatial = srm.pool_spatial(embedding, prev_prob)
        if srm.branch == "explicit" and semantic is None:
            if clip_map is None:
                raise ValueError("the explicit SRM branch needs the CLIP-Surgery map (clip_map)")
            semantic = srm.pool_semantic(embedding, clip_map)
    srm.train()
    total = 0.0
    for j in range(m):
        if subsets is None:
            rows_spatial, rows_semantic, rows_gt, rows_present = spatial, semantic, gt, present
        else:
            rows = subsets[j]
            rows_spatial, rows_gt = spatial[rows], gt[rows]
            rows_semantic = semantic[rows] if semantic is not None else None
            rows_present = present[rows] if present is not None else None
        loss = srm_loss(srm.forward_pooled(rows_spatial, rows_semantic, out_size), rows_gt, rows_present)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
    return total / m
