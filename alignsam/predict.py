"""The one object users touch: :class:`AlignSAM`, a trained policy driving a frozen SAM.

    sam = FrozenSam.from_preset("vit_b", checkpoint="sam_vit_b_01ec64.pth", device="cuda")
    model = AlignSAM.from_bundle("shadow.pt", sam, clip=ClipSurgery(device="cuda"))
    for p in model.predict([image]):
        p.mask, p.score, p.points

Deterministic: the agent takes its argmax action at every step. Batched over images.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from alignsam.bundle import Bundle, load_bundle
from alignsam.clip_surgery import ClipSurgery
from alignsam.env import PromptEnv
from alignsam.errors import BundleError
from alignsam.instances import (
    InstanceFilter,
    filter_instances,
    group_by_point_masks,
    refine_instances,
    split_instances,
    with_weak_components,
)
from alignsam.rollout import ActionSource, LabelSource, SrmInputs, add_clip_maps, encode, rollout
from alignsam.sam import FrozenSam


@dataclass
class Prediction:
    """AlignSAM's answer for one image.

    Attributes:
      mask: ``HxW`` bool, the target region (empty when the SRM finds no target).
      probs: ``HxW`` float32 probabilities.
      score: SAM's predicted IoU of the mask times the SRM's presence probability, in [0, 1].
      present: the SRM's probability that the target is in the image.
      points: the prompt points in order, ``(x, y, label)`` in image pixels, label 1 = positive.
      low_res: ``[4h, 4w]`` float32, SAM's logits of the mask in its padded input frame (what
        :mod:`alignsam.interactive` feeds back as ``mask_input``); None when the SRM found no target (or the
        target was split into instances: there is no single mask's logits then).
      instances: one ``HxW`` bool mask per instance (:mod:`alignsam.instances`); ``[mask]`` when not split.
      instance_points: each instance's prompt points when split (what a ``per-instance`` correction re-prompts
        with, :mod:`alignsam.interactive`); empty when not split.
      corrective: how many of the last ``points`` are SRM corrective clicks (:mod:`alignsam.refine`), not the
        agent's (the FR counts the agent's only).
    """

    mask: np.ndarray
    probs: np.ndarray
    score: float
    present: float
    points: list[tuple[float, float, int]] = field(default_factory=list)
    low_res: np.ndarray | None = None
    instances: list[np.ndarray] = field(default_factory=list)
    instance_points: list[list[tuple[float, float, int]]] = field(default_factory=list)
    corrective: int = 0


class AlignSAM:
    """A trained AlignSAM policy (agent + SRM) on a frozen SAM.

    Arguments:
      sam: the SAM the bundle was trained with.
      bundle: a loaded policy bundle.
      clip: CLIP-Surgery model, needed when the bundle's SRM is the explicit branch.
    """

    def __init__(self, sam: FrozenSam, bundle: Bundle, clip: ClipSurgery | None = None) -> None:
        if bundle.meta["branch"] == "explicit" and clip is None:
            raise BundleError("this policy uses the explicit SRM branch: pass a CLIP-Surgery model (clip=...)")
        self.sam = sam
        self.bundle = bundle
        self.clip = clip
        self.agent = bundle.agent.to(sam.device).eval()
        self.srm = bundle.srm.to(sam.device).eval()
        self.instance_filter: InstanceFilter | None = None
        """the label's instance filter (:func:`alignsam.instances.filter_instances`), when its training kept one"""
        if bundle.meta.get("instance_filter") is not None:
            try:
                self.instance_filter = InstanceFilter.from_dict(bundle.meta["instance_filter"])
            except ValueError as exc:
                raise BundleError(f"this policy's instance filter cannot be read: {exc}") from None

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, sam: FrozenSam, clip: ClipSurgery | None = None) -> AlignSAM:
        return cls(sam, load_bundle(path, sam, device=sam.device), clip)

    @property
    def text(self) -> str:
        return self.bundle.text

    @property
    def version(self) -> str:
        return self.bundle.version

    @torch.no_grad()
    def predict(
        self,
        images: Sequence[np.ndarray],
        text: str | None = None,
        batch_size: int = 16,
        actions: ActionSource = "agent",
        labels: LabelSource = "srm",
        steps: int | None = None,
        masks: Sequence[np.ndarray] | None = None,
        generator: torch.Generator | None = None,
        instances: bool | None = None,
        boxes: bool | None = None,
        grouping: Literal["srm", "points"] = "srm",
        instance_filter: bool | None = None,
        refine: int | None = None,
        instance_refine: int | None = None,
        weak: float | None = None,
    ) -> list[Prediction]:
        """Segments the bundle's target (or ``text``) in each image.

        ``actions`` / ``labels`` / ``steps`` select the paper's ablations (random actions, all
        points positive, T=1); ``masks`` (ground truth) is needed only for ``labels="gt"`` / ``"gt-positive"``.
        ``instances``: prompt SAM once per instance of the SRM's map (:mod:`alignsam.instances`); None: what the
        bundle's validation chose (``meta["instances"]``, off for bundles made before the choice existed).
        ``boxes``: with per-instance prompts, give SAM each instance's box too; None: the bundle's
        ``meta["instance_boxes"]``. ``grouping``: per-instance prompts from the SRM's map (the product) or, for the
        w/o-SRM ablation, from the positive points' own masks (:func:`alignsam.instances.group_by_point_masks`,
        no SRM involved; ``boxes`` does not apply). ``instance_filter``: with per-instance prompts, drop the instances
        the label's filter rejects (:func:`alignsam.instances.filter_instances`); None: when the bundle has one.
        ``refine``: SRM corrective clicks after the episode (:mod:`alignsam.refine`); None: the bundle's
        ``config.refine_clicks`` when the SRM labels the points (``labels="srm"``), else none (the ablations and
        ground-truth labellings have no SRM to ask). ``instance_refine``: with per-instance prompts, that many more
        on the union of each split image's instances, each given to the instance it corrects
        (:func:`alignsam.instances.refine_instances`); None: as many as ``refine`` (what training validated).
        ``weak``: split off the SRM map's weak components above this logit too
        (:func:`alignsam.instances.with_weak_components`); None: the filter's own ``weak`` where the filter applies
        (it was fit on them), else none.

        Raises:
          ValueError: ``instance_filter=True`` for a bundle without a filter.
          ValueError: ``refine`` or ``instance_refine`` > 0 with ``labels`` other than "srm".
        """
        if instance_filter and self.instance_filter is None:
            raise ValueError("this policy has no instance filter (its training did not keep one)")
        flt = self.instance_filter if instance_filter is not False else None
        weak = flt.weak if weak is None and flt is not None else weak
        split = bool(self.bundle.meta.get("instances", False)) if instances is None else instances
        boxed = bool(self.bundle.meta.get("instance_boxes", False)) if boxes is None else boxes
        text = text or self.text
        cfg = self.bundle.config
        steps = cfg.ppo.steps if steps is None else steps
        if refine is None:
            refine = cfg.refine_clicks if labels == "srm" else 0
        instance_refine = refine if instance_refine is None else instance_refine
        if instance_refine > 0 and labels != "srm":
            raise ValueError(f"SRM corrective clicks need SRM labels, not {labels!r}")
        out: list[Prediction] = []
        for start in range(0, len(images), batch_size):
            chunk = list(images[start : start + batch_size])
            gt = list(masks[start : start + batch_size]) if masks is not None else None
            enc = encode(self.sam, chunk, masks=gt)
            if self.srm.branch == "explicit":
                assert self.clip is not None
                add_clip_maps(enc, self.sam, self.clip, chunk, [text] * len(chunk))
            srm_in = SrmInputs(self.sam, enc).projected(self.srm)  # once per chunk, not at every SRM call
            env = PromptEnv(self.sam, enc.embeddings, enc.sizes, enc.masks, cfg.env_config())
            idx = torch.arange(len(chunk), device=self.sam.device)
            res = rollout(self.sam, env, srm_in, self.agent, self.srm, idx, steps, actions=actions,
                          labels=labels, mask_repeats=cfg.ppo.mask_repeats, generator=generator, refine=refine)
            all_probs = [p.float().cpu().numpy() for p in res.probs]
            all_points = [[
                (float(x), float(y), int(lab))
                for (x, y), lab in zip(res.points[i].tolist(), res.labels[i].tolist(), strict=True)
                if lab >= 0
            ] for i in range(len(chunk))]
            corrective = (res.labels[:, res.labels.shape[1] - refine:] >= 0).sum(1).tolist() if refine else \
                [0] * len(chunk)
            parts = None
            present = [float(v) >= 0.5 for v in res.present]
            if split and grouping == "points":
                parts = group_by_point_masks(self.sam, enc.embeddings, enc.sizes, all_points, all_probs, present)
            elif split:
                initial = srm_in.forward(self.srm, idx, None).logits[:, 0]
                if weak is not None:
                    initial = with_weak_components(initial, srm_in.valid[idx, 0], weak)
                parts = split_instances(self.sam, enc.embeddings, enc.sizes, initial, srm_in.valid[idx, 0],
                                        all_points, all_probs, present, boxes=boxed)
                parts = refine_instances(self.sam, enc.embeddings, enc.sizes, initial, srm_in.valid[idx, 0], parts,
                                         instance_refine)
            if parts is not None and flt is not None:
                parts = [filter_instances(part, image, flt) for part, image in zip(parts, chunk, strict=True)]
            for i in range(len(chunk)):
                probs, pts = all_probs[i], all_points[i]
                low = None
                if res.low_res is not None and float(res.present[i]) >= 0.5:
                    low = res.low_res[i, 0].float().cpu().numpy()
                shown, groups = [probs > 0.5], []
                if parts is not None and parts[i].split:
                    probs, shown, low, groups = parts[i].probs, parts[i].masks, None, parts[i].points
                out.append(Prediction(probs > 0.5, probs, float(res.score[i]), float(res.present[i]), pts, low,
                                      shown, [list(g) for g in groups], int(corrective[i])))
        return out
