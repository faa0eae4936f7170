"""``alignsam`` command line: train, predict, eval, bench, presets, demo.

Errors a user can cause (empty folders, unpaired files, unreadable images, wrong mask sizes,
missing checkpoints) end the command with one readable line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from alignsam.bench import run_perception_bench
from alignsam.bundle import read_meta, save_bundle
from alignsam.data import list_images, load_folder, read_image
from alignsam.demo import run_demo
from alignsam.errors import AlignSamError, DataError
from alignsam.evaluate import evaluate, format_table
from alignsam.loading import BUNDLED_SMALL_SAM, load_clip, load_sam, resolve_device
from alignsam.policy import TrainConfig
from alignsam.ppo import PPOConfig
from alignsam.predict import AlignSAM
from alignsam.sam import list_presets
from alignsam.synthetic.quality import parse_task, run_task
from alignsam.train import train
from alignsam.viz import mask_png, overlay, progress_printer, save_png


def _add_model_args(p: argparse.ArgumentParser, clip: bool = True) -> None:
    p.add_argument("--sam-preset", default="small", help="vit_b | vit_l | vit_h | small | tiny (default: small)")
    p.add_argument("--sam-checkpoint", default=None, help="SAM checkpoint (.pth); default: bundled small SAM")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    p.add_argument("--cache-dir", default=None, help="on-disk SAM embedding cache folder")
    if clip:
        p.add_argument("--clip-preset", default="vit_b16", help="vit_b16 (OpenAI ViT-B/16) | tiny | none")
        p.add_argument("--clip-pretrained", default=None, help="open_clip tag or local weights file")


# ---------------------------------------------------------------------------------- commands
def cmd_presets(args: argparse.Namespace) -> int:
    print(f"{'preset':8} {'input':>6} {'embedding':>12} {'params':>12}  description")
    for p in list_presets():
        print(f"{p.name:8} {p.image_size:>6} {p.embedding:>12} {p.parameters:>12,}  {p.description}")
    if BUNDLED_SMALL_SAM.is_file():
        print(f"\nbundled checkpoint for 'small': {BUNDLED_SMALL_SAM}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    samples = load_folder(args.images, args.masks, args.prompt, limit=args.samples)
    device = resolve_device(args.device)
    sam = load_sam(args.sam_preset, args.sam_checkpoint, device, args.cache_dir)
    clip = load_clip(args.clip_preset, args.clip_pretrained, device) if args.branch != "implicit" else None
    grid, *more = args.grids
    cfg = TrainConfig(ppo=PPOConfig(episodes=args.episodes, steps=args.steps), branch=args.branch, seed=args.seed,
                      instances=args.instances, mask_feedback=args.mask_feedback, refine=args.refine, grid=grid,
                      grids=tuple(more))
    print(f"training on {len(samples)} samples of {args.prompt!r} with SAM {sam.model_id} on {device}", file=sys.stderr)
    result = train(sam, samples, cfg, clip=clip, callback=progress_printer())
    meta = save_bundle(result.policy, args.out, sam, args.prompt,
                       clip_model=args.clip_preset if result.policy.branch == "explicit" else None)
    print(json.dumps({"bundle": str(args.out), "version": meta["version"], "branch": meta["branch"],
                      "grid": meta["grid"], "validation": meta["val_metrics"], "candidates": result.candidates,
                      "mask_input": result.policy.config.use_mask_input, "mask_feedback": result.mask_feedback,
                      "refine_clicks": result.policy.config.refine_clicks, "refine": result.refine},
                     indent=2))
    return 0


def _grid(text: str) -> tuple[int, int]:
    """``"16x16"`` -> ``(16, 16)`` (argparse type; raises ArgumentTypeError)."""
    rows, sep, cols = text.lower().partition("x")
    if not sep or not rows.isdigit() or not cols.isdigit() or int(rows) < 2 or int(cols) < 2:
        raise argparse.ArgumentTypeError(f"an action grid is <rows>x<cols>, at least 2x2, e.g. 16x16; got {text!r}")
    return int(rows), int(cols)


def _load_model(args: argparse.Namespace):
    meta = read_meta(args.bundle)
    device = resolve_device(args.device)
    sam = load_sam(meta["sam_preset"], args.sam_checkpoint, device, args.cache_dir)
    clip = None
    if meta["branch"] == "explicit":
        clip = load_clip(meta.get("clip_model") or args.clip_preset, args.clip_pretrained, device)
    return AlignSAM.from_bundle(args.bundle, sam, clip)


def cmd_predict(args: argparse.Namespace) -> int:
    model = _load_model(args)
    files = list_images(args.images)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    for stem, path in tqdm(sorted(files.items()), desc="predict", unit="img", file=sys.stderr):
        image = read_image(path)
        pred = model.predict([image])[0]
        save_png(out / f"{stem}.png", mask_png(pred.mask))
        save_png(out / f"{stem}.overlay.png", overlay(image, pred.mask, pred.points))
        summary.append({"image": stem, "score": round(pred.score, 4), "present": round(pred.present, 4),
                        "area": int(pred.mask.sum()), "points": pred.points})
    (out / "predictions.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {len(summary)} masks and overlays to {out}", file=sys.stderr)
    return 0


def _eval_synthetic(args: argparse.Namespace) -> int:
    """``alignsam eval --synthetic TASK``: train on a synthetic task's train split, the full table on its test split."""
    for task in args.synthetic:
        try:
            parse_task(task)
        except ValueError as exc:
            raise DataError(str(exc)) from None
    device = resolve_device(args.device)
    sam = load_sam(args.sam_preset, args.sam_checkpoint, device, args.cache_dir)
    clip = None if args.branch == "implicit" else load_clip(args.clip_preset, args.clip_pretrained, device)
    cfg = TrainConfig(ppo=PPOConfig(episodes=args.episodes), branch=args.branch, seed=args.seed)
    report = {}
    for task in args.synthetic:
        print(f"training on {task} ({args.train} train scenes), evaluating on {args.test} test scenes ...",
              file=sys.stderr, flush=True)
        r = run_task(sam, task, cfg, args.train, args.test, clip=clip, seed=args.seed)
        report[task] = r
        print(f"\n## {task} ({r['text']!r}; SRM branch {r['branch']})")
        print(format_table(r["table"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=float) + "\n")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.synthetic:
        return _eval_synthetic(args)
    missing = [f"--{name}" for name in ("bundle", "images", "masks") if getattr(args, name) is None]
    if missing:
        raise DataError(f"eval needs {', '.join(missing)} (or --synthetic TASK to benchmark on synthetic scenes)")
    model = _load_model(args)
    samples = load_folder(args.images, args.masks, model.text)
    table = evaluate(model, samples, ablations=args.ablations)
    print(format_table(table))
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2) + "\n")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    run_perception_bench(Path(args.out), presets=args.presets, device=resolve_device(args.device),
                         repeat=args.repeat)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(Path(args.out), device=resolve_device(args.device), quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="alignsam", description="AlignSAM: RL prompting of a frozen SAM.")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a policy on images + masks")
    p.add_argument("--images", required=True)
    p.add_argument("--masks", required=True)
    p.add_argument("--prompt", required=True, help="the target's text, e.g. 'shadow'")
    p.add_argument("--out", required=True, help="bundle path to write (.pt, plus a .json sidecar)")
    p.add_argument("--branch", choices=["implicit", "explicit", "auto"], default="auto")
    p.add_argument("--instances", choices=["auto", "off", "on"], default="auto",
                   help="prompt SAM once per instance of the SRM's map: auto = when it validates better")
    p.add_argument("--mask-feedback", choices=["auto", "off"], default="auto",
                   help="feed SAM's previous mask back as mask_input at inference: auto = when it validates better")
    p.add_argument("--refine", choices=["auto", "off"], default="auto",
                   help="SRM corrective clicks after the episode (0, 3 or 6): auto = as many as validate better")
    p.add_argument("--grids", nargs="+", type=_grid, default=[(10, 10)], metavar="RxC",
                   help="action grids to train and validate, e.g. 10x10 16x16 (paper: 10x10); the best is kept")
    p.add_argument("--samples", type=int, default=None, help="use at most N samples")
    p.add_argument("--episodes", type=int, default=50, help="E (paper: 50)")
    p.add_argument("--steps", type=int, default=15, help="T (paper: 15)")
    p.add_argument("--seed", type=int, default=0)
    _add_model_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="segment a folder of images with a bundle")
    p.add_argument("--bundle", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--out", required=True)
    _add_model_args(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("eval", help="the paper's metrics table on images + masks (or on a synthetic task)")
    p.add_argument("--bundle", default=None)
    p.add_argument("--images", default=None)
    p.add_argument("--masks", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--ablations", action="store_true", help="also w/o RL, w/o SRM, w/o multi-step")
    p.add_argument("--synthetic", nargs="+", default=None, metavar="TASK",
                   help="instead: train and evaluate on synthetic tasks (saliency, blur, shadow, mirror, "
                        "semantic:circle|square|triangle|star) with ablations, PerSAM-style and oracle rows")
    p.add_argument("--train", type=int, default=50, help="--synthetic: train scenes (default 50)")
    p.add_argument("--test", type=int, default=200, help="--synthetic: test scenes (default 200)")
    p.add_argument("--episodes", type=int, default=50, help="--synthetic: E (paper: 50)")
    p.add_argument("--branch", choices=["implicit", "explicit", "auto"], default="implicit",
                   help="--synthetic: SRM branch (default implicit: offline CLIP has no text meaning)")
    p.add_argument("--seed", type=int, default=0)
    _add_model_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="speed benchmarks (encoder, decoder, CLIP map, episode)")
    p.add_argument("--presets", nargs="+", default=["vit_b", "small"])
    p.add_argument("--device", default="auto")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", default="bench-results", help="folder for perception_<device>.json / .md")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("presets", help="list SAM presets")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("demo", help="run the pipeline on bundled data (no downloads)")
    p.add_argument("--out", default="run/demo")
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="fewer episodes (for smoke tests)")
    p.set_defaults(func=cmd_demo)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except AlignSamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
