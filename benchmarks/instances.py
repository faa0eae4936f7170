"""Every instance of the target (issue 17): AlignSAM with and without per-instance prompts, per family.

    python -m benchmarks.instances --threads 1                       # six tasks, 200 test scenes, the paper's E/K/T
    python -m benchmarks.instances --tasks instances --test 40 --name instances_quick

For each task (the paper's five of ``benchmarks/quality.py`` and the multi-instance family ``instances``), the
policy trained on the 50-scene train split with the paper's E=50 / K=20 / T=15 (implicit SRM, seed 0; taken from
``--bundle-dir`` when a bundle of exactly that training is there, e.g. ``benchmarks/noc.py``'s cache, else trained
and cached), evaluated on the test split:

- AlignSAM with the policy's own mask (the paper), and with SAM prompted once per instance of the SRM's map
  (:mod:`alignsam.instances`);
- the w/o-RL (random actions) and w/o-SRM (all points positive) ablations, each in both modes; w/o SRM also per
  instance grouped by its points' own masks (no SRM map), the row its per-instance goal is measured against;
- the oracle clicker (same T), the upper bound the issue's "0.90 of the oracle" goal is measured against;
- the choice validation makes (per-instance prompts only if they score ``INSTANCE_MARGIN`` higher on 30 held-out
  scenes: train-split seeds 50-79), as :func:`alignsam.train.train` makes it for a project's label;
- with ``--refine``: then, in the kept mode, each count of SRM corrective clicks (:mod:`alignsam.refine`) on the
  validation and test scenes, the count validation keeps (:func:`alignsam.train.kept_refine`), and every row above
  measured with it (the w/o-SRM rows and the oracle have no SRM to ask, so they are unchanged).

Then the issue's goals per task for the chosen mode: FR over random actions >= 10 points, mIoU over w/o RL >= 5
points, mIoU over w/o SRM >= 5 points, AlignSAM >= 0.90 of the oracle's mIoU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignsam import metrics
from alignsam.bundle import load_bundle, save_bundle
from alignsam.evaluate import foreground_rate
from alignsam.instances import WEAK_LOGIT, fit_filter_on
from alignsam.loading import load_sam, resolve_device
from alignsam.policy import TrainConfig
from alignsam.ppo import PPOConfig
from alignsam.predict import AlignSAM
from alignsam.refine import REFINE_CANDIDATES
from alignsam.rollout import encode
from alignsam.synthetic.baselines import oracle_predict
from alignsam.synthetic.quality import DEFAULT_TASKS, task_samples
from alignsam.train import INSTANCE_MARGIN, kept_instance_mode, kept_refine, train
from benchmarks.common import RESULTS, write_results

TASKS = (*DEFAULT_TASKS, "instances")
ROWS = {"AlignSAM": {}, "w/o RL": {"actions": "random"}, "w/o SRM": {"labels": "positive"}}


def _same_training(meta: dict[str, Any], cfg: TrainConfig, task: str, n_train: int, sam_id: str) -> bool:
    """Whether a cached bundle was trained exactly as ``cfg`` asks, with the same SAM (the inference-time choices aside:
    made here; ``grids`` too: the benchmark trains one grid per bundle)."""
    have = dict(meta.get("config") or {})
    want = json.loads(json.dumps(cfg.to_dict()))
    for d in (have, want):
        for key in ("instances", "instance_boxes", "instance_filter", "grids", "mask_feedback", "refine",
                    "refine_clicks"):
            d.pop(key, None)
    return meta.get("task", task) == task and meta.get("train_samples") in (n_train, round(n_train * 0.8)) \
        and have == want and meta.get("sam_model_id", sam_id) == sam_id


def policy_for(sam: Any, task: str, cfg: TrainConfig, n_train: int, bundle_dir: Path) -> tuple[Any, dict[str, Any]]:
    """The task's bundle from ``bundle_dir`` (same training) or trained now and saved there."""
    for path in sorted(bundle_dir.glob(f"{task.replace(':', '_')}-*.pt")):
        meta = json.loads(path.with_suffix(".json").read_text()) if path.with_suffix(".json").is_file() else {}
        if _same_training(meta, cfg, task, n_train, sam.model_id):
            return load_bundle(path, sam, device=sam.device), {"bundle": str(path), "cached": True,
                                                               "train_s": meta.get("train_s")}
    samples = task_samples(task, "train", n_train)
    t0 = time.perf_counter()
    result = train(sam, samples, dataclasses.replace(cfg, instances="off"))
    train_s = time.perf_counter() - t0
    path = bundle_dir / f"{task.replace(':', '_')}-instances-bench{variant_suffix(cfg)}.pt"
    save_bundle(result.policy, path, sam, samples[0].text, extra={"train_s": train_s, "task": task})
    return load_bundle(path, sam, device=sam.device), {"bundle": str(path), "cached": False, "train_s": train_s}


