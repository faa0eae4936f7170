"""AlignSAM's paper table in miniature, offline: train on a synthetic task family, report on its test split.

A *task* is a family of :mod:`alignsam.synthetic` (``saliency``, ``blur``, ``shadow``, ``mirror``) or a semantic
category (``semantic:circle``: every red circle in the scene, like one Pascal VOC class; AlignSAM trains one
policy per label, so the semantic family is benchmarked one category at a time). For each task, AlignSAM is
trained on the 50-sample train split with the bundled small SAM, then evaluated on the test split: mIoU, MAE,
BER, F-measure, E-measure and FR for AlignSAM, its ablations (w/o RL: random actions; w/o SRM: every point
positive; w/o multi-step: T=1), a PerSAM-style training-free baseline and an oracle clicker (same T, the upper
bound).

Used by ``benchmarks/quality.py`` (the full table), ``alignsam eval --synthetic`` and the CI check in
``tests/test_quality.py``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from alignsam import metrics
from alignsam.bundle import Bundle
from alignsam.clip_surgery import ClipSurgery
from alignsam.data import Sample
from alignsam.evaluate import evaluate, points_foreground_rate
from alignsam.policy import TrainConfig
from alignsam.predict import AlignSAM
from alignsam.rollout import encode
from alignsam.sam import FrozenSam
from alignsam.synthetic import CATEGORIES, EXTRA_FAMILIES, FAMILIES, make_split
from alignsam.synthetic.baselines import oracle_predict, persam_predict, target_prototype
from alignsam.train import Timings, train

DEFAULT_TASKS: tuple[str, ...] = ("semantic:circle", "saliency", "blur", "shadow", "mirror")
"""The paper's five task types: one semantic category and the four region families."""


def parse_task(task: str) -> tuple[str, str | None]:
    """``"semantic:circle"`` -> ``("semantic", "circle")``; ``"blur"`` -> ``("blur", None)``."""
    family, _, category = task.partition(":")
    if family not in FAMILIES + EXTRA_FAMILIES:
        raise ValueError(f"unknown task family {family!r}; choose one of: {', '.join(FAMILIES + EXTRA_FAMILIES)}")
    if family == "semantic" and not category:
        raise ValueError(f"the semantic family needs a category, e.g. semantic:{next(iter(CATEGORIES))} "
                         f"(one of: {', '.join(CATEGORIES)})")
    return family, category or None


def task_samples(task: str, split: str, n: int) -> list[Sample]:
    """The ``split`` ("train" / "test") of ``task`` as samples, seeded (see :func:`alignsam.synthetic.split_seeds`)."""
    family, category = parse_task(task)
    scenes = make_split(family, split, n, category=category)
    return [Sample(s.image, s.mask, s.text, f"{task}-{split}{i:03d}") for i, s in enumerate(scenes)]


def _fr(points: list[tuple[float, float, int]], gt: np.ndarray) -> float:
    fr = points_foreground_rate(points, gt)
    return float("nan") if fr is None else fr


def run_task(
    sam: FrozenSam,
    task: str,
    cfg: TrainConfig,
    n_train: int = 50,
    n_test: int = 200,
    clip: ClipSurgery | None = None,
    baselines: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Train on ``task``'s train split, evaluate on its test split. Returns the table and timings.

    Arguments:
      sam: the frozen SAM (the bundled small one for the synthetic world).
      task: see :func:`parse_task`.
      cfg: the training configuration (E, K, T, branch, seed).
      clip: needed for the explicit SRM branch (``cfg.branch`` "explicit" or "auto"); offline it has random
        weights, so its maps carry no text meaning.
      baselines: also the PerSAM-style baseline and the oracle clicker.
      seed: for the w/o-RL ablation's random actions.

    With ``cfg.instances`` "auto" / "on" and per-instance prompts kept (``out["instances"]``), every row of the
    table uses them, with the boxes and the instance filter where training kept those; ``out["one_mask_miou"]`` is
    AlignSAM with the policy's own mask on the same test scenes.
    """
    train_samples = task_samples(task, "train", n_train)
    test_samples = task_samples(task, "test", n_test)
    t0 = time.perf_counter()
    result = train(sam, train_samples, cfg, clip=clip, timings=Timings())
    train_s = time.perf_counter() - t0
    p = result.policy
    text = train_samples[0].text
    model = AlignSAM(sam, Bundle.of(p, text, "quality"), clip)
    t1 = time.perf_counter()
    table = evaluate(model, test_samples, ablations=True, seed=seed)  # every row in the mode validation chose
    one_mask = table["AlignSAM"]["miou"]
    if p.instances:  # what the policy's own mask would have scored
        one_mask = metrics.miou([q.probs for q in model.predict([s.image for s in test_samples], instances=False)],
                                [s.mask for s in test_samples])
    if baselines:
        gts = [s.mask for s in test_samples]
        train_enc = encode(sam, [s.image for s in train_samples], masks=[s.mask for s in train_samples])
        test_enc = encode(sam, [s.image for s in test_samples], masks=gts)
        probs, points = persam_predict(sam, target_prototype(sam, train_enc), test_enc)
        table["PerSAM-style"] = metrics.summarize([q.cpu().numpy() for q in probs], gts)
        table["PerSAM-style"]["fr"] = float(np.nanmean(
            [_fr([(*xy, 1)], g) for xy, g in zip(points[:, 0].tolist(), gts, strict=True)]))
        probs, clicks = oracle_predict(sam, test_enc, cfg.ppo.steps)
        table["oracle clicker"] = metrics.summarize([q.cpu().numpy() for q in probs], gts)
        table["oracle clicker"]["fr"] = float(np.nanmean([_fr(c, g) for c, g in zip(clicks, gts, strict=True)]))
    out: dict[str, Any] = {
        "task": task, "text": text, "n_train": n_train, "n_test": n_test, "branch": p.branch,
        "candidates": result.candidates, "train_s": train_s, "eval_s": time.perf_counter() - t1,
        "train_timings": vars(result.timings), "table": table,
        "instances": p.instances, "instance_boxes": p.instance_boxes, "instance_filter": p.instance_filter is not None,
        "instance_metrics": result.instance_metrics, "one_mask_miou": one_mask,
    }
    if "oracle clicker" in table:
        out["alignsam_over_oracle_miou"] = table["AlignSAM"]["miou"] / max(table["oracle clicker"]["miou"], 1e-9)
    return out
