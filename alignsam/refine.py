"""SRM corrective clicks: after the agent's episode, a few more points where SAM's mask and the SRM's map disagree.

Beyond the paper. Measured on the testbed (``benchmarks/results/refine.md``): with the agent's points relabelled by
the ground truth, mirror reaches only 0.728 mIoU against 0.874 for the oracle clicker, so most of the gap to the
oracle is *where* the points are, not their labels; and after the episode the SRM's own map (0.713) is better than
SAM's mask (0.689). The oracle clicks where the mask is most wrong; this module clicks where the mask is most
unlike the SRM's map, the SRM standing in for the annotator:

1. the SRM reads the current mask (its state ``F_I * M``, as when it labels the agent's points) and gives its map;
2. on a frame twice the embedding grid (``FRAME_SCALE``; the map upsampled, SAM's mask probabilities pooled down,
   so the cost does not grow with the image), the cells inside the image where the map says foreground and the mask
   does not, and the reverse, are the two error sets;
3. the click goes to the interior-most cell of the larger one's largest 8-connected component (as the NoC
   protocol's simulated annotator clicks, there 4-connected at full resolution), positive on missed foreground,
   negative on a false positive, and SAM decodes the grown prompt set. All of it is batched tensor work.

How many such clicks a label gets (0 = the paper) is chosen by validation at training
(``TrainConfig.refine`` / :func:`alignsam.train._refine_choice`); :func:`alignsam.rollout.srm_corrective_clicks`
adds them after the episode, each for one SRM forward and one batched decode. With per-instance prompts the same
count follows on the union of the instances (:func:`alignsam.instances.refine_instances`, each click given to the
instance it corrects), since the split keeps only some of the episode's clicks.
The w/o-SRM ablation has no SRM to ask, so it never gets them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignsam.sam import FrozenSam

FRAME_SCALE = 2
"""The frame the errors are found on: the embedding grid (where the SRM's map lives) times this; SAM's low-res
logits are 4x. On 48 mirror test scenes, 3 / 6 clicks: x1 0.706 / 0.724, x2 0.711 / 0.723, x4 0.712 / 0.719 mIoU
(0.671 without); x2 keeps error regions half a cell wide at a quarter of the x4 frame's work."""

REFINE_CANDIDATES: tuple[int, ...] = (0, 3, 6)
"""Click counts validation compares (the paper's 0 first). Chosen from the first measurement: the mIoU rose over
1-3 clicks on mirror, blur and saliency and kept rising to 6 on shadow (``benchmarks/results/refine.md``)."""


def _max3x3(x: torch.Tensor, outside: float = 0.0) -> torch.Tensor:
    """``[B, H, W]`` float -> the maximum over each cell's 3 x 3 neighbourhood, cells outside the frame read as
    ``outside``. Two separable passes of shifted maxima: the values of ``F.max_pool2d`` on the padded map at about a
    twentieth of its CPU time on one-channel 48 x 48 maps (1.7 ms against 0.08 ms for 32 of them)."""
    p = F.pad(x, (1, 1, 1, 1), value=outside)
    r = torch.maximum(torch.maximum(p[:, :, :-2], p[:, :, 1:-1]), p[:, :, 2:])
    return torch.maximum(torch.maximum(r[:, :-2], r[:, 1:-1]), r[:, 2:])


def _run_ids(fg: torch.Tensor) -> torch.Tensor:
    """``[B, H, W]`` bool -> ``[B * H * W]`` long: the same id (1, 2, ...) on every cell of one horizontal run of
    True cells, 0 elsewhere."""
    starts = fg & ~F.pad(fg, (1, 0))[:, :, :-1]
    return torch.where(fg.reshape(-1), torch.cumsum(starts.reshape(-1), 0), 0)


def largest_components(regions: torch.Tensor) -> torch.Tensor:
    """``[B, H, W]`` bool -> the largest 8-connected component of each (all False where a region is empty).

    Batched label propagation: each cell of a region starts with its own index and repeatedly takes the largest
    index it can reach in one pass, until nothing changes; every component then holds its largest index. A pass is
    a 3x3 max-pool over the region (8-connectivity), then the maximum over each horizontal and each vertical run of
    region cells (a label crosses a straight stretch in one pass), then each cell takes the label held by the cell
    its label names (pointer jumping: that cell is in the same component and its label is no smaller). Why not the
    max-pool alone: it moves a label one cell a pass; on the multi-instance scenes' 48 x 48 frames (per instance + 6
    clicks, 12 rounds) the search cost 12.8 ms per image that way and 2.7 ms this way, with the same fixed point."""
    b, h, w = regions.shape
    fg = regions.bool()
    if fg.numel() == 0:
        return fg
    rows, cols = _run_ids(fg), _run_ids(fg.transpose(1, 2).contiguous())
    n_rows, n_cols = int(rows.max()) + 1, int(cols.max()) + 1
    index = torch.arange(1, h * w + 1, device=fg.device, dtype=torch.float32).reshape(1, h, w).expand(b, h, w)
    labels = torch.where(fg, index, torch.zeros_like(index))
    zero = torch.zeros(b, 1, device=fg.device)
    while True:
        grown = torch.where(fg, _max3x3(labels), 0.0).reshape(-1)  # labels >= 0: zero padding is harmless
        grown = torch.zeros(n_rows, device=fg.device).scatter_reduce_(0, rows, grown, "amax").index_select(0, rows)
        grown = grown.reshape(b, h, w).transpose(1, 2).reshape(-1)
        grown = torch.zeros(n_cols, device=fg.device).scatter_reduce_(0, cols, grown, "amax").index_select(0, cols)
        grown = grown.reshape(b, w, h).transpose(1, 2).reshape(b, -1)
        # label k names cell k - 1; background (label 0) reads the prepended 0
        grown = torch.cat([zero, grown], 1).gather(1, grown.long()).reshape(b, h, w)
        if torch.equal(grown, labels):
            break
        labels = grown
    flat = labels.reshape(b, -1).long()
    counts = torch.zeros(b, h * w + 1, device=fg.device, dtype=torch.long).scatter_add_(1, flat, torch.ones_like(flat))
    counts[:, 0] = 0
    best = counts.argmax(1)
    return fg & (labels == best[:, None, None].float()) & (best[:, None, None] > 0)


def interior_cells(regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cell of each ``[B, H, W]`` region farthest from its boundary (chessboard distance; outside the frame is
    background), the one nearest the centroid of the deepest cells on a tie, as the NoC protocol's
    :func:`alignsam.synthetic.masks.interior_point` picks it. Returns ``cells [B, 2]`` (row, col) and ``found [B]``
    (False for an empty region; its cell is then 0, 0)."""
    cur = regions.bool()
    deepest = cur.clone()
    while cur.any():
        deepest = torch.where(cur.flatten(1).any(1)[:, None, None], cur, deepest)
        cur = _max3x3((~cur).float(), outside=1.0) < 0.5  # erosion; outside the frame is background
    b, h, w = regions.shape
    ys = torch.arange(h, device=regions.device, dtype=torch.float32)[None, :, None].expand(b, h, w)
    xs = torch.arange(w, device=regions.device, dtype=torch.float32)[None, None, :].expand(b, h, w)
    n = deepest.flatten(1).sum(1).clamp(min=1)
    cy = (ys * deepest).flatten(1).sum(1) / n
    cx = (xs * deepest).flatten(1).sum(1) / n
    d2 = (ys - cy[:, None, None]) ** 2 + (xs - cx[:, None, None]) ** 2
    flat = torch.where(deepest, d2, torch.full_like(d2, float("inf"))).flatten(1).argmin(1)
    return torch.stack([flat // w, flat % w], 1), regions.flatten(1).any(1)


def corrective_cells(mask_logits: torch.Tensor, srm_logits: torch.Tensor,
                     valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The next corrective click of each image, on a common frame.

    Arguments:
      mask_logits: ``[B, H, W]`` SAM's current mask logits (> 0: foreground).
      srm_logits: ``[B, H, W]`` the SRM's map on the same frame (> 0: foreground).
      valid: ``[B, H, W]`` bool, the cells inside the image (not SAM's padding).
    Returns:
      ``cells [B, 2]`` (row, col) long and ``labels [B]`` long: 1 at the interior-most cell of the largest missed
      region, 0 at the one of the largest false positive region (the larger region wins, missed on a tie), -1
      (no click; the cell is then 0, 0) where mask and map agree everywhere inside the image.
    """
    mask, srm, inside = mask_logits > 0, srm_logits > 0, valid.bool()
    b = mask.shape[0]
    both = largest_components(torch.cat([srm & ~mask & inside, mask & ~srm & inside]))
    missed, extra = both[:b], both[b:]
    take_missed = missed.flatten(1).sum(1) >= extra.flatten(1).sum(1)
    region = torch.where(take_missed[:, None, None], missed, extra)
    cells, found = interior_cells(region)  # (0, 0) where nothing is found
    return cells, torch.where(found, take_missed.long(), torch.full_like(take_missed, -1, dtype=torch.long))


def srm_map_on(srm_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[B, 1, g, g]`` SRM logits on the embedding grid -> ``[B, H, W]`` on the frame ``size`` (bilinear: the map's
    zero level set between cell centres, not blocks)."""
    return F.interpolate(srm_logits.float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def inside_frame(sam: FrozenSam, sizes: list[tuple[int, int]], frame: int, device: torch.device) -> torch.Tensor:
    """``[B, frame, frame]`` bool: the cells of a ``frame`` x ``frame`` map over SAM's padded input frame whose
    centres lie inside each image (``sizes``: ``(H, W)`` each)."""
    s = sam.spec.image_size
    centres = (torch.arange(frame, device=device, dtype=torch.float32) + 0.5) * (s / frame)
    out = []
    for size in sizes:
        in_h, in_w = sam.input_size(size)
        out.append((centres[:, None] < in_h) & (centres[None, :] < in_w))
    return torch.stack(out)