def variant_suffix(cfg: TrainConfig) -> str:
    """The bundle file's suffix for a training other than the paper's 10 x 10 grid without mask feedback ("" for
    that one, so the caches of earlier runs keep their names)."""
    parts = [] if tuple(cfg.grid) == (10, 10) else [f"grid{cfg.grid[0]}x{cfg.grid[1]}"]
    if cfg.use_mask_input:
        parts.append("maskinput")
    return "".join(f"-{p}" for p in parts)


MODES = {"": (False, False), " + instances": (True, False), " + instances + box": (True, True)}
FILTER = " + filter"
"""Suffix of the per-instance rows with the instance filter fit on the train split (:mod:`alignsam.instances`)."""
OWN_MASKS = " + instances by own masks"
"""The w/o-SRM row's honest per-instance mode: grouped by its points' own masks, not by the trained SRM's map
(:func:`alignsam.instances.group_by_point_masks`); its per-instance goal is measured against this row."""


def table(model: AlignSAM, samples: list[Any], seed: int, rows: list[str] | None = None,
          boxes: bool = False, filter_boxes: bool | None = None) -> dict[str, dict[str, float]]:
    """mIoU and FR of each row (``rows``: a subset of ``ROWS``; None: all) in each mode (with ``boxes``: also per
    instance with each instance's box; with ``filter_boxes`` not None, which needs ``model.instance_filter``: also
    per instance, with boxes or not, with the filter, every row, the w/o-SRM one grouped by its own masks too)."""
    images, gts = [s.image for s in samples], [s.mask for s in samples]
    out: dict[str, dict[str, float]] = {}
    for name, kwargs in ROWS.items():
        if rows is not None and name not in rows:
            continue
        for suffix, (split, boxed) in MODES.items():
            if boxed and not boxes:
                continue
            preds = model.predict(images, generator=torch.Generator().manual_seed(seed), instances=split,
                                  boxes=boxed, instance_filter=False, **kwargs)  # type: ignore[arg-type]
            out[f"{name}{suffix}"] = _row(preds, gts)
        if filter_boxes is not None:
            preds = model.predict(images, generator=torch.Generator().manual_seed(seed), instances=True,
                                  boxes=filter_boxes, instance_filter=True, **kwargs)  # type: ignore[arg-type]
            out[f"{name} + instances{FILTER}"] = _row(preds, gts)
        if name == "w/o SRM":
            for flt in (False, True) if filter_boxes is not None else (False,):  # the plain row first: unfiltered
                # The filter is learned from labels, not part of the SRM: the ablation may keep it (conservative).
                preds = model.predict(images, generator=torch.Generator().manual_seed(seed), instances=True,
                                      grouping="points", instance_filter=flt, **kwargs)  # type: ignore[arg-type]
                out[f"{name}{OWN_MASKS}{FILTER if flt else ''}"] = _row(preds, gts)
    return out


def _row(preds: list[Any], gts: list[np.ndarray]) -> dict[str, float]:
    frs = [fr for p, g in zip(preds, gts, strict=True) if (fr := foreground_rate(p, g)) is not None]
    return {"miou": metrics.miou([p.probs for p in preds], gts), "fr": float(np.mean(frs)) if frs else 0.0,
            "instances_per_image": float(np.mean([len(p.instances) for p in preds]))}


