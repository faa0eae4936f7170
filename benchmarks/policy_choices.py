"""Measures the choices the paper leaves open, to justify the defaults:

- repeated actions: mask already-chosen patches out of the policy (`mask_repeats`) and/or show the
  agent the map of its past actions (`use_history`);
- feeding SAM's previous low-res logits back as `mask_input` (`use_mask_input`);
- the cost side of the networks: the fixed state projection (`agent_state_channels`, `srm.state_channels`:
  r of SAM's 256 channels, None = all, see alignsam.projection) and the agent's width (`agent_hidden`, 16 by default).

Each variant is trained on the same synthetic train split with the same seed and evaluated on the
same held-out images: mIoU, FR, and the share of distinct patches among the T chosen ones.

    python -m benchmarks.policy_choices [--family saliency] [--episodes 30]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np

from alignsam.bundle import Bundle
from alignsam.data import Sample
from alignsam.evaluate import evaluate
from alignsam.loading import load_sam, resolve_device
from alignsam.policy import TrainConfig
from alignsam.ppo import PPOConfig
from alignsam.predict import AlignSAM
from alignsam.synthetic import make_split
from alignsam.train import Timings, train
from benchmarks.common import RESULTS, write_results

VARIANTS: dict[str, dict] = {
    "mask repeats + history (default)": {"mask_repeats": True, "use_history": True},
    "all 256 channels (no projection)": {"state_channels": None},
    "projection r=16": {"state_channels": 16},
    "agent width 32": {"agent_hidden": 32},
    "mask repeats only": {"mask_repeats": True, "use_history": False},
    "history only": {"mask_repeats": False, "use_history": True},
    "neither": {"mask_repeats": False, "use_history": False},
    "default + mask_input feedback": {"mask_repeats": True, "use_history": True, "use_mask_input": True},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="saliency")
    ap.add_argument("--train", type=int, default=50)
    ap.add_argument("--test", type=int, default=60)
    ap.add_argument("--episodes", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--only", nargs="*", default=None, help="run only these variants (names as listed)")
    ap.add_argument("--device", default=resolve_device("auto"))
    args = ap.parse_args()
    sam = load_sam("small", None, args.device)
    train_s = [Sample(s.image, s.mask, s.text, f"t{i}") for i, s in enumerate(make_split(args.family, "train", args.train))]
    test_s = [Sample(s.image, s.mask, s.text, f"e{i}") for i, s in enumerate(make_split(args.family, "test", args.test))]
    results: dict[str, object] = {"family": args.family, "episodes": args.episodes, "epochs": args.epochs}
    rows = []
    base = TrainConfig()
    for name, v in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        rank = v.get("state_channels", base.agent_state_channels)
        cfg = TrainConfig(
            ppo=PPOConfig(episodes=args.episodes, epochs=args.epochs, mask_repeats=v.get("mask_repeats", True)),
            srm=replace(base.srm, state_channels=rank), agent_state_channels=rank,
            agent_hidden=v.get("agent_hidden", base.agent_hidden),
            use_history=v.get("use_history", True), use_mask_input=v.get("use_mask_input", False),
            branch="implicit", seed=0,
        )
        t0 = time.perf_counter()
        res = train(sam, train_s, cfg, timings=Timings())
        p = res.policy
        model = AlignSAM(sam, Bundle(p.agent, p.srm, p.config, {"text": "x", "version": "v", "branch": p.branch}))
        preds = model.predict([s.image for s in test_s])
        distinct = float(np.mean([len({(x, y) for x, y, _ in q.points[2:]}) / len(q.points[2:]) for q in preds]))
        row = evaluate(model, test_s)["AlignSAM"]
        r = {"miou": row["miou"], "fr": row["fr"], "distinct_actions": distinct,
             "train_fr_last5": float(np.mean([h["foreground_rate"] for h in p.history[-5:]])),
             "seconds": time.perf_counter() - t0, "ppo_s": res.timings.ppo_updates, "srm_s": res.timings.srm_updates}
        results[name] = r
        print(name, {k: round(val, 4) for k, val in r.items()}, flush=True)
        rows.append((name, f"{r['miou']:.4f}", f"{r['fr']:.4f}", f"{r['distinct_actions']:.3f}",
                     f"{r['train_fr_last5']:.3f}", f"{r['seconds']:.0f}", f"{r['ppo_s']:.0f}", f"{r['srm_s']:.0f}"))
    path = write_results("policy_choices", results, rows,
                         ("variant", "test mIoU", "test FR", "distinct actions", "train FR (last 5 ep.)", "s",
                          "PPO s", "SRM s"), RESULTS)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
