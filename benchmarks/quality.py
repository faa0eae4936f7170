"""AlignSAM's paper table in miniature, offline: synthetic task families, the bundled small SAM.

For each task family: train AlignSAM on the 50-sample train split, then report on the test split
mIoU, MAE, BER, F-measure, E-measure and FR for AlignSAM and its ablations (w/o RL: random
actions; w/o SRM: every point positive; w/o multi-step: T=1), a PerSAM-style training-free
baseline, and an oracle clicker (same T) as the upper bound.

    python -m benchmarks.quality                      # every family, 50 train / 200 test, E=50
    python -m benchmarks.quality --families saliency --test 40 --episodes 15 --name quality_quick

CLIP is the tiny random preset (no real weights offline), so the explicit SRM branch gets no
text meaning here; `--branch auto` keeps whichever branch validates better.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch

from alignsam import metrics
from alignsam.baselines import oracle_predict, persam_predict, target_prototype
from alignsam.bundle import Bundle
from alignsam.cli import load_clip, load_sam
from alignsam.data import Sample
from alignsam.evaluate import evaluate, format_table
from alignsam.ppo import PPOConfig
from alignsam.predict import AlignSAM
from alignsam.rollout import encode
from alignsam.synthetic import FAMILIES, make_split
from alignsam.train import TrainConfig, train
from benchmarks.common import RESULTS, write_results


def _fr(points: list[tuple[float, float, int]], gt: np.ndarray) -> float:
    h, w = gt.shape
    hits = [bool(gt[min(int(y), h - 1), min(int(x), w - 1)]) for x, y, lab in points if lab >= 0]
    return float(np.mean(hits)) if hits else float("nan")


def run_family(family: str, n_train: int, n_test: int, cfg: TrainConfig, device: str, seed: int) -> dict[str, Any]:
    sam = load_sam("small", None, device)
    clip = load_clip("tiny", None, device)
    train_scenes = make_split(family, "train", n_train)
    test_scenes = make_split(family, "test", n_test)
    train_samples = [Sample(s.image, s.mask, s.text, f"{family}-train{i:03d}") for i, s in enumerate(train_scenes)]
    test_samples = [Sample(s.image, s.mask, s.text, f"{family}-test{i:03d}") for i, s in enumerate(test_scenes)]
    t0 = time.perf_counter()
    result = train(sam, train_samples, cfg, clip=clip)
    train_s = time.perf_counter() - t0
    p = result.policy
    bundle = Bundle(p.agent, p.srm, p.config, {"text": train_scenes[0].text, "version": "bench", "branch": p.branch})
    model = AlignSAM(sam, bundle, clip)
    t1 = time.perf_counter()
    table = evaluate(model, test_samples, ablations=True, seed=seed)
    gts = [s.mask for s in test_samples]

    train_enc = encode(sam, [s.image for s in train_samples], masks=[s.mask for s in train_samples])
    test_enc = encode(sam, [s.image for s in test_samples], masks=gts)
    probs, points = persam_predict(sam, target_prototype(sam, train_enc), test_enc)
    table["PerSAM-style"] = metrics.summarize([q.cpu().numpy() for q in probs], gts)
    table["PerSAM-style"]["fr"] = float(np.nanmean([_fr([(*xy, 1)], g) for xy, g in zip(points[:, 0].tolist(), gts, strict=True)]))

    probs, clicks = oracle_predict(sam, test_enc, cfg.ppo.steps)
    table["oracle clicker"] = metrics.summarize([q.cpu().numpy() for q in probs], gts)
    table["oracle clicker"]["fr"] = float(np.nanmean([_fr(c, g) for c, g in zip(clicks, gts, strict=True)]))
    eval_s = time.perf_counter() - t1
    return {
        "family": family, "text": train_scenes[0].text, "n_train": n_train, "n_test": n_test,
        "branch": p.branch, "candidates": result.candidates, "train_s": train_s, "eval_s": eval_s,
        "table": table,
        "alignsam_over_oracle_miou": table["AlignSAM"]["miou"] / max(table["oracle clicker"]["miou"], 1e-9),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=[f for f in FAMILIES if f != "semantic"] + ["semantic"])
    ap.add_argument("--train", type=int, default=50)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--branch", default="auto", choices=["auto", "implicit", "explicit"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--name", default="quality")
    args = ap.parse_args()
    cfg = TrainConfig(ppo=PPOConfig(episodes=args.episodes, epochs=args.epochs), branch=args.branch, seed=args.seed)
    results: dict[str, Any] = {"config": cfg.to_dict(), "families": {}}
    rows = []
    t0 = time.perf_counter()
    for family in args.families:
        r = run_family(family, args.train, args.test, cfg, args.device, args.seed)
        results["families"][family] = r
        print(f"\n## {family} ({r['text']!r}; branch {r['branch']}; train {r['train_s']:.0f} s, eval {r['eval_s']:.0f} s)")
        print(format_table(r["table"]), flush=True)
        print(f"AlignSAM / oracle mIoU: {r['alignsam_over_oracle_miou']:.3f}", flush=True)
        for method, m in r["table"].items():
            rows.append((family, method, f"{m['miou']:.3f}", f"{m['mae']:.3f}", f"{m['ber']:.3f}",
                         f"{m['f_measure']:.3f}", f"{m['e_measure']:.3f}", f"{m['fr']:.3f}"))
    results["wall_s"] = time.perf_counter() - t0
    path = write_results(args.name, results, rows,
                         ("family", "method", "mIoU", "MAE", "BER", "F-measure", "E-measure", "FR"), RESULTS)
    print(f"\nwrote {path} ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