def run_task(sam: Any, task: str, cfg: TrainConfig, args: argparse.Namespace) -> dict[str, Any]:
    bundle, info = policy_for(sam, task, cfg, args.train, Path(args.bundle_dir))
    model = AlignSAM(sam, bundle)
    print(f"[{task}] policy {'from ' + info['bundle'] if info['cached'] else 'trained'}", flush=True)
    val = task_samples(task, "train", args.train + args.val)[args.train:]
    test = task_samples(task, "test", args.test)
    t0 = time.perf_counter()
    val_gts = [s.mask for s in val]
    val_off = metrics.miou([p.probs for p in model.predict([s.image for s in val], instances=False)], val_gts)
    val_on = metrics.miou([p.probs for p in model.predict([s.image for s in val], instances=True, boxes=False)],
                          val_gts)
    val_box = metrics.miou([p.probs for p in model.predict([s.image for s in val], instances=True, boxes=True)],
                           val_gts) if args.boxes else None
    # As alignsam.train.train chooses: the better per-instance form (points first on a tie), kept if it clears
    # the margin over the policy's own mask.
    box_wins = val_box is not None and val_box > val_on
    # The instance filter as training fits it: on the training scenes' instances (here all 50: the benchmark's
    # policy was trained on all of them), in the better per-instance form; one over the SRM map's own components and
    # one with its weak components too (alignsam.instances.with_weak_components), each validated.
    train_samples = task_samples(task, "train", args.train)
    base = "box" if box_wins else "points"
    filters: dict[str, Any] = {}
    val_filters: dict[str, float] = {}
    seen_by: dict[str, np.ndarray] = {}  # whether each training instance is the target, per filter
    for suffix, weak in (("+filter", None), ("+filter+weak", WEAK_LOGIT)):
        flt, seen = fit_filter_on(  # None when every training instance is the target (nothing to learn)
            ((s.image, p.instances, s.mask) for s, p in zip(
                train_samples, model.predict([s.image for s in train_samples], instances=True, boxes=box_wins,
                                             instance_filter=False, weak=weak), strict=True) if p.instance_points),
            weak=weak)
        if flt is None:
            continue
        filters[base + suffix], seen_by[base + suffix] = flt, seen
        model.instance_filter = flt
        val_filters[base + suffix] = metrics.miou([p.probs for p in model.predict(
            [s.image for s in val], instances=True, boxes=box_wins, instance_filter=True)], val_gts)
    modes = {"points": {"miou": val_on}, **({"box": {"miou": val_box}} if val_box is not None else {}),
             **{k: {"miou": v} for k, v in val_filters.items()}}
    kept = kept_instance_mode(modes, val_off, dataclasses.replace(cfg, instances="auto"))
    chosen, filtered = kept is not None, kept is not None and kept in filters
    # The table's filter rows use the kept filter, or (no filter kept) the one the rule would pick between the two.
    weak_key = base + "+filter+weak"
    weak_wins = weak_key in val_filters and (base + "+filter" not in val_filters or
                                             val_filters[weak_key] >= val_filters[base + "+filter"] + INSTANCE_MARGIN)
    shown = kept if filtered else (weak_key if weak_wins else base + "+filter")
    model.instance_filter, val_filter = filters.get(shown), val_filters.get(shown)
    targets = seen_by.get(shown, np.zeros(0, bool))
    refine = None
    if args.refine:
        # As alignsam.train._refine_choice chooses, on the kept mode: each count of SRM corrective clicks validated,
        # kept by kept_refine; the table's rows then use it (w/o SRM and the oracle have no SRM to ask).
        refine = {"val": {}, "test": {}}
        for clicks in REFINE_CANDIDATES:
            for split, samples in (("val", val), ("test", test)):
                preds = model.predict([s.image for s in samples], instances=chosen, boxes=box_wins,
                                      instance_filter=filtered, refine=clicks)
                refine[split][str(clicks)] = metrics.miou([p.probs for p in preds], [s.mask for s in samples])
        refine["kept"] = kept_refine({c: {"miou": m} for c, m in refine["val"].items()})
        model.bundle.config = dataclasses.replace(model.bundle.config, refine_clicks=refine["kept"])
        print(f"[{task}] SRM clicks val {refine['val']} test {refine['test']} -> {refine['kept']}", flush=True)
    rows = table(model, test, args.seed, args.rows, args.boxes,
                 filter_boxes=box_wins if model.instance_filter is not None else None)
    enc = encode(sam, [s.image for s in test], masks=[s.mask for s in test])
    probs, _ = oracle_predict(sam, enc, cfg.ppo.steps)
    oracle = metrics.miou([p.cpu().numpy() for p in probs], [s.mask for s in test])
    mode = (" + instances + box" if box_wins else " + instances") if chosen else ""
    if filtered:
        mode = f" + instances{FILTER}"
    ours = rows[f"AlignSAM{mode}"]
    goals: dict[str, float] = {"over_oracle": ours["miou"] / max(oracle, 1e-9)}
    met = {"over_oracle": goals["over_oracle"] >= 0.90}
    # Per instance, the w/o-SRM ablation is grouped without the SRM (its own masks), so the gap measures the SRM.
    wo_srm = (f"w/o SRM{OWN_MASKS}{FILTER if filtered else ''}") if mode else "w/o SRM"
    if f"w/o RL{mode}" in rows and wo_srm in rows:
        goals = {
            "fr_over_random": ours["fr"] - rows[f"w/o RL{mode}"]["fr"],
            "miou_over_wo_rl": ours["miou"] - rows[f"w/o RL{mode}"]["miou"],
            "miou_over_wo_srm": ours["miou"] - rows[wo_srm]["miou"],
            **goals,
        }
        met.update(fr_over_random=goals["fr_over_random"] >= 0.10, miou_over_wo_rl=goals["miou_over_wo_rl"] >= 0.05,
                   miou_over_wo_srm=goals["miou_over_wo_srm"] >= 0.05)
    out = {"task": task, **info, "grid": list(cfg.grid), "use_mask_input": cfg.use_mask_input,
           "filter_examples": {"instances": len(targets), "targets": int(targets.sum())},
           "val": {"off": val_off, "instances": val_on, "box": val_box, "filter": val_filter,
                   "filter_own": val_filters.get(base + "+filter"), "filter_weak": val_filters.get(weak_key),
                   "filter_candidates": "weak" if model.instance_filter is not None and model.instance_filter.weak
                   is not None else "own", "n": len(val),
                   "chosen": ("instances + box" if box_wins else "instances") + (" + filter" if filtered else "")
                   if chosen else "off"},
           "rows": rows, "oracle_miou": oracle, "refine": refine, "goals": goals, "met": met, "eval_s": time.perf_counter() - t0}
    print(f"[{task}] val off {val_off:.3f} / instances {val_on:.3f} -> {out['val']['chosen']}; test AlignSAM "
          f"{rows['AlignSAM']['miou']:.3f} / + instances {rows['AlignSAM + instances']['miou']:.3f}; oracle "
          f"{oracle:.3f}; goals {met}", flush=True)
    return out


