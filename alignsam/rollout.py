"""Running a policy through the prompting environment: the loop shared by inference, validation,
evaluation and the ablations.

Given encoded images (SAM embeddings, CLIP-Surgery maps), the SRM proposes the initial positive
(argmax) and negative (argmin) points and says whether the target is present; then for T steps
the agent picks a patch (argmax at inference), the SRM labels its centre, and SAM decodes the
grown prompt set. Ablations swap one part: random actions (w/o RL), every point positive
(w/o SRM), T=1 (w/o multi-step).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from alignsam import refine as corrective
from alignsam.agent import PromptAgent
from alignsam.clip_surgery import ClipSurgery
from alignsam.env import PromptEnv
from alignsam.sam import FrozenSam, Size
from alignsam.srm import SRM, SRMOutput

ActionSource = Literal["agent", "random"]
LabelSource = Literal["srm", "positive", "gt", "gt-positive"]
"""Who labels the chosen points: the SRM (AlignSAM), every point positive (w/o SRM), the ground truth, or the ground
truth's positives only (a point off the target is not prompted at all: label -1, SAM's padding)."""


@dataclass
class Encoded:
    """Everything computed once per image: SAM embedding and (optionally) CLIP-Surgery map.

    Attributes:
      embeddings: ``[N, C, h, w]`` SAM embeddings.
      sizes: ``(H, W)`` of each image.
      clip_maps: ``[N, 1, h, w]`` CLIP-Surgery maps in SAM's embedding frame, or None.
      masks: ground truths (HxW bool) when known.
    """

    embeddings: torch.Tensor
    sizes: list[Size]
    clip_maps: torch.Tensor | None = None
    masks: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.sizes)


def encode(
    sam: FrozenSam,
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray] | None = None,
    batch_size: int = 8,
) -> Encoded:
    """Encodes each image with SAM (once: the embedding cache answers repeats)."""
    embs = sam.embed_many(images, batch_size=batch_size)
    feats = torch.stack([e.features for e in embs])
    return Encoded(feats, [e.original_size for e in embs], None, list(masks) if masks is not None else None)


def add_clip_maps(enc: Encoded, sam: FrozenSam, clip: ClipSurgery, images: Sequence[np.ndarray], texts: Sequence[str]) -> None:
    """Computes each image's CLIP-Surgery map for its text once, in SAM's embedding frame."""
    if len(texts) != len(images):
        raise ValueError("CLIP maps need one text per image")
    g = sam.embedding_size
    maps = torch.zeros(len(images), 1, g, g, device=sam.device)
    for text in sorted(set(texts)):
        idx = [i for i, t in enumerate(texts) if t == text]
        found = clip.similarity_maps([images[i] for i in idx], text, grid=(g, g), layout="sam")
        maps[idx, 0] = found.to(sam.device).clone()  # clone: out of inference mode
    enc.clip_maps = maps


class SrmInputs:
    """What the SRM reads for encoded images: embeddings, CLIP maps, ground truth on the embedding grid,
    and which grid cells lie inside each image (not SAM's bottom/right padding)."""

    def __init__(self, sam: FrozenSam, enc: Encoded) -> None:
        self.grid = sam.embedding_size
        self.sizes = enc.sizes
        self.embeddings = enc.embeddings
        self.clip = enc.clip_maps
        ones = [sam.to_embedding_frame(torch.ones(s, device=sam.device), s) > 0.5 for s in enc.sizes]
        self.valid = torch.stack(ones)[:, None]  # [N, 1, h, w] bool
        self.gt = None
        if enc.masks is not None:
            self.gt = torch.stack([
                sam.to_embedding_frame(torch.as_tensor(np.asarray(m), device=sam.device).float(), s)
                for m, s in zip(enc.masks, enc.sizes, strict=True)
            ])[:, None]  # [N, 1, h, w] in [0, 1]

    def projected(self, srm: SRM) -> SrmInputs:
        """A shallow copy whose embeddings are on ``srm``'s channel projection (:meth:`SRM.project`), as training
        builds the SRM's states: the same states (the projection commutes with the product and the pooling) for
        r instead of C channels pooled at every SRM call (``self`` when they already are, or without a
        projection)."""
        projection = srm.projection
        if projection is None or self.embeddings.shape[1] == projection.rank:
            return self
        out = copy.copy(self)
        with torch.no_grad():
            out.embeddings = srm.project(self.embeddings)
        return out

    def forward(self, srm: SRM, idx: torch.Tensor, prev_mask: torch.Tensor | None) -> SRMOutput:
        """SRM output for images ``idx`` given SAM's previous probabilities on the embedding grid
        (``None``: before any prompt, an all-ones map, so the spatial state is ``F_I`` itself)."""
        emb = self.embeddings[idx]
        prev = torch.ones_like(emb[:, :1]) if prev_mask is None else prev_mask
        clip = self.clip[idx] if self.clip is not None and srm.branch == "explicit" else None
        return srm(emb, prev, clip)


@dataclass
class RolloutResult:
    probs: list[torch.Tensor]  # per image [H, W] probabilities (zeros when the target is absent)
    points: torch.Tensor  # [B, K+T, 2] (x, y) prompt points in image pixels
    labels: torch.Tensor  # [B, K+T] 1 / 0 / -1 (no point)
    present: torch.Tensor  # [B] SRM's probability that the target is in the image (1 without SRM init)
    score: torch.Tensor  # [B] SAM's predicted IoU of the final mask times ``present``
    foreground_rate: torch.Tensor | None  # [B] FR when the ground truth is known
    low_res: torch.Tensor | None = None  # [B, 1, 4h, 4w] SAM's final mask logits (its padded input frame)


def srm_initial_points(
    sam: FrozenSam, srm_in: SrmInputs, srm: SRM, idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SRM's highest (positive) and lowest (negative) cell inside each image, as pixel points.

    Returns ``points [B, 2, 2]``, ``labels [B, 2]`` and the presence probability ``[B]``.
    """
    with torch.no_grad():
        out = srm_in.forward(srm, idx, None)
    logits = out.logits[:, 0].float()
    valid = srm_in.valid[idx, 0]
    g = logits.shape[-1]
    flat_pos = logits.masked_fill(~valid, float("-inf")).flatten(1).argmax(1)
    flat_neg = logits.masked_fill(~valid, float("inf")).flatten(1).argmin(1)
    cells = torch.stack([torch.stack([flat_pos // g, flat_pos % g], -1), torch.stack([flat_neg // g, flat_neg % g], -1)], 1)
    points = sam.grid_to_points(cells, [srm_in.sizes[i] for i in idx.tolist()], g)
    labels = torch.tensor([[1, 0]], device=points.device).expand(len(idx), 2)
    return points, labels, torch.sigmoid(out.presence_logit.float())


def srm_point_labels(
    sam: FrozenSam, srm_in: SrmInputs, srm: SRM, idx: torch.Tensor, prev_mask: torch.Tensor, points: torch.Tensor, sizes: list[Size]
) -> torch.Tensor:
    """SRM labels (1 foreground / 0 background) of ``points [B, 2]`` given the previous mask."""
    with torch.no_grad():
        out = srm_in.forward(srm, idx, prev_mask)
    rc = sam.points_to_grid(points[:, None], sizes, srm_in.grid)[:, 0]
    rows = torch.arange(len(idx), device=rc.device)
    return (out.logits[rows, 0, rc[:, 0], rc[:, 1]] > 0).long()


def label_actions(
    labels: LabelSource, sam: FrozenSam, env: PromptEnv, srm_in: SrmInputs, srm: SRM, action: torch.Tensor,
    sizes: list[Size],
) -> torch.Tensor:
    """Labels of the patches ``action [B]`` just chosen on ``env``'s current images (of sizes ``sizes``), before
    :meth:`PromptEnv.step`: ``[B]`` long, 1 foreground / 0 background / -1 not prompted (``gt-positive`` off the
    target). The one labelling step of training rollouts and of inference."""
    if labels == "srm":
        xy = env.action_xy[env.image_index, action]
        return srm_point_labels(sam, srm_in, srm, env.image_index, env.prev_mask, xy, sizes)
    if labels == "positive":
        return torch.ones(len(action), dtype=torch.long, device=action.device)
    lab = env.gt_at(action).long()
    if labels == "gt-positive":
        lab = torch.where(lab == 1, lab, torch.full_like(lab, -1))
    return lab


def random_actions(history: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A uniformly random not-yet-chosen action per row of ``history [B, A]`` (the w/o-RL ablation)."""
    weights = (history < 0.5).float().cpu()
    return torch.multinomial(weights, 1, generator=generator)[:, 0].to(history.device)


@torch.no_grad()
def srm_corrective_clicks(sam: FrozenSam, env: PromptEnv, srm_in: SrmInputs, srm: SRM, clicks: int) -> None:
    """Adds ``clicks`` SRM corrective clicks (:mod:`alignsam.refine`) to every episode of ``env`` after its T steps,
    one batched decode each; an image whose mask already agrees with the map gets a no-op point (label -1)."""
    if clicks <= 0:
        return
    idx = env.image_index
    sizes = [env.sizes[i] for i in idx.tolist()]
    frame = sam.embedding_size * corrective.FRAME_SCALE
    inside = corrective.inside_frame(sam, sizes, frame, env.device)
    for _ in range(clicks):
        assert env.low_res is not None
        srm_map = corrective.srm_map_on(srm_in.forward(srm, idx, env.prev_mask).logits, (frame, frame))
        mask = F.adaptive_avg_pool2d(torch.sigmoid(env.low_res.float()), frame)[:, 0] - 0.5  # > 0: foreground
        cells, labels = corrective.corrective_cells(mask, srm_map, inside)
        points = sam.grid_to_points(cells[:, None], sizes, frame)[:, 0]
        env.add_points(points, labels)


@torch.no_grad()
def rollout(
    sam: FrozenSam,
    env: PromptEnv,
    srm_in: SrmInputs,
    agent: PromptAgent | None,
    srm: SRM,
    idx: torch.Tensor,
    steps: int,
    actions: ActionSource = "agent",
    labels: LabelSource = "srm",
    mask_repeats: bool = True,
    generator: torch.Generator | None = None,
    refine: int = 0,
) -> RolloutResult:
    """Runs one deterministic (argmax) episode of ``steps`` actions on images ``idx`` of ``env``, then ``refine``
    SRM corrective clicks (:mod:`alignsam.refine`; ``labels`` must be "srm" for any).

    Raises:
      ValueError: ``refine`` > 0 with points not labelled by the SRM (the ablations without it have no map).
    """
    if refine > 0 and labels != "srm":
        raise ValueError(f"SRM corrective clicks need SRM labels, not {labels!r}")
    sizes = [env.sizes[i] for i in idx.tolist()]
    srm_in = srm_in.projected(srm)
    points, point_labels, present = srm_initial_points(sam, srm_in, srm, idx)
    env.reset(idx, points, point_labels, steps=steps)
    agent_emb = None
    if actions == "agent" and steps > 0:  # the agent's states from r channels, as in training (agent.project)
        assert agent is not None
        agent_emb = agent.project(env.embeddings[env.image_index])
    for _ in range(steps):
        if agent_emb is not None:
            assert agent is not None
            action, _, _ = agent.act(agent_emb, env.prev_mask, env.history,
                                     mask_repeats=mask_repeats, deterministic=True)
        else:
            action = random_actions(env.history, generator)
        env.step(action, label_actions(labels, sam, env, srm_in, srm, action, sizes))
    srm_corrective_clicks(sam, env, srm_in, srm, refine)
    fr = env.foreground_rate() if env.has_gt and steps > 0 else None
    probs = env.probs()
    probs_list = list(probs) if isinstance(probs, torch.Tensor) else probs
    absent = present < 0.5
    probs_list = [torch.zeros_like(p) if a else p for p, a in zip(probs_list, absent.tolist(), strict=True)]
    score = env.iou_predictions.clamp(0, 1) * present
    return RolloutResult(probs_list, env.points.clone(), env.labels.clone(), present, score, fr,
                         None if env.low_res is None else env.low_res.clone())
