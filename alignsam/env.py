"""The prompting environment of AlignSAM (paper section 3.2), batched over many images in torch.

An episode on one image: SAM is prompted with an initial point pair; then for T steps the agent
picks a patch of a ``grid`` laid over the image (the paper: 10x10 patches of 80x80 px on an
800x800 view), the patch centre becomes a new point whose label someone else decides (the SRM,
or "all positive" in an ablation), SAM decodes the grown prompt set, and the agent sees the new
state. Everything is held as tensors for B images at once; nothing leaves the device per step.

- action ``a`` -> patch ``(row, col) = divmod(a, grid_w)`` -> point at the patch centre, mapped
  from the view to original-image pixels (the view is the whole image resized, so the mapping is
  a per-axis scale and the paper's 800 px view needs no constant);
- state ``s_t = F_I * M_{t-1}``: the SAM embedding times the previous mask probability on the
  embedding grid (64x64 for ViT presets). The env keeps ``image_index`` and ``prev_mask``, never
  the product, so buffers stay small; :meth:`PromptEnv.state` forms it on demand;
- reward ``+1`` if the chosen patch centre is foreground in the ground truth, else ``-1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from alignsam.sam import FrozenSam, Size


@dataclass
class EnvConfig:
    """Environment constants, defaults from the paper."""

    grid: tuple[int, int] = (10, 10)  # patches per (row, col): the action space
    steps: int = 15  # T, actions per episode
    use_mask_input: bool = False  # feed the previous low-res logits back to SAM as mask_input
    init_sample_res: int = 128  # ground truth is sampled on this many pixel centres per side

    @property
    def num_actions(self) -> int:
        return self.grid[0] * self.grid[1]


def action_points(original_size: Size, grid: tuple[int, int]) -> torch.Tensor:
    """``[A, 2]`` (x, y) image-pixel centres of the grid's patches, row-major."""
    h, w = original_size
    gh, gw = grid
    rows = (torch.arange(gh, dtype=torch.float32) + 0.5) * (h / gh)
    cols = (torch.arange(gw, dtype=torch.float32) + 0.5) * (w / gw)
    yy, xx = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)


def _pixel(coord: torch.Tensor, limit: int) -> torch.Tensor:
    return coord.long().clamp_(0, limit - 1)


@dataclass
class StepResult:
    reward: torch.Tensor  # [B] float, +1 / -1 (zeros when no ground truth is known)
    hit: torch.Tensor  # [B] bool, the chosen point is foreground in the ground truth


