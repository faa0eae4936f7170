"""Why SRM corrective clicks (alignsam.refine), and how many: where the gap to the oracle clicker comes from, and the
mIoU after each click.

    python -m benchmarks.refine --threads 1                          # mirror, blur, shadow; 100 test scenes
    python -m benchmarks.refine --tasks mirror --test 48 --name refine_quick

For each task, the policy of ``benchmarks/instances.py`` (taken from ``--bundle-dir``, else trained with the paper's
E=50 / K=20 / T=15 on the 50-scene train split) on the grid validation picks (``PICKED_GRID``), one mask, on the
first ``--test`` scenes of the test split:

- AlignSAM as the paper runs it (the SRM labels the agent's points), and the same points labelled by the ground
  truth: what the labels cost, against the oracle clicker (same T), what the placement costs;
- the SRM's own map after the episode (thresholded at 0): a second opinion SAM's mask can be corrected towards;
- AlignSAM followed by 1..``--clicks`` SRM corrective clicks, on the error frame ``FRAME_SCALE`` x the embedding
  grid, and for 3 and 6 clicks on the other scales too.

The count a label uses is chosen by validation among ``REFINE_CANDIDATES`` (``benchmarks/instances.py --refine``,
``choices.md``); this benchmark only explains the choice.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from alignsam import metrics, refine
from alignsam.env import PromptEnv
from alignsam.loading import load_sam
from alignsam.policy import TrainConfig
from alignsam.ppo import PPOConfig
from alignsam.predict import AlignSAM
from alignsam.rollout import SrmInputs, encode, rollout
from alignsam.synthetic.baselines import oracle_predict
from alignsam.synthetic.quality import task_samples
from benchmarks.common import RESULTS, write_results
from benchmarks.instances import policy_for, task_arguments

PICKED_GRID = {"mirror": (10, 10), "blur": (10, 10), "shadow": (16, 16), "saliency": (16, 16),
               "semantic:circle": (10, 10), "instances": (10, 10)}


def srm_maps_after_episode(model: AlignSAM, images: list[np.ndarray]) -> list[np.ndarray]:
    """The SRM's map (logits > 0, at each image's size) given SAM's mask after the agent's episode."""
    sam, cfg, out = model.sam, model.bundle.config, []
    for start in range(0, len(images), 16):
        enc = encode(sam, images[start:start + 16])
        srm_in = SrmInputs(sam, enc)
        env = PromptEnv(sam, enc.embeddings, enc.sizes, None, cfg.env_config())
        idx = torch.arange(len(enc), device=sam.device)
        with torch.no_grad():
            rollout(sam, env, srm_in, model.agent, model.srm, idx, cfg.ppo.steps, mask_repeats=cfg.ppo.mask_repeats)
            logits = srm_in.forward(model.srm, idx, env.prev_mask).logits
            assert env.low_res is not None
            up = F.interpolate(logits.float(), size=env.low_res.shape[-2:], mode="bilinear", align_corners=False)
            out += [p.float().cpu().numpy() > 0.5 for p in sam.postprocess(up, enc.sizes, None)]
    return out


def run_task(sam: Any, task: str, args: argparse.Namespace) -> dict[str, Any]:
    cfg = TrainConfig(ppo=PPOConfig(episodes=args.episodes, epochs=args.epochs), branch="implicit", seed=args.seed,
                      grid=PICKED_GRID.get(task, (10, 10)))
    bundle, info = policy_for(sam, task, cfg, args.train, Path(args.bundle_dir))
    model = AlignSAM(sam, bundle)
    test = task_samples(task, "test", args.test)
    images, gts = [s.image for s in test], [s.mask for s in test]

    def miou(**kwargs: Any) -> float:
        preds = model.predict(images, instances=False, **kwargs)
        return metrics.miou([p.probs for p in preds], gts)

    out: dict[str, Any] = {"task": task, "grid": list(cfg.grid), "n": len(test), **info}
    out["srm_labels"] = miou(refine=0)
    out["gt_labels"] = miou(labels="gt", masks=gts)
    out["srm_map"] = metrics.miou([m.astype(np.float32) for m in srm_maps_after_episode(model, images)], gts)
    probs, _ = oracle_predict(sam, encode(sam, images, masks=gts), cfg.ppo.steps)
    out["oracle"] = metrics.miou([p.cpu().numpy() for p in probs], gts)
    out["clicks"] = {str(c): miou(refine=c) for c in range(1, args.clicks + 1)}
    default = refine.FRAME_SCALE
    out["scales"] = {}
    try:
        for scale in (1, 2, 4):
            refine.FRAME_SCALE = scale
            out["scales"][str(scale)] = {str(c): (out["clicks"][str(c)] if scale == default else miou(refine=c))
                                         for c in (3, 6) if c <= args.clicks}
    finally:
        refine.FRAME_SCALE = default
    print(f"[{task}] {out}", flush=True)
    return out


def main() -> None:
    ap = task_arguments(__doc__, ["mirror", "blur", "shadow"])
    ap.add_argument("--clicks", type=int, default=6)
    ap.add_argument("--name", default="refine")
    ap.set_defaults(test=100)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    Path(args.bundle_dir).mkdir(parents=True, exist_ok=True)
    sam = load_sam("small", None, args.device)
    sam.cache_size = max(sam.cache_size, args.test + 16)
    results: dict[str, Any] = {"sam": sam.model_id, "torch_threads": torch.get_num_threads(),
                               "frame_scale": refine.FRAME_SCALE, "tasks": {}}
    rows = []
    for task in args.tasks:
        r = results["tasks"][task] = run_task(sam, task, args)
        curve = " / ".join(f"{r['clicks'][str(c)]:.3f}" for c in range(1, args.clicks + 1))
        scales = "; ".join(f"x{s}: " + " / ".join(f"{v:.3f}" for v in d.values()) for s, d in r["scales"].items())
        rows.append((task, "x".join(map(str, r["grid"])), str(r["n"]), f"{r['srm_labels']:.3f}",
                     f"{r['gt_labels']:.3f}", f"{r['oracle']:.3f}", f"{r['srm_map']:.3f}", curve, scales))
    path = write_results(args.name, results, rows, (
        "task", "grid", "scenes", "AlignSAM (SRM labels)", "same points, ground-truth labels", "oracle clicker",
        "SRM map after the episode", "+1..6 SRM clicks", "3 / 6 clicks per error-frame scale"), RESULTS)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
