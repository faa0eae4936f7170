"""Inference wall time against its floor: one SAM encode per image plus the decodes the prediction needs.

    python -m benchmarks.bench_inference --threads 1                                   # small preset, 32 images
    python -m benchmarks.bench_inference --preset vit_b --images 2 --repeat 1 --train-scenes 2 --threads 1  # random vit_b

For each preset and setting (the paper's one mask on the 10 x 10 grid; per-instance prompts; a 16 x 16 grid; 3 and 6
SRM corrective clicks after the episode, 6 the most training picks, alone and per instance, and per instance with a
filter over the SRM map's weak components too), a
policy is trained briefly (E=1; the weights do not change the work inference does) on other scenes, then
``AlignSAM.predict`` runs on ``--images`` fresh scenes of the multi-instance family (the embedding cache is emptied before every
repeat, so every repeat encodes). SAM's own work inside that call is timed where it happens: the image encoder
(``FrozenSam.embed_many``), the prompt encoder + mask decoder (``FrozenSam.decode``) and the upscaling of its
logits (``FrozenSam.postprocess``). The floor is their sum; everything else (agent, SRM, labels, instance split,
bookkeeping) is the overhead. Target (issue 17): wall time <= 1.15 x the floor.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from alignsam.bundle import Bundle
from alignsam.data import Sample
from alignsam.instances import WEAK_LOGIT, fit_filter_on
from alignsam.loading import load_sam, resolve_device
from alignsam.policy import TrainConfig
from alignsam.ppo import PPOConfig
from alignsam.predict import AlignSAM
from alignsam.sam import FrozenSam
from alignsam.synthetic import make_split
from alignsam.train import train
from benchmarks.common import RESULTS, sync, write_results

TARGET = 1.15
FAMILY = "instances"  # 3-6 target objects per scene: the per-instance split has real work to do
SETTINGS = {"one mask": ((10, 10), False, 0), "per instance": ((10, 10), True, 0), "16x16 grid": ((16, 16), False, 0),
            "3 SRM clicks": ((10, 10), False, 3), "6 SRM clicks": ((10, 10), False, 6),
            "per instance + 6 SRM clicks": ((10, 10), True, 6),
            "per instance + weak-component filter + 6 SRM clicks": ((10, 10), "weak filter", 6)}
"""setting -> (action grid, per-instance prompts (``"weak filter"``: with an instance filter fit on the training scenes'
instances split with the SRM map's weak components, as validation keeps it on semantic:circle), SRM corrective
clicks after the episode)."""
SAM_PARTS = ("embed_many", "decode", "postprocess")


class SamClock:
    """Times (and counts) SAM's own calls on one :class:`FrozenSam` instance; calls nested in another timed call
    (``decode`` calls ``postprocess``) count once, in the outer one."""

    def __init__(self, sam: FrozenSam) -> None:
        self.sam, self.seconds, self.calls, self.prompt_sets = sam, 0.0, dict.fromkeys(SAM_PARTS, 0), 0
        self._depth = 0
        for name in SAM_PARTS:
            setattr(sam, name, self._wrap(name, getattr(sam, name)))

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            if name == "decode":
                self.prompt_sets += int(args[1].shape[0]) if len(args) > 1 else int(kwargs["points"].shape[0])
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            sync(self.sam.device)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.sam.device)
                self.seconds += time.perf_counter() - t0
                self._depth -= 1
        return timed

    def reset(self) -> None:
        self.seconds, self.calls, self.prompt_sets = 0.0, dict.fromkeys(SAM_PARTS, 0), 0

    def remove(self) -> None:
        for name in SAM_PARTS:
            delattr(self.sam, name)


def policy(sam: FrozenSam, grid: tuple[int, int], n_train: int) -> Bundle:
    """A policy trained for one episode on ``n_train`` scenes disjoint from the timed ones (implicit SRM)."""
    scenes = make_split(FAMILY, "train", n_train)
    samples = [Sample(s.image, s.mask, s.text, f"t{i}") for i, s in enumerate(scenes)]
    cfg = TrainConfig(ppo=PPOConfig(episodes=1, epochs=1), branch="implicit", grid=grid)
    p = train(sam, samples, cfg).policy
    return Bundle(p.agent, p.srm, p.config, {"text": scenes[0].text, "version": "bench", "branch": p.branch})


def run(preset: str, device: str, n_images: int, repeat: int, n_train: int) -> dict[str, dict[str, float]]:
    # The bundled checkpoint for small (its masks give the instance split real components); random weights otherwise.
    sam = load_sam(preset, None, device) if preset == "small" else FrozenSam.from_preset(preset, device=device)
    images = [s.image for s in make_split(FAMILY, "test", n_images)]
    out: dict[str, dict[str, float]] = {}
    policies: dict[tuple[int, int], Bundle] = {}
    for name, (grid, split, refine) in SETTINGS.items():
        if grid not in policies:
            policies[grid] = policy(sam, grid, n_train)
        model = AlignSAM(sam, policies[grid])
        instances, filtered = bool(split), split == "weak filter"
        if filtered:
            scenes = make_split(FAMILY, "train", max(n_train, 12))  # enough instances of both kinds to fit one
            preds = model.predict([s.image for s in scenes], instances=True, instance_filter=False, weak=WEAK_LOGIT)
            model.instance_filter, _ = fit_filter_on(((s.image, p.instances, s.mask) for s, p in
                                                      zip(scenes, preds, strict=True) if p.instance_points),
                                                     weak=WEAK_LOGIT)
            if model.instance_filter is None:  # e.g. random weights: nothing told the instances apart
                print(f"[{preset} {name}] skipped: no instance filter could be fit", flush=True)
                continue
        model.predict(images[:1], instances=instances, refine=refine)  # warm-up (allocations, first-call paths)
        clock = SamClock(sam)
        walls, floors = [], []
        try:
            for _ in range(repeat):
                sam._cache.clear()
                clock.reset()
                sync(sam.device)
                t0 = time.perf_counter()
                model.predict(images, instances=instances, refine=refine)
                sync(sam.device)
                walls.append(time.perf_counter() - t0)
                floors.append(clock.seconds)
        finally:
            clock.remove()
        ratios = [w / f for w, f in zip(walls, floors, strict=True)]
        i = ratios.index(statistics.median(ratios)) if repeat % 2 else 0
        out[name] = {"wall_s": walls[i], "floor_s": floors[i], "ratio": statistics.median(ratios),
                     "ratio_min": min(ratios), "ratio_max": max(ratios), "images": n_images,
                     "wall_ms_per_image": 1000 * walls[i] / n_images,
                     "decode_calls": clock.calls["decode"], "prompt_sets_per_image": clock.prompt_sets / n_images,
                     "encoder_calls": clock.calls["embed_many"], "met": statistics.median(ratios) <= TARGET}
        print(f"[{preset} {name}] wall {walls[i]:.2f} s, SAM {floors[i]:.2f} s, ratio {out[name]['ratio']:.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f}); {clock.prompt_sets / n_images:.1f} prompt sets "
              f"per image", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", nargs="+", default=["small"])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--train-scenes", type=int, default=6, help="scenes the throwaway policy trains on")
    ap.add_argument("--device", default=resolve_device("auto"))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"device": args.device, "torch_threads": torch.get_num_threads(), "target": TARGET,
                               "presets": {}}
    rows = []
    for preset in args.preset:
        results["presets"][preset] = r = run(preset, args.device, args.images, args.repeat,
                                                       args.train_scenes)
        for name, v in r.items():
            rows.append((preset, name, str(v["images"]), f"{v['wall_ms_per_image']:.1f}",
                         f"{1000 * v['floor_s'] / v['images']:.1f}", f"{v['prompt_sets_per_image']:.1f}",
                         f"{v['ratio']:.3f} ({v['ratio_min']:.3f}-{v['ratio_max']:.3f})",
                         "yes" if v["met"] else "no"))
    name = args.name or f"inference_{args.device}"
    path = write_results(name, results, rows, ("preset", "setting", "images", "wall ms / image",
                                               "SAM ms / image (floor)", "prompt sets / image",
                                               "wall / floor (min-max)", f"<= {TARGET}"), RESULTS)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
