"""Mask feedback chosen at validation (issue 17): each family's policy with and without SAM's previous low-res logits
fed back as ``mask_input`` at inference, and the choice :func:`alignsam.train._mask_feedback` makes from it.

    python -m benchmarks.mask_feedback --threads 1                   # six tasks at their picked grid, 200 test scenes
    python -m benchmarks.mask_feedback --tasks shadow --test 40 --name mask_feedback_quick

For each task: the policy trained without mask feedback (the paper) on the 50-scene train split with the paper's
E=50 / K=20 / T=15 on the grid the validation picked in ``choices.md`` (taken from ``--bundle-dir`` when a bundle of
exactly that training is there, as ``benchmarks/instances.py`` caches them), its instance mode chosen as training
chooses it (per instance when that validates ``INSTANCE_MARGIN`` higher), then validated (30 held-out scenes,
train-split seeds 50-79) and tested with mask feedback off and on. Validation keeps "on" only when it scores
``INSTANCE_MARGIN`` higher, as the backend's training does.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from alignsam import metrics
from alignsam.bundle import Bundle
from alignsam.loading import load_sam
from alignsam.policy import TrainConfig
from alignsam.ppo import PPOConfig
from alignsam.predict import AlignSAM
from alignsam.synthetic.quality import task_samples
from alignsam.train import INSTANCE_MARGIN
from benchmarks.common import RESULTS, write_results
from benchmarks.instances import policy_for, task_arguments

# The grid validation picked per task in choices.md (the bundles benchmarks/instances.py trained and cached).
PICKED_GRID = {"semantic:circle": (16, 16), "shadow": (16, 16), "saliency": (10, 10), "blur": (10, 10),
               "mirror": (10, 10), "instances": (10, 10)}


def _miou(model: AlignSAM, samples: list[Any], instances: bool) -> float:
    preds = model.predict([s.image for s in samples], instances=instances, boxes=False)
    return metrics.miou([p.probs for p in preds], [s.mask for s in samples])


def run_task(sam: Any, task: str, args: argparse.Namespace) -> dict[str, Any]:
    cfg = TrainConfig(ppo=PPOConfig(episodes=args.episodes, epochs=args.epochs), branch="implicit", seed=args.seed,
                      grid=PICKED_GRID.get(task, (10, 10)))
    bundle, info = policy_for(sam, task, cfg, args.train, Path(args.bundle_dir))
    print(f"[{task}] policy {'from ' + info['bundle'] if info['cached'] else 'trained'}", flush=True)
    val = task_samples(task, "train", args.train + args.val)[args.train:]
    test = task_samples(task, "test", args.test)
    t0 = time.perf_counter()
    plain = AlignSAM(sam, bundle)
    fed = AlignSAM(sam, Bundle(bundle.agent, bundle.srm, dataclasses.replace(bundle.config, use_mask_input=True),
                               bundle.meta))
    split = _miou(plain, val, True) >= _miou(plain, val, False) + INSTANCE_MARGIN
    val_off, val_on = _miou(plain, val, split), _miou(fed, val, split)
    test_off, test_on = _miou(plain, test, split), _miou(fed, test, split)
    kept = "on" if val_on >= val_off + INSTANCE_MARGIN else "off"
    out = {"task": task, "grid": list(cfg.grid), "instances": split, "val": {"off": val_off, "on": val_on},
           "test": {"off": test_off, "on": test_on}, "kept": kept, "eval_s": time.perf_counter() - t0, **info}
    print(f"[{task}] {'per instance' if split else 'one mask'}: val off {val_off:.3f} / on {val_on:.3f} -> {kept}; "
          f"test off {test_off:.3f} / on {test_on:.3f}", flush=True)
    return out


def main() -> None:
    ap = task_arguments(__doc__, list(PICKED_GRID))
    ap.add_argument("--name", default="mask_feedback")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    Path(args.bundle_dir).mkdir(parents=True, exist_ok=True)
    sam = load_sam("small", None, args.device)
    results: dict[str, Any] = {"sam": sam.model_id, "torch_threads": torch.get_num_threads(), "margin": INSTANCE_MARGIN,
                               "tasks": {}}
    rows = []
    for task in args.tasks:
        r = run_task(sam, task, args)
        results["tasks"][task] = r
        rows.append((task, "x".join(map(str, r["grid"])), "per instance" if r["instances"] else "one mask",
                     f"{r['val']['off']:.3f}", f"{r['val']['on']:.3f}", f"{r['test']['off']:.3f}",
                     f"{r['test']['on']:.3f}", f"{r['test']['on'] - r['test']['off']:+.3f}", r["kept"]))
    path = write_results(args.name, results, rows, ("task", "grid", "mode", "val off", "val on", "test off", "test on",
                                                    "test on - off", "validation keeps"), RESULTS)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