def task_arguments(doc: str | None, tasks: list[str]) -> argparse.ArgumentParser:
    """The arguments this benchmark shares with the others that train (or reuse) one policy per task: the tasks,
    the split sizes, the paper's E and K, the seed, threads, device and the bundle cache."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=tasks)
    ap.add_argument("--train", type=int, default=50)
    ap.add_argument("--val", type=int, default=30)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default=resolve_device("auto"))
    ap.add_argument("--bundle-dir", default="/tmp/noc/cache", help="trained bundles (benchmarks/noc.py's cache)")
    return ap


def main() -> None:
    ap = task_arguments(__doc__, list(TASKS))
    ap.add_argument("--grid", type=int, nargs=2, default=(10, 10), metavar=("ROWS", "COLS"),
                    help="the action grid (the paper: 10 10)")
    ap.add_argument("--mask-input", action="store_true", help="feed the previous low-res logits back to SAM")
    ap.add_argument("--boxes", action="store_true", help="also per instance with each instance's box")
    ap.add_argument("--refine", action="store_true",
                    help="choose the count of SRM corrective clicks on validation (alignsam.refine) for the rows")
    ap.add_argument("--sam-checkpoint", default=None, help="small SAM weights (default: the bundled checkpoint)")
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=None,
                    help="table rows to evaluate (default: all; the goals need all three)")
    ap.add_argument("--name", default="instances")
    ap.add_argument("--collect", nargs="+", default=None, metavar="NAME",
                    help="no model: merge the tasks of results files NAME.json (runs split over processes)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(ppo=PPOConfig(episodes=args.episodes, epochs=args.epochs), branch="implicit", seed=args.seed,
                      grid=tuple(args.grid), use_mask_input=args.mask_input)
    Path(args.bundle_dir).mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"config": cfg.to_dict(), "torch_threads": torch.get_num_threads(),
                               "instance_margin": INSTANCE_MARGIN, "tasks": {},
                               "seeds": {"train": "train split 0-49", "val": "train split 50-79",
                                         "test": f"test split 10000-{10000 + args.test - 1}"}}
    if not args.collect:
        sam = load_sam("small", args.sam_checkpoint, args.device)
        sam.cache_size = max(sam.cache_size, args.test + args.val + 16)
        results["sam"] = sam.model_id
    if args.collect:
        for name in args.collect:
            part = json.loads((RESULTS / f"{name}.json").read_text())["results"]
            results["tasks"].update(part["tasks"])
            results["torch_threads"] = part.get("torch_threads")  # what the runs used, not this merge
            results["sam"] = part.get("sam")
        results["collected_from"] = args.collect
        write(args.name, results)
        return
    for task in args.tasks:
        results["tasks"][task] = run_task(sam, task, cfg, args)
        write(args.name, results)


def write(name: str, results: dict[str, Any]) -> None:
    """The results file and its Markdown table: every row of every task, then the chosen mode and the goals."""
    lines = []
    for task, r in results["tasks"].items():
        for row_name, row in r["rows"].items():
            lines.append((task, row_name, f"{row['miou']:.3f}", f"{row['fr']:.3f}",
                          f"{row['instances_per_image']:.2f}", "", ""))
        g, m = r["goals"], r["met"]
        ablations = (f"FR-random {g['fr_over_random']:+.3f} {'ok' if m['fr_over_random'] else 'MISS'}; "
                     f"over w/o RL {g['miou_over_wo_rl']:+.3f} {'ok' if m['miou_over_wo_rl'] else 'MISS'}; "
                     f"over w/o SRM {g['miou_over_wo_srm']:+.3f} {'ok' if m['miou_over_wo_srm'] else 'MISS'}; "
                     ) if "fr_over_random" in g else "ablations not run; "
        box = f" / box {r['val']['box']:.3f}" if r["val"].get("box") is not None else ""
        box += f" / filter {r['val']['filter']:.3f}" if r["val"].get("filter") is not None else ""
        if r["val"].get("filter_weak") is not None:  # both filters were validated: which candidates, and each score
            own = r["val"].get("filter_own")
            box += f" ({r['val']['filter_candidates']}: own components {own:.3f}" if own is not None else " ("
            box += f", with weak ones {r['val']['filter_weak']:.3f})"
        lines.append((task, f"**chosen: {r['val']['chosen']}** (val {r['val']['off']:.3f} / {r['val']['instances']:.3f}"
                      f"{box})",
                      "", "", "", f"oracle {r['oracle_miou']:.3f}, ratio {g['over_oracle']:.3f}",
                      f"{ablations}0.90 oracle {'ok' if m['over_oracle'] else 'MISS'}"))
    write_results(name, results, lines, ("task", "row", "mIoU", "FR", "instances / image", "oracle",
                                         "goals (chosen mode)"), out_dir=RESULTS)

if __name__ == "__main__":
    main()
