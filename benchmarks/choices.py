"""Issue 17's per-label choices side by side: action grid, mask feedback, per-instance prompts (points / box).

    python -m benchmarks.choices        # no model: reads the results files of benchmarks/instances.py runs

Every variant is one ``benchmarks/instances.py`` run with the paper's E=50 / K=20 / T=15 on the same seeds (50
training scenes, 30 validation scenes, 200 test scenes): ``instances.json`` is the paper's 10 x 10 grid without
mask feedback; ``choices_<variant>_<task>.json`` the others (``--grid 16 16``, ``--mask-input``, ``--boxes``).
Per task, the table lists each variant's validation mIoU in each instance mode and its test mIoU, then the choice
validation makes among all of them, as :func:`alignsam.train.train` makes it for a label (a variant's score is its
kept mode's: per instance only when it clears ``INSTANCE_MARGIN`` over one mask), and that choice's test mIoU
against the oracle clicker's. Where the picked variant has a ``--refine`` run (``REFINED``), the SRM corrective
clicks chosen on top of it come next (one row: validation and test mIoU per click count, in the kept mode), and the
chosen test mIoU is the one with the kept count.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from alignsam.policy import TrainConfig
from alignsam.train import INSTANCE_MARGIN, kept_instance_mode
from benchmarks.common import RESULTS, write_results

VARIANTS = {  # variant -> results-file stem patterns, the first that exists ({task}: the task with ':' as '_')
    "10x10": ("instances",),
    # The re-runs with every ablation and the instance filter (2026-12-03) where they exist.
    "16x16": ("choices_grid16_ablations_{task}", "choices_grid16_{task}"),
    "10x10 + mask feedback": ("choices_maskinput_{task}",),
    "10x10 (boxes measured)": ("choices_box_{task}",),
}
REFINED = {"10x10": "choices_refine_{task}", "16x16": "choices_grid16_refine_{task}"}
"""The ``--refine`` run of a variant, where there is one: the SRM corrective clicks training chooses after the grid and
the mode (:func:`alignsam.train._refine_choice`), so only the picked variant needs it."""
MODES = {"off": "AlignSAM", "instances": "AlignSAM + instances", "box": "AlignSAM + instances + box",
         "filter": "AlignSAM + instances + filter"}


def _load(stems: tuple[str, ...], task: str, results_dir: Path) -> dict[str, Any] | None:
    for stem in stems:
        path = results_dir / f"{stem.format(task=task.replace(':', '_'))}.json"
        if path.is_file() and (r := json.loads(path.read_text())["results"]["tasks"].get(task)) is not None:
            return r
    return None


def kept_mode(val: dict[str, Any]) -> tuple[str, float]:
    """The mode a training keeps from validation mIoUs ``{"off", "instances", "box"?, "filter"?}`` (the filter on
    the better of points and box, as ``benchmarks/instances.py`` measures it), and its score; as
    :func:`alignsam.train.kept_instance_mode` keeps it."""
    base = "box" if val.get("box") is not None and val["box"] > val["instances"] else "points"
    modes = {"points": {"miou": val["instances"]}}
    if val.get("box") is not None:
        modes["box"] = {"miou": val["box"]}
    if val.get("filter") is not None:
        modes[f"{base}+filter"] = {"miou": val["filter"]}
    kept = kept_instance_mode(modes, val["off"], TrainConfig(instances="auto"))
    if kept is None:
        return "off", float(val["off"])
    name = "filter" if kept.endswith("+filter") else ("box" if kept == "box" else "instances")
    return name, float(modes[kept]["miou"])


def collect(tasks: list[str], results_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"instance_margin": INSTANCE_MARGIN, "tasks": {}}
    for task in tasks:
        runs = {}
        for variant, stem in VARIANTS.items():
            r = _load(stem, task, results_dir)
            if r is None:
                continue
            mode, score = kept_mode(r["val"])
            test = {m: r["rows"][row]["miou"] for m, row in MODES.items() if row in r["rows"]}
            runs[variant] = {"val": {m: r["val"].get(m) for m in MODES}, "test": test, "kept_mode": mode,
                             "val_score": score, "oracle": r["oracle_miou"], "train_s": r.get("train_s")}
        if not runs:
            continue
        # The boxes run repeats the 10x10 training on the machine the other variants ran on (instances.json ran on
        # another CPU, whose floating point gives slightly different policies): where it exists it is the 10x10 row.
        if "10x10 (boxes measured)" in runs:
            runs["10x10"] = runs.pop("10x10 (boxes measured)")
            runs = {"10x10": runs.pop("10x10"), **runs}
        pick = max(runs, key=lambda v: runs[v]["val_score"])  # dict order: the paper's grid first on a tie
        best_test = max((t, v, m) for v, r in runs.items() for m, t in r["test"].items() if t is not None)
        chosen = runs[pick]
        test_miou = chosen["test"][chosen["kept_mode"]]
        refine = None
        if pick in REFINED and (r := _load((REFINED[pick],), task, results_dir)) is not None and r.get("refine"):
            kept = str(r["refine"]["kept"])
            refine = {**r["refine"], "test_miou": r["refine"]["test"][kept], "goals": r["goals"], "met": r["met"],
                      "before": test_miou}
            test_miou = refine["test_miou"]
            best_test = max([best_test] + [(t, pick, f"{chosen['kept_mode']}, {c} SRM clicks")
                                           for c, t in r["refine"]["test"].items()])
        out["tasks"][task] = {"variants": runs, "chosen": pick, "chosen_mode": chosen["kept_mode"],
                              "chosen_test_miou": test_miou, "oracle": chosen["oracle"], "refine": refine,
                              "over_oracle": test_miou / chosen["oracle"],
                              "paper_default_test_miou": runs["10x10"]["test"]["off"] if "10x10" in runs else None,
                              "best_on_test": {"miou": best_test[0], "variant": best_test[1], "mode": best_test[2]}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["semantic:circle", "saliency", "blur", "shadow", "mirror",
                                                   "instances"])
    ap.add_argument("--name", default="choices")
    args = ap.parse_args()
    results = collect(args.tasks, RESULTS)
    rows = []

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    for task, r in results["tasks"].items():
        for variant, v in r["variants"].items():
            val, test = v["val"], v["test"]
            rows.append((task, variant, f(val["off"]), f(val["instances"]), f(val.get("box")), f(val.get("filter")),
                         v["kept_mode"], f(test.get("off")), f(test.get("instances")), f(test.get("box")),
                         f(test.get("filter")), ""))
        if (ref := r["refine"]) is not None:
            counts = sorted(ref["val"], key=int)
            rows.append((task, f"{r['chosen']}, {r['chosen_mode']}, SRM clicks {' / '.join(counts)}",
                         " / ".join(f(ref["val"][c]) for c in counts), "", "", "", f"{ref['kept']} clicks",
                         " / ".join(f(ref["test"][c]) for c in counts), "", "", "", ""))
        rows.append((task, f"**validation picks {r['chosen']}, {r['chosen_mode']}"
                     + (f", {r['refine']['kept']} SRM clicks" if r["refine"] else "") + "**", "", "", "", "", "",
                     "", "", "", "", f"test {r['chosen_test_miou']:.3f} (paper's default {f(r['paper_default_test_miou'])}"
                     f"); oracle {r['oracle']:.3f}, ratio {r['over_oracle']:.3f}; best on test "
                     f"{r['best_on_test']['miou']:.3f} ({r['best_on_test']['variant']}, {r['best_on_test']['mode']})"))
    path = write_results(args.name, results, rows, (
        "task", "variant", "val one mask", "val per instance", "val per instance + box", "val per instance + filter",
        "kept mode", "test one mask", "test per instance", "test per instance + box", "test per instance + filter",
        "chosen"), RESULTS)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
