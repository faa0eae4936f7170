"""Who should label the agent's points? AlignSAM's SRM against all-positive and ground-truth labels, same agent.

The quality table's "w/o SRM" row labels every agent point positive. Where it beats AlignSAM, this says whether a
better labeller could close the gap: it trains AlignSAM once per task and action grid (the quality benchmark's
settings: E=50, K=20, T=15, 50 train scenes, implicit SRM, seed 0), then runs the same trained agent on the test
split with four label sources for its points:

* ``srm``: the SRM's labels (AlignSAM);
* ``positive``: every point positive (w/o SRM);
* ``gt``: the ground truth at the point (a perfect labeller);
* ``gt-positive``: the ground truth's positives only: a point off the target is not prompted at all.

and reports mIoU, MAE, F-measure, BER, the share of the agent's points on the target, and how often the SRM labels
an on-target point positive and an off-target point negative (the first two points, the SRM's initial pair, are
left out, as FR leaves them out; ``gt-positive`` lists only the points it prompts). If ``gt`` does not beat
``positive`` either, no labeller can: the gap is in how SAM answers the agent's points, not in the SRM; and
``gt-positive`` against ``gt`` says what the correct negative points do to SAM's masks.

    python -m benchmarks.label_sources --tasks shadow --grids 10 16 --threads 1
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch

from alignsam import metrics
from alignsam.bundle import Bundle
from alignsam.evaluate import on_target
from alignsam.loading import load_sam
from alignsam.policy import TrainConfig
from alignsam.ppo import PPOConfig
from alignsam.predict import AlignSAM, Prediction
from alignsam.synthetic.quality import task_samples
from alignsam.train import train
from benchmarks.common import RESULTS, write_results

LABEL_SOURCES = ("srm", "positive", "gt", "gt-positive")


def label_confusion(preds: list[Prediction], gts: list[np.ndarray], initial: int = 2) -> dict[str, float]:
    """Share of the agent's points on the target, and the share of on- / off-target points labelled 1 / 0."""
    on_pos = on_neg = off_pos = off_neg = 0
    for pred, gt in zip(preds, gts, strict=True):
        for x, y, label in pred.points[initial:]:
            if on_target(gt, x, y):
                on_pos += label == 1
                on_neg += label == 0
            else:
                off_pos += label == 1
                off_neg += label == 0
    on, off = on_pos + on_neg, off_pos + off_neg
    return {
        "points_on_target": on / max(on + off, 1),
        "on_target_labelled_positive": on_pos / max(on, 1),
        "off_target_labelled_negative": off_neg / max(off, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["shadow"])
    ap.add_argument("--grids", nargs="+", type=int, default=[10], help="action grid sides (the paper: 10)")
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--name", default="label_sources")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sam = load_sam("small", None, "cpu")
    results: dict[str, Any] = {"sam": sam.model_id, "episodes": args.episodes, "n_test": args.test, "runs": []}
    rows = []
    for task in args.tasks:
        train_samples, test_samples = task_samples(task, "train", 50), task_samples(task, "test", args.test)
        images, gts = [s.image for s in test_samples], [s.mask for s in test_samples]
        for grid in args.grids:
            cfg = TrainConfig(ppo=PPOConfig(episodes=args.episodes, epochs=20), branch="implicit", seed=args.seed,
                              grid=(grid, grid))
            t0 = time.perf_counter()
            policy = train(sam, train_samples, cfg).policy
            train_s = time.perf_counter() - t0
            meta = {"text": train_samples[0].text, "version": "label-sources", "branch": policy.branch}
            model = AlignSAM(sam, Bundle(policy.agent, policy.srm, policy.config, meta))
            for source in LABEL_SOURCES:
                preds = model.predict(images, labels=source, masks=gts if source.startswith("gt") else None,
                                      generator=torch.Generator().manual_seed(args.seed))
                row = {**metrics.summarize([p.probs for p in preds], gts), **label_confusion(preds, gts)}
                results["runs"].append({"task": task, "grid": grid, "labels": source, "train_s": train_s, **row})
                rows.append((task, f"{grid} x {grid}", source, f"{row['miou']:.3f}", f"{row['mae']:.3f}",
                             f"{row['f_measure']:.3f}", f"{row['ber']:.3f}", f"{row['points_on_target']:.3f}",
                             f"{row['on_target_labelled_positive']:.3f}", f"{row['off_target_labelled_negative']:.3f}"))
                print(" | ".join(rows[-1]), flush=True)
    path = write_results(args.name, results, rows, (
        "task", "action grid", "labels", "mIoU", "MAE", "F-measure", "BER", "points on target",
        "on-target labelled 1", "off-target labelled 0"), RESULTS)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