class PromptEnv:
    """B parallel episodes over a fixed set of N encoded images.

    Arguments:
      sam: the frozen SAM that decodes prompt sets.
      embeddings: ``[N, C, h, w]`` SAM embeddings of the N images (encoded once, by the caller).
      original_sizes: ``(H, W)`` of each image.
      gt_masks: N boolean ``[H, W]`` ground truths, or None at inference (no rewards then).
      cfg: :class:`EnvConfig`.
    """

    def __init__(
        self,
        sam: FrozenSam,
        embeddings: torch.Tensor,
        original_sizes: Sequence[Size],
        gt_masks: Sequence[np.ndarray | torch.Tensor] | None = None,
        cfg: EnvConfig | None = None,
    ) -> None:
        self.sam = sam
        self.cfg = cfg or EnvConfig()
        self.device = sam.device
        self.embeddings = embeddings.to(self.device)
        self.sizes = [tuple(int(v) for v in s) for s in original_sizes]
        n = len(self.sizes)
        self.action_xy = torch.stack([action_points(s, self.cfg.grid) for s in self.sizes]).to(self.device)
        self.has_gt = gt_masks is not None
        if gt_masks is not None:
            if len(gt_masks) != n:
                raise ValueError(f"{n} images but {len(gt_masks)} ground-truth masks")
            self._prepare_gt(gt_masks)
        self.image_index = torch.zeros(0, dtype=torch.long, device=self.device)
        self.t = 0

    # ------------------------------------------------------------------ ground truth
    def _prepare_gt(self, gt_masks: Sequence[np.ndarray | torch.Tensor]) -> None:
        """Precomputes everything episodes need from the masks, once.

        ``gt_at_action [N, A]``: the reward table. ``gt_sample [N, R, R]`` and ``sample_xy``:
        ground truth read at R x R pixel centres, to draw initial points from exactly labelled
        pixels.
        """
        r = self.cfg.init_sample_res
        at_action, samples, sample_xy = [], [], []
        for mask, size, pts in zip(gt_masks, self.sizes, self.action_xy.cpu(), strict=True):
            m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).bool()
            if tuple(m.shape) != size:
                raise ValueError(f"ground truth of shape {tuple(m.shape)} for an image of size {size}")
            h, w = size
            at_action.append(m[_pixel(pts[:, 1], h), _pixel(pts[:, 0], w)])
            ys = (torch.arange(r, dtype=torch.float32) + 0.5) * (h / r)
            xs = (torch.arange(r, dtype=torch.float32) + 0.5) * (w / r)
            samples.append(m[_pixel(ys, h)][:, _pixel(xs, w)])
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            sample_xy.append(torch.stack([xx, yy], dim=-1).reshape(-1, 2))
        self.gt_at_action = torch.stack(at_action).to(self.device)  # [N, A] bool
        self.gt_sample = torch.stack(samples).reshape(len(samples), -1).to(self.device)  # [N, R*R] bool
        self.sample_xy = torch.stack(sample_xy).to(self.device)  # [N, R*R, 2]

    def sample_initial_points(
        self, image_index: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One random positive and one random negative ground-truth point per image.

        Returns ``points [B, 2, 2]`` (x, y) and ``labels [B, 2]`` = (1, 0); a side the mask lacks
        (empty or full mask) gets label -1, i.e. no point.
        """
        if not self.has_gt:
            raise RuntimeError("initial points from the ground truth need gt_masks")
        fg = self.gt_sample[image_index].float()  # [B, R*R]
        pts, labels = [], []
        for weights, label in ((fg, 1), (1.0 - fg, 0)):
            present = weights.sum(dim=1) > 0
            idx = torch.multinomial(weights + (~present)[:, None].float(), 1, generator=generator)[:, 0]
            pts.append(self.sample_xy[image_index, idx])
            labels.append(torch.where(present, label, -1))
        return torch.stack(pts, dim=1), torch.stack(labels, dim=1)

    # ------------------------------------------------------------------ episode
    def reset(
        self,
        image_index: torch.Tensor,
        init_points: torch.Tensor | None = None,
        init_labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        steps: int | None = None,
    ) -> None:
        """Starts B episodes on ``image_index [B]`` from an initial prompt set.

        Without ``init_points`` (training) the pair is drawn from the ground truth. At inference
        the caller passes the SRM's argmax / argmin points, ``[B, K, 2]`` with ``[B, K]`` labels.
        ``steps`` overrides the episode length T (the w/o multi-step ablation uses 1).
        """
        self.image_index = image_index.to(self.device)
        b = self.image_index.shape[0]
        if init_points is None:
            init_points, init_labels = self.sample_initial_points(self.image_index, generator)
        assert init_labels is not None
        k = init_points.shape[1]
        self.steps = steps = self.cfg.steps if steps is None else steps
        self.points = torch.zeros(b, k + steps, 2, device=self.device)
        self.labels = torch.full((b, k + steps), -1, dtype=torch.long, device=self.device)
        self.points[:, :k] = init_points.to(self.device)
        self.labels[:, :k] = init_labels.to(self.device)
        self.n_points = k
        self.history = torch.zeros(b, self.cfg.num_actions, device=self.device)
        self.hits = torch.zeros(b, steps, dtype=torch.bool, device=self.device)
        self.t = 0
        self.low_res: torch.Tensor | None = None
        self._decode()

    def _decode(self) -> None:
        n = self.n_points
        out = self.sam.decode(
            self.embeddings[self.image_index],
            self.points[:, :n],
            self.labels[:, :n],
            [self.sizes[i] for i in self.image_index.tolist()],
            mask_input=self.low_res if self.cfg.use_mask_input else None,
            return_probs=False,
        )
        self.low_res = out.low_res_logits  # [B, 1, 4h, 4w]
        self.iou_predictions = out.iou_predictions[:, 0]
        self.prev_mask = self.sam.low_res_to_grid(self.low_res)  # [B, 1, h, w] = M_{t-1}

    def step(self, actions: torch.Tensor, labels: torch.Tensor) -> StepResult:
        """Adds the patch centre of ``actions [B]`` with ``labels [B]`` (1/0; -1: not prompted) and re-decodes."""
        if self.t >= self.steps:
            raise RuntimeError(f"episode already has its {self.steps} steps; call reset()")
        actions = actions.to(self.device)
        rows = torch.arange(actions.shape[0], device=self.device)
        self.points[:, self.n_points] = self.action_xy[self.image_index, actions]
        self.labels[:, self.n_points] = labels.to(self.device).long()
        self.n_points += 1
        self.history[rows, actions] = 1.0
        if self.has_gt:
            hit = self.gt_at_action[self.image_index, actions]
            reward = hit.float() * 2.0 - 1.0
        else:
            hit = torch.zeros_like(actions, dtype=torch.bool)
            reward = torch.zeros(actions.shape[0], device=self.device)
        self.hits[:, self.t] = hit
        self.t += 1
        self._decode()
        return StepResult(reward=reward, hit=hit)

    def add_points(self, points: torch.Tensor, labels: torch.Tensor) -> None:
        """Grows every prompt set by one point outside the action grid, ``points [B, 2]`` (x, y) image pixels with
        ``labels [B]`` (1 / 0; -1: no point), and re-decodes. No reward, no history: the episode's T steps are over
        (:mod:`alignsam.refine` adds its corrective clicks so)."""
        self.points = torch.cat([self.points, points.to(self.device).float()[:, None]], dim=1)
        self.labels = torch.cat([self.labels, labels.to(self.device).long()[:, None]], dim=1)
        self.n_points += 1
        self._decode()

    # ------------------------------------------------------------------ views of the state
    def state(self) -> torch.Tensor:
        """``s_t = F_I * M_{t-1}``: ``[B, C, h, w]``."""
        return self.embeddings[self.image_index] * self.prev_mask

    def gt_at(self, actions: torch.Tensor) -> torch.Tensor:
        """Ground truth at the patch centres of ``actions [B]`` (oracle labels), bool ``[B]``."""
        return self.gt_at_action[self.image_index, actions.to(self.device)]

    def foreground_rate(self) -> torch.Tensor:
        """FR of each episode so far: the share of chosen points on the ground truth, ``[B]``."""
        return self.hits[:, : max(self.t, 1)].float().mean(dim=1)

    def probs(self, out_size: Size | None = None) -> torch.Tensor | list[torch.Tensor]:
        """Current masks as full-resolution probabilities (see :meth:`FrozenSam.postprocess`)."""
        assert self.low_res is not None
        return self.sam.postprocess(self.low_res, [self.sizes[i] for i in self.image_index.tolist()], out_size)
