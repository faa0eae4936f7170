"""Annotator effort (issue 16): NoC@85 / NoC@90 of the simulated annotator on every synthetic task family.

Per task (:data:`alignsam.synthetic.quality.DEFAULT_TASKS`): AlignSAM is trained on the 50-scene train split with
the paper's E / K / T (the defaults of ``benchmarks/quality.py``, seed 0; the bundle is cached on disk so a re-run
does not retrain), then the 200 test scenes are corrected by the simulated annotator (:mod:`alignsam.effort`:
interior point of the largest error region, stop at the threshold or after 20 clicks) from three starts:

- ``SAM alone``: no prediction, SAM on the annotator's clicks only (Label Studio's own SAM backend);
- ``zero-shot``: the zero-shot pre-label (CLIP-Surgery points -> SAM; offline CLIP has random weights) + clicks,
  with each combination strategy of :mod:`alignsam.interactive`;
- ``AlignSAM``: the trained policy's pre-label + clicks, with each strategy.

The strategy is also chosen the way a training job would, on a validation set the policy never saw (30 more
scenes of the train family, seeds 50..79: ``task_samples(task, "train", 80)[50:]``); its test NoC is reported
next to the test-best one. Goal: AlignSAM's NoC@90 at most half of SAM alone's on every family.

    python -m benchmarks.noc --threads 1                                             # everything (~1 h on 1 CPU)
    python -m benchmarks.noc --tasks saliency --test 20 --episodes 4 --name noc_quick  # smoke run

Results are written after every task (``complete`` false until the last), so an interrupted run leaves what it
measured; ``--resume`` reuses the per-task results already in the cache (same configuration) and only runs the rest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignsam.bundle import load_bundle, read_meta, save_bundle
from alignsam.effort import choose_strategy, noc, reached, simulate, summarize
from alignsam.interactive import STRATEGIES, Start, start_of
from alignsam.loading import load_clip, load_sam, resolve_device
from alignsam.policy import TrainConfig
from alignsam.ppo import PPOConfig
from alignsam.predict import AlignSAM, Prediction
from alignsam.synthetic.quality import DEFAULT_TASKS, task_samples
from alignsam.train import Timings, train
from alignsam.zeroshot import ZeroShot
from benchmarks.common import RESULTS, write_results

THRESHOLDS = (0.85, 0.90)
GOAL_RATIO = 0.5  # AlignSAM's NoC@90 <= half of SAM alone's
HEADERS = ("task", "start", "strategy", "NoC@85", "NoC@90", "accepted@0 (85)", "accepted@0 (90)",
           "failed@20 (85)", "failed@20 (90)", "mIoU at 0 clicks", "mIoU after 1 click")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def trained_bundle(sam: Any, task: str, cfg: TrainConfig, n_train: int, cache: Path) -> tuple[Any, dict[str, Any]]:
    """The policy for ``task`` from the cache, or trained now and cached. Returns (bundle, info)."""
    d = cfg.to_dict()
    # Fields at their defaults that bundles cached before they existed were trained with: the same key.
    for field, default in (("instances", "off"), ("grids", []), ("instance_boxes", "auto"),
                           ("instance_filter", "auto")):
        if d.get(field) in (default, tuple(default) if isinstance(default, list) else default):
            d.pop(field)
    key = _digest({"task": task, "n_train": n_train, "cfg": d, "sam": sam.model_id})
    path = cache / f"{task.replace(':', '_')}-{key}.pt"
    info: dict[str, Any] = {"bundle": str(path)}
    if path.is_file():
        bundle = load_bundle(path, sam, device=sam.device)
        info.update(cached=True, train_s=bundle.meta.get("train_s"), candidates=bundle.meta.get("candidates"))
        return bundle, info
    samples = task_samples(task, "train", n_train)
    t0 = time.perf_counter()
    result = train(sam, samples, cfg, timings=Timings())
    train_s = time.perf_counter() - t0
    save_bundle(result.policy, path, sam, samples[0].text,
                extra={"train_s": train_s, "candidates": result.candidates, "task": task})
    info.update(cached=False, train_s=train_s, candidates=result.candidates)
    return load_bundle(path, sam, device=sam.device), info


def as_start(pred: Prediction) -> Start:
    return start_of(pred)


def _scores(curves: np.ndarray, max_clicks: int) -> dict[str, Any]:
    s: dict[str, Any] = summarize(curves, THRESHOLDS, max_clicks)
    s["miou_at_0"] = float(curves[:, 0].mean())
    s["miou_at_1"] = float(curves[:, min(1, max_clicks)].mean())
    s["mean_curve"] = [round(float(v), 4) for v in curves.mean(axis=0)]
    for t in THRESHOLDS:  # per image, so the analysis can pair starts image by image
        s[f"per_image_noc@{round(t * 100)}"] = noc(curves, t, max_clicks).tolist()
        s[f"per_image_failed@{round(t * 100)}"] = [int(v) for v in ~reached(curves, t)]
    return s


def _rank(scores: dict[str, dict[str, Any]]) -> str:
    return min(scores, key=lambda s: (scores[s]["noc@90"], scores[s]["noc@85"], STRATEGIES.index(s)))


def run_task(sam: Any, clip: Any, task: str, cfg: TrainConfig, args: argparse.Namespace) -> dict[str, Any]:
    if args.bundle:  # a given policy (e.g. benchmarks/instances.py's, on another grid)
        bundle = load_bundle(args.bundle, sam, device=sam.device)
        info: dict[str, Any] = {"bundle": args.bundle, "cached": True, "train_s": bundle.meta.get("train_s"),
                                "grid": bundle.meta.get("grid")}
    else:
        bundle, info = trained_bundle(sam, task, cfg, args.train, Path(args.cache_dir))
    print(f"[{task}] policy {'from cache' if info['cached'] else 'trained'} ({info['train_s'] or 0:.0f} s train)",
          flush=True)
    model = AlignSAM(sam, bundle, None)
    zs = ZeroShot(sam, clip)
    text = bundle.text
    val = task_samples(task, "train", args.train + args.val)[args.train:]
    test = task_samples(task, "test", args.test)
    out: dict[str, Any] = {"task": task, "text": text, "n_train": args.train, "n_val": len(val),
                           "n_test": len(test), "branch": bundle.meta["branch"], **info, "test": {}}

    # validation: the strategy a training job would pick for this label (AlignSAM start)
    t0 = time.perf_counter()
    v_images, v_gts = [s.image for s in val], [s.mask for s in val]
    v_embs = sam.embed_many(v_images)
    split = {"off": False, "on": True, "auto": None}[args.instances]
    v_preds = model.predict(v_images, instances=split)
    best_val, v_scores = choose_strategy(sam, v_embs, v_gts, [p.mask for p in v_preds],
                                         [as_start(p) for p in v_preds], args.strategies, args.max_clicks,
                                         THRESHOLDS)
    out["val"] = {"chosen": best_val, "scores": v_scores, "s": time.perf_counter() - t0}
    print(f"[{task}] val choice {best_val} (NoC@90 {v_scores[best_val]['noc@90']:.2f}); "
          f"{out['val']['s']:.0f} s", flush=True)

    images, gts = [s.image for s in test], [s.mask for s in test]
    t0 = time.perf_counter()
    embs = sam.embed_many(images)
    a_preds = model.predict(images, instances=split)
    z_preds = zs.predict(images, text)
    out["predict_s"] = time.perf_counter() - t0
    runs: list[tuple[str, str, list[np.ndarray] | list[None], list[Start] | None]] = [
        ("SAM alone", "clicks", [None] * len(images), None)]
    runs += [("zero-shot", s, [p.mask for p in z_preds], [as_start(p) for p in z_preds]) for s in args.zs_strategies]
    runs += [("AlignSAM", s, [p.mask for p in a_preds], [as_start(p) for p in a_preds]) for s in args.strategies]
    out["srm_absent_share"] = float(np.mean([p.low_res is None for p in a_preds]))
    for start, strategy, masks, starts in runs:
        t1 = time.perf_counter()
        curves = simulate(sam, embs, gts, masks, starts, strategy, args.max_clicks, THRESHOLDS)
        sc = _scores(curves, args.max_clicks)
        sc["simulate_s"] = time.perf_counter() - t1
        out["test"].setdefault(start, {})[strategy] = sc
        print(f"[{task}] {start:9s} {strategy:20s} NoC@85 {sc['noc@85']:5.2f} NoC@90 {sc['noc@90']:5.2f} "
              f"acc0 {sc['accepted_at_0@90']:.2f} failed {sc['failed@90']:.2f} ({sc['simulate_s']:.0f} s)", flush=True)
    alone = out["test"]["SAM alone"]["clicks"]["noc@90"]
    a_scores = out["test"]["AlignSAM"]
    best_test = _rank(a_scores)
    goal: dict[str, Any] = {"sam_alone_noc@90": alone, "test_best": best_test, "val_chosen": best_val}
    for which, s in (("test_best", best_test), ("val_chosen", best_val)):
        ratio = a_scores[s]["noc@90"] / alone if alone > 0 else float("inf")
        goal[f"{which}_noc@90"] = a_scores[s]["noc@90"]
        goal[f"{which}_ratio"] = ratio
        goal[f"{which}_met"] = bool(ratio <= GOAL_RATIO)
    # images that no start and no strategy brings over 0.90 within the budget: they cost every start max_clicks,
    # a floor under NoC@90 that no pre-label removes
    fails = np.array([s["per_image_failed@90"] for by in out["test"].values() for s in by.values()], dtype=bool)
    never = fails.all(axis=0)
    alone_img = np.array(out["test"]["SAM alone"]["clicks"]["per_image_noc@90"])
    alone_reached = 1.0 - out["test"]["SAM alone"]["clicks"]["failed@90"]
    goal["unreachable@90_share"] = float(never.mean())
    goal["noc@90_floor"] = float(never.mean() * args.max_clicks)
    goal["sam_alone_noc@90_without_unreachable"] = float(alone_img[~never].mean()) if (~never).any() else 0.0
    goal["sam_alone_reached@90_share"] = alone_reached
    out["zero_shot_best"] = _rank(out["test"]["zero-shot"]) if out["test"].get("zero-shot") else None
    out["goal"] = goal
    return out


def rows_of(r: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    task = r["task"] + (f" (PARTIAL: {r['n_test']} test, {r['n_val']} val scenes)" if r.get("partial") else "")
    for start, by_strategy in r["test"].items():
        for strategy, s in by_strategy.items():
            mark = ""
            if start == "AlignSAM":
                mark = " (test best" * (strategy == r["goal"]["test_best"])
                if strategy == r["goal"]["val_chosen"]:
                    mark = (mark + ", val choice)") if mark else " (val choice)"
                elif mark:
                    mark += ")"
            rows.append((task, start, strategy + mark, f"{s['noc@85']:.2f}", f"{s['noc@90']:.2f}",
                         f"{s['accepted_at_0@85']:.3f}", f"{s['accepted_at_0@90']:.3f}", f"{s['failed@85']:.3f}",
                         f"{s['failed@90']:.3f}", f"{s['miou_at_0']:.3f}", f"{s['miou_at_1']:.3f}"))
    g = r["goal"]
    for which in ("test_best", "val_chosen"):
        rows.append((task, f"goal: AlignSAM ({which.replace('_', ' ')}) / SAM alone NoC@90", g[which],
                     "", f"{g[f'{which}_noc@90']:.2f} / {g['sam_alone_noc@90']:.2f}",
                     f"ratio {g[f'{which}_ratio']:.3f}", "met" if g[f"{which}_met"] else "NOT met",
                     "", "", "", ""))
    return rows


def collect(args: argparse.Namespace, results: dict[str, Any], cache: Path) -> None:
    """``--collect``: the newest cached result per task (of this --train / --test) into one results file."""
    rows: list[tuple[str, ...]] = []
    results["collected_from"] = {}
    for task in args.tasks:
        files = sorted(cache.glob(f"result-{task.replace(':', '_')}-*.json"), key=lambda p: p.stat().st_mtime)
        runs = [(p, json.loads(p.read_text())) for p in files]
        runs = [(p, r) for p, r in runs if r["n_train"] == args.train]
        # a full run (--test scenes) if there is one, else the newest smaller one, marked partial
        found = [pr for pr in runs if pr[1]["n_test"] == args.test] or runs
        if not found:
            print(f"[{task}] no cached result in {cache}: run it first", flush=True)
            continue
        r = found[-1][1]
        r["partial"] = r["n_test"] < args.test
        if r["partial"]:
            print(f"[{task}] PARTIAL: {r['n_test']} test scenes, not {args.test}", flush=True)
        results["tasks"][task] = r
        results["collected_from"][task] = str(found[-1][0])
        results["sam"] = results["sam"] or read_meta(r["bundle"]).get("sam_model_id")
        rows += rows_of(r)
    results["wall_s"] = sum(r.get("task_wall_s", 0.0) for r in results["tasks"].values())
    results["wall_s_note"] = "sum of the tasks' own wall times (they may have run in parallel processes)"
    results["complete"] = len(results["tasks"]) == len(args.tasks) and not any(
        r["partial"] for r in results["tasks"].values())
    print(f"wrote {write_results(args.name, results, rows, HEADERS, RESULTS)} "
          f"({len(results['tasks'])} of {len(args.tasks)} tasks)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    ap.add_argument("--train", type=int, default=50)
    ap.add_argument("--val", type=int, default=30, help="validation scenes (train-split seeds after --train)")
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--branch", default="implicit", choices=["auto", "implicit", "explicit"])
    ap.add_argument("--max-clicks", type=int, default=20)
    ap.add_argument("--zs-strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES),
                    help="the AlignSAM start's strategies (default all)")
    ap.add_argument("--instances", choices=["off", "on", "auto"], default="off",
                    help="the AlignSAM pre-label with SAM prompted once per instance (alignsam.instances): on, off "
                    "(the paper's single mask, default), auto (what the bundle chose)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bundle", default=None, help="evaluate this policy bundle instead of training one (one task)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default=resolve_device("auto"))
    ap.add_argument("--cache-dir", default="/tmp/noc/cache", help="trained bundles and per-task results")
    ap.add_argument("--resume", action="store_true", help="reuse per-task results cached by an earlier run")
    ap.add_argument("--collect", action="store_true",
                    help="no model: gather each task's newest cached result (runs split over processes) into one file")
    ap.add_argument("--name", default="noc")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.branch != "implicit":
        raise SystemExit("only the implicit branch is benchmarked offline (random-weight CLIP); see benchmarks/quality.py")
    cfg = TrainConfig(ppo=PPOConfig(episodes=args.episodes, epochs=args.epochs), branch=args.branch, seed=args.seed)
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "config": cfg.to_dict(), "torch_threads": torch.get_num_threads(), "sam": None,
        "clip": "tiny (random weights)", "thresholds": list(THRESHOLDS), "max_clicks": args.max_clicks,
        "goal_ratio": GOAL_RATIO, "seeds": {"train": f"train split seeds 0..{args.train - 1}",
                                            "val": f"train split seeds {args.train}..{args.train + args.val - 1}",
                                            "test": f"test split seeds 10000..{10000 + args.test - 1}",
                                            "training": args.seed},
        "annotator": "corrective_click: interior point of the largest error region, stop at 0.90 or 20 clicks",
        "complete": False, "tasks_planned": args.tasks, "tasks": {},
    }
    if args.collect:
        collect(args, results, cache)
        return
    sam = load_sam("small", None, args.device)
    sam.cache_size = max(sam.cache_size, args.test + args.val + args.train + 16)  # embed every scene once
    clip = load_clip("tiny", None, args.device)
    results["sam"] = sam.model_id
    rows: list[tuple[str, ...]] = []
    t0 = time.perf_counter()
    for task in args.tasks:
        key = _digest({"task": task, "cfg": cfg.to_dict(), "a": {k: v for k, v in vars(args).items()
                                                               if k not in ("threads", "resume", "name", "tasks")}})
        cached = cache / f"result-{task.replace(':', '_')}-{key}.json"
        if args.resume and cached.is_file():
            r = json.loads(cached.read_text())
            print(f"[{task}] results from {cached}", flush=True)
        else:
            t1 = time.perf_counter()
            r = run_task(sam, clip, task, cfg, args)
            r["task_wall_s"] = time.perf_counter() - t1
            r["simulate_s"] = sum(s["simulate_s"] for by in r["test"].values() for s in by.values())
            cached.write_text(json.dumps(r) + "\n")
        results["tasks"][task] = r
        rows += rows_of(r)
        results["wall_s"] = time.perf_counter() - t0
        results["complete"] = len(results["tasks"]) == len(args.tasks)
        path = write_results(args.name, results, rows, HEADERS, RESULTS)
        g = r["goal"]
        print(f"[{task}] goal: test best {g['test_best']} ratio {g['test_best_ratio']:.3f}, val choice "
              f"{g['val_chosen']} ratio {g['val_chosen_ratio']:.3f}; wrote {path}", flush=True)
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
