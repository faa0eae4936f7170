"""Training wall time, split into SAM encoding, CLIP, rollouts, PPO updates and SRM updates.

The floor is the SAM work the algorithm cannot avoid: each image encoded once, plus E x N x (T+1)
batched decoder calls (the initial pair and T actions per episode). Everything else (agent and SRM
forward/backward, PPO and SRM updates, bookkeeping, validation) is the overhead; the target is
overhead <= 50% of the floor. A run may use fewer samples and episodes than the paper's N=50, E=50:
every part scales linearly in N x E (encoding in N), so the script extrapolates, and says so.

    python -m benchmarks.bench_training --preset small --branch implicit
    python -m benchmarks.bench_training --preset vit_b --samples 8 --episodes 2
    python -m benchmarks.bench_training --branch explicit --srm-hidden 16 --srm-fuse-kernel 1   # a cheaper SRM
    python -m benchmarks.bench_training --grid 10x10 16x16 --instances off auto   # issue 17's per-label choices
    python -m benchmarks.bench_training --instances auto --mask-feedback auto --refine off auto   # as the backend

``--grid``: each grid is timed as its own run (``TrainConfig.grids`` trains every grid in turn, so a choice among
grids costs the sum of their rows). ``--instances auto``: the run also validates per-instance prompts;
``--mask-feedback auto`` and ``--refine auto`` validate the kept policy with the other mask-feedback setting and with
each count of SRM corrective clicks (all counted in validation, which is overhead). The backend trains with all
three on auto (``workers.jobs``).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import time
from dataclasses import replace

import torch

from alignsam.data import Sample
from alignsam.loading import resolve_device
from alignsam.policy import TrainConfig
from alignsam.ppo import PPOConfig
from alignsam.sam import FrozenSam
from alignsam.srm import SRMConfig
from alignsam.synthetic import make_split
from alignsam.train import Timings, train
from benchmarks.common import RESULTS, write_results

PAPER_N, PAPER_E = 50, 50


@functools.cache
def _sam(preset: str, device: str) -> FrozenSam:
    """One SAM per preset for all runs; each run still counts its own encoding (see ``run``)."""
    return FrozenSam.from_preset(preset, device=device)


def run(
    preset: str, branch: str, samples: int, episodes: int, device: str, clip_preset: str, srm: SRMConfig | None = None,
    grid: tuple[int, int] = (10, 10), instances: str = "off", mask_feedback: str = "off", refine: str = "off",
) -> dict[str, float]:
    sam = _sam(preset, device)
    sam._cache.clear()  # every run pays for its own encoding, as a fresh training job would
    clip = None
    if branch == "explicit":
        from alignsam.clip_surgery import ClipSurgery

        clip = ClipSurgery.from_preset(clip_preset, device=device, pretrained=None)
    scenes = make_split("saliency", "train", samples)
    data = [Sample(s.image, s.mask, s.text, f"s{i}") for i, s in enumerate(scenes)]
    cfg = TrainConfig(ppo=PPOConfig(episodes=episodes), branch=branch, srm=srm or SRMConfig(),  # paper's T=15, K=20
                      grid=grid, instances=instances, mask_feedback=mask_feedback,  # type: ignore[arg-type]
                      refine=refine)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    res = train(sam, data, cfg, clip=clip, timings=Timings())
    wall = time.perf_counter() - t0
    t = res.timings
    n_train = len(res.policy.train_names)
    scale_rollout = (PAPER_N * PAPER_E) / (n_train * episodes)
    ex = {
        "sam_encoding": t.sam_encoding * PAPER_N / samples,
        "clip": t.clip * PAPER_N / samples,
        "rollout_decode": t.rollout_decode * scale_rollout,
        "rollout_other": t.rollout_other * scale_rollout,
        "srm_updates": t.srm_updates * scale_rollout,
        "ppo_updates": t.ppo_updates * scale_rollout,
        "validation": t.validation * PAPER_N / samples,
    }
    floor = ex["sam_encoding"] + ex["rollout_decode"]
    overhead = ex["rollout_other"] + ex["srm_updates"] + ex["ppo_updates"] + ex["validation"]
    return {
        "measured_wall_s": wall,
        "measured_samples": samples,
        "measured_train_samples": n_train,
        "measured_episodes": episodes,
        **{f"measured_{k}_s": v for k, v in vars(t).items()},
        **{f"paper_{k}_s": v for k, v in ex.items()},
        "paper_floor_s": floor,
        "paper_overhead_s": overhead,
        "paper_total_s": floor + overhead + ex["clip"],
        "overhead_over_floor": overhead / floor,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", nargs="+", default=["small"])
    ap.add_argument("--branch", nargs="+", default=["implicit", "explicit"])
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--episodes", type=int, default=5)
    ap.add_argument("--device", default=resolve_device("auto"))
    ap.add_argument("--clip-preset", default="tiny", help="CLIP for the explicit branch (random weights)")
    ap.add_argument("--name", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--srm-hidden", type=int, nargs="+", default=[None], help="SRM widths (default: SRMConfig's)")
    ap.add_argument("--srm-fuse-kernel", type=int, nargs="+", default=[None],
                    help="explicit SRM fusion kernel sizes (default: SRMConfig's, 3)")
    ap.add_argument("--grid", nargs="+", default=["10x10"], metavar="RxC", help="action grids (paper: 10x10)")
    ap.add_argument("--instances", nargs="+", default=["off"], choices=["off", "auto"],
                    help="also validate per-instance prompts (auto), as the backend's training does")
    ap.add_argument("--mask-feedback", nargs="+", default=["off"], choices=["off", "auto"],
                    help="also validate the kept policy with the other mask-feedback setting (auto)")
    ap.add_argument("--refine", nargs="+", default=["off"], choices=["off", "auto"],
                    help="also validate the kept policy with each count of SRM corrective clicks (auto)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of every setting, in turn (the floor drifts)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants: list[tuple[str, SRMConfig]] = []
    for hidden in args.srm_hidden:
        for kernel in args.srm_fuse_kernel:
            srm, label = SRMConfig(), []
            if hidden is not None:
                srm, label = replace(srm, hidden=hidden), [*label, f"SRM {hidden} wide"]
            if kernel is not None:
                srm, label = replace(srm, fuse_kernel=kernel), [*label, f"{kernel}x{kernel} fusion"]
            variants.append((", ".join(label), srm))
    grids = [tuple(int(n) for n in g.lower().split("x")) for g in args.grid]
    results: dict[str, object] = {"device": args.device, "paper_N": PAPER_N, "paper_E": PAPER_E,
                                  "torch_threads": torch.get_num_threads(),
                                  "note": "measured on a reduced run, extrapolated linearly to N=50, E=50"}
    rows = []
    for rep in range(args.repeat):
        for preset in args.preset:
            for branch in args.branch:
                for (label, srm), grid, instances, feedback, refine in itertools.product(
                        variants, grids, args.instances, args.mask_feedback, args.refine):
                    r = run(preset, branch, args.samples, args.episodes, args.device, args.clip_preset, srm,
                            grid, instances, feedback, refine)  # type: ignore[arg-type]
                    extra = [f"{grid[0]}x{grid[1]} grid"] if grid != (10, 10) else []
                    extra += ["instances validated"] if instances != "off" else []
                    extra += ["mask feedback validated"] if feedback != "off" else []
                    extra += ["SRM clicks validated"] if refine != "off" else []
                    label = ", ".join([*([label] if label else []), *extra])
                    key = "/".join(k for k in (preset, branch, label) if k) + (f"#{rep + 1}" if args.repeat > 1 else "")
                    results[key] = {**r, "srm": vars(srm), "grid": list(grid), "instances": instances,
                                    "mask_feedback": feedback, "refine": refine}
                    print(f"[{key}] " + ", ".join(f"{k}={v:.4g}" for k, v in r.items()), flush=True)
                    rows.append((
                        preset, f"{branch} ({label})" if label else branch,
                        f"{r['measured_samples']}x{r['measured_episodes']}",
                        f"{r['paper_sam_encoding_s']:.0f}", f"{r['paper_clip_s']:.0f}",
                        f"{r['paper_rollout_decode_s']:.0f}", f"{r['paper_rollout_other_s']:.0f}",
                        f"{r['paper_ppo_updates_s']:.0f}", f"{r['paper_srm_updates_s']:.0f}",
                        f"{r['paper_validation_s']:.0f}", f"{r['paper_total_s']:.0f}",
                        f"{100 * r['overhead_over_floor']:.0f}%",
                    ))
    name = args.name or f"training_{args.device}"
    path = write_results(name, results, rows, (
        "preset", "SRM branch", "measured N x E", "SAM encoding s", "CLIP s", "rollout decode s", "rollout other s",
        "PPO updates s", "SRM updates s", "validation s", "total s (N=50,E=50)", "overhead / floor",
    ), RESULTS)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
