"""Measures how many images each SRM update should train on (``SRMConfig.update_images_*``).

The paper updates the SRM M times after every action (M = 1 implicit, 5 explicit) on the image it is prompting.
The trainer prompts a batch of B images at once, so each update can train on all B states (B times the paper's
SRM work per action) or on a few of them (:func:`alignsam.srm.update_subsets`). This trains AlignSAM with each
setting on the CI quality test's settings (E=25, K=20, T=15, 50 train / 40 test scenes, small SAM) and reports
AlignSAM's mIoU and FR, the SRM-labelled random-click ablation (w/o RL) and the SRM update time.

    python -m benchmarks.srm_update_images --branch implicit --images 8 all --seeds 0 1 2
    python -m benchmarks.srm_update_images --branch explicit --images 2 all --seeds 0 --name srm_update_images_explicit

``--hidden`` and ``--fuse-kernel`` set the SRM's width and the explicit branch's fusion kernel for every run (to
measure a cheaper SRM on the same settings).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from alignsam.loading import load_clip, load_sam, resolve_device
from alignsam.policy import TrainConfig
from alignsam.ppo import PPOConfig
from alignsam.srm import SRMConfig
from alignsam.synthetic.quality import run_task
from benchmarks.common import RESULTS, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--branch", choices=["implicit", "explicit"], default="implicit")
    ap.add_argument("--images", nargs="+", default=["8", "all"], help="images per SRM update; 'all': the whole batch")
    ap.add_argument("--tasks", nargs="+", default=["saliency", "semantic:circle"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--episodes", type=int, default=25)
    ap.add_argument("--test", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--name", default="srm_update_images")
    ap.add_argument("--device", default=resolve_device("auto"))
    ap.add_argument("--hidden", type=int, default=SRMConfig.hidden, help="SRM width")
    ap.add_argument("--fuse-kernel", type=int, default=SRMConfig.fuse_kernel, help="explicit SRM fusion kernel")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sam = load_sam("small", None, args.device)
    clip = load_clip("tiny", None, args.device) if args.branch == "explicit" else None  # random weights offline
    results: dict[str, object] = {"branch": args.branch, "episodes": args.episodes, "n_test": args.test,
                                  "hidden": args.hidden, "fuse_kernel": args.fuse_kernel, "runs": []}
    by_setting: dict[tuple[str, str], list[dict]] = {}
    for images in args.images:
        n = None if images == "all" else int(images)
        srm = SRMConfig(update_images_implicit=n, update_images_explicit=n, hidden=args.hidden,
                        fuse_kernel=args.fuse_kernel)
        for task in args.tasks:
            for seed in args.seeds:
                cfg = TrainConfig(ppo=PPOConfig(episodes=args.episodes), branch=args.branch, seed=seed, srm=srm)
                t0 = time.perf_counter()
                r = run_task(sam, task, cfg, n_train=50, n_test=args.test, baselines=False, clip=clip, seed=seed)
                t = r["table"]
                run = {
                    "images": images, "task": task, "seed": seed,
                    "miou": t["AlignSAM"]["miou"], "fr": t["AlignSAM"]["fr"], "wo_rl_miou": t["w/o RL"]["miou"],
                    "wo_srm_miou": t["w/o SRM"]["miou"], "srm_s": r["train_timings"]["srm_updates"],
                    "seconds": time.perf_counter() - t0,
                }
                results["runs"].append(run)  # type: ignore[union-attr]
                by_setting.setdefault((images, task), []).append(run)
                print(run, flush=True)
    rows = []
    for (images, task), runs in by_setting.items():
        rows.append((
            images, task, " ".join(str(r["seed"]) for r in runs),
            f"{np.mean([r['miou'] for r in runs]):.3f}", " / ".join(f"{r['miou']:.3f}" for r in runs),
            f"{np.mean([r['fr'] for r in runs]):.3f}", f"{np.mean([r['wo_rl_miou'] for r in runs]):.3f}",
            f"{np.mean([r['srm_s'] for r in runs]):.1f}",
        ))
    path = write_results(args.name, results, rows, (
        "images per update", "task", "seeds", "AlignSAM mIoU (mean)", "per seed", "FR (mean)", "w/o RL mIoU (mean)",
        "SRM update s (mean)",
    ), RESULTS)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
