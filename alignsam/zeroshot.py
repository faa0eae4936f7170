"""Zero-shot prediction, for a label that has no trained policy yet: the CLIP-Surgery similarity map of the label's
text; its most similar pixel is a positive point and its least similar one a negative point; SAM decodes the mask
from that pair. No agent, no SRM. Same ``predict(images, text)`` shape as :class:`~alignsam.predict.AlignSAM`, so a
caller treats a trained and an untrained label alike.

    model = ZeroShot(sam, clip)
    pred = model.predict([image], text="shadow")[0]   # pred.mask, pred.score, pred.points
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from alignsam.clip_surgery import ClipSurgery
from alignsam.errors import AlignSamError
from alignsam.predict import Prediction
from alignsam.sam import FrozenSam


class ZeroShot:
    """CLIP-Surgery points -> frozen SAM.

    Arguments:
      sam: the frozen SAM.
      clip: the CLIP-Surgery model whose map of the text chooses the two points.

    Raises:
      AlignSamError: ``clip`` is None (zero-shot has nothing else to go on).
    """

    def __init__(self, sam: FrozenSam, clip: ClipSurgery | None) -> None:
        if clip is None:
            raise AlignSamError("zero-shot prediction needs a CLIP-Surgery model: set a CLIP preset (vit_b16 or tiny)")
        self.sam = sam
        self.clip = clip

    @torch.no_grad()
    def predict(self, images: Sequence[np.ndarray], text: str) -> list[Prediction]:
        """Segments ``text`` in each HxWx3 image. CLIP, SAM's encoder (cached) and decoder run once over the batch.

        Returns one :class:`Prediction` per image: ``score`` is SAM's predicted IoU in [0, 1], ``present`` 1.0,
        ``points`` ``[(x, y, 1), (x, y, 0)]`` in image pixels (pixel centres).
        """
        if not images:
            return []
        images = list(images)
        self.clip.patch_maps(images, text)  # one CLIP batch; the per-image maps below hit its cache
        all_points: list[list[tuple[float, float, int]]] = []
        for image in images:
            sim = self.clip.similarity_map_full(image, text).float().cpu()
            w = sim.shape[1]
            pos = int(torch.argmax(sim))
            neg = int(torch.argmin(sim))
            all_points.append([(float(pos % w) + 0.5, float(pos // w) + 0.5, 1),
                               (float(neg % w) + 0.5, float(neg // w) + 0.5, 0)])
        embs = self.sam.embed_many(images)
        coords = torch.tensor([[p[:2] for p in points] for points in all_points], dtype=torch.float32)
        labels = torch.tensor([[p[2] for p in points] for points in all_points], dtype=torch.int64)
        out = self.sam.decode(embs, coords, labels, [e.original_size for e in embs])
        assert out.probs is not None  # decode returns probabilities unless told not to
        preds = []
        for i, points in enumerate(all_points):
            probs = out.probs[i].float().cpu().numpy()
            score = float(out.iou_predictions[i, 0].clamp(0, 1))
            low = out.low_res_logits[i, 0].float().cpu().numpy()
            preds.append(Prediction(probs > 0.5, probs, score, 1.0, points, low))
        return preds
