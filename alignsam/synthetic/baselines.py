"""Reference prompters for the quality benchmark: a PerSAM-style training-free baseline and an oracle.

- :func:`persam_predict` (after PerSAM, Zhang et al. 2023, reduced to its location prior): the mean
  SAM embedding of the target, taken from the training masks, is compared with every position of a
  test image's embedding; the most similar position is the positive point, the least similar the
  negative point, and SAM decodes that pair. No training, no clicks.
- :func:`oracle_predict`: the upper bound for T clicks. Each click goes to the interior of the largest
  error region of the current mask (positive on missed foreground, negative on false foreground),
  as in click-based interactive segmentation benchmarks (NoC protocol).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from alignsam.rollout import Encoded
from alignsam.sam import FrozenSam
from alignsam.synthetic import corrective_click


def target_prototype(sam: FrozenSam, enc: Encoded) -> torch.Tensor:
    """Mean embedding of the foreground over all training images, ``[C]`` (unit norm)."""
    assert enc.masks is not None
    total = torch.zeros(enc.embeddings.shape[1], device=enc.embeddings.device)
    weight = 0.0
    for emb, mask, size in zip(enc.embeddings, enc.masks, enc.sizes, strict=True):
        m = sam.to_embedding_frame(torch.as_tensor(mask, device=emb.device).float(), size)
        total += (emb * m).sum(dim=(1, 2))
        weight += float(m.sum())
    return F.normalize(total / max(weight, 1e-6), dim=0)


@torch.no_grad()
def persam_predict(sam: FrozenSam, prototype: torch.Tensor, enc: Encoded) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Probabilities per test image and the two prompt points ``[B, 2, 2]`` (x, y)."""
    feats = F.normalize(enc.embeddings, dim=1)
    sim = torch.einsum("bchw,c->bhw", feats, prototype)
    g = sim.shape[-1]
    valid = torch.stack([sam.to_embedding_frame(torch.ones(s, device=sim.device), s) > 0.5 for s in enc.sizes])
    pos = sim.masked_fill(~valid, float("-inf")).flatten(1).argmax(1)
    neg = sim.masked_fill(~valid, float("inf")).flatten(1).argmin(1)
    cells = torch.stack([torch.stack([pos // g, pos % g], -1), torch.stack([neg // g, neg % g], -1)], 1)
    points = sam.grid_to_points(cells, enc.sizes, g)
    labels = torch.tensor([[1, 0]], device=points.device).expand(len(enc), 2)
    out = sam.decode(enc.embeddings, points, labels, enc.sizes)
    probs = out.probs if isinstance(out.probs, list) else list(out.probs)
    return probs, points


@torch.no_grad()
def oracle_predict(
    sam: FrozenSam, enc: Encoded, steps: int
) -> tuple[list[torch.Tensor], list[list[tuple[float, float, int]]]]:
    """``steps`` corrective clicks per image from the ground truth; batched over images."""
    assert enc.masks is not None
    b = len(enc)
    gts = [np.asarray(m, bool) for m in enc.masks]
    current = [np.zeros_like(g) for g in gts]
    clicks: list[list[tuple[float, float, int]]] = [[] for _ in range(b)]
    probs: Sequence[torch.Tensor] = []
    for _ in range(steps):
        for i in range(b):
            click = corrective_click(current[i], gts[i])
            if click is None:  # exact already (or empty target, empty mask): repeat a no-op click
                clicks[i].append(clicks[i][-1] if clicks[i] else (0.0, 0.0, -1))
                continue
            (x, y), label = click
            clicks[i].append((float(x), float(y), label))
        pts = torch.tensor([[c[:2] for c in cl] for cl in clicks], dtype=torch.float32, device=sam.device)
        labels = torch.tensor([[c[2] for c in cl] for cl in clicks], device=sam.device)
        out = sam.decode(enc.embeddings, pts, labels, enc.sizes)
        probs = out.probs if isinstance(out.probs, list) else list(out.probs)
        current = [p.cpu().numpy() > 0.5 for p in probs]
    return list(probs), clicks
