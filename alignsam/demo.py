"""`alignsam demo`: the whole method on bundled, offline data, in a couple of minutes on a CPU.

1. The perception half on the bundled sample image: the CLIP-Surgery map of a text and SAM's mask
   from one click, written as PNGs.
2. The learning half on a synthetic task (the offline benchmark's "saliency" family: the one object
   that stands out): train an agent + SRM on the train split, then segment held-out images with no
   clicks, writing masks, overlays (green positive / red negative prompt points) and the metrics.

SAM is the bundled small checkpoint trained on synthetic scenes when present (random weights
otherwise, said loudly); CLIP is the tiny random preset, because no real weights can be fetched.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from alignsam.bundle import save_bundle
from alignsam.data import Sample, read_image, read_mask
from alignsam.evaluate import evaluate, format_table
from alignsam.loading import ASSETS, load_clip, load_sam
from alignsam.policy import TrainConfig
from alignsam.ppo import PPOConfig
from alignsam.predict import AlignSAM
from alignsam.synthetic import make_split
from alignsam.train import train
from alignsam.viz import mask_png, overlay, progress_printer, save_png


def perception(out: Path, device: str) -> None:
    sam = load_sam("small", None, device)
    clip = load_clip("tiny", None, device)
    image = read_image(ASSETS / "sample.png")
    gt = read_mask(ASSETS / "sample_mask.png")
    sim = clip.similarity_map_full(image, "yellow circle").cpu().numpy()
    save_png(out / "clip_map.png", (sim * 255).astype(np.uint8))
    click = (85.0, 105.0)  # inside the big yellow circle
    res = sam.decode([sam.embed(image)], torch.tensor([[click]]), torch.tensor([[1]]), None)
    mask = res.probs[0].cpu().numpy() > 0.5
    save_png(out / "sam_one_click.png", mask_png(mask))
    save_png(out / "sam_one_click.overlay.png", overlay(image, mask, [(*click, 1)]))
    inter, union = (mask & gt).sum(), (mask | gt).sum()
    print(f"[perception] CLIP-Surgery map and one-click SAM mask written to {out} "
          f"(one-click IoU with the yellow circles: {inter / max(union, 1):.3f})", flush=True)


def learning(out: Path, device: str, quick: bool) -> dict:
    family = "saliency"
    n_train, n_test = (16, 8) if quick else (50, 24)
    train_scenes = make_split(family, "train", n_train)
    test_scenes = make_split(family, "test", n_test)
    text = train_scenes[0].text
    samples = [Sample(s.image, s.mask, s.text, f"train{i:03d}") for i, s in enumerate(train_scenes)]
    sam = load_sam("small", None, device)
    clip = load_clip("tiny", None, device)
    cfg = TrainConfig(ppo=PPOConfig(episodes=8 if quick else 50), branch="implicit" if quick else "auto")
    t0 = time.perf_counter()
    result = train(sam, samples, cfg, clip=clip, callback=progress_printer())
    train_s = time.perf_counter() - t0
    bundle_path = out / f"{family}.pt"
    save_bundle(result.policy, bundle_path, sam, text, clip_model="tiny")
    model = AlignSAM.from_bundle(bundle_path, sam, clip)
    preds = model.predict([s.image for s in test_scenes])
    for i, (scene, pred) in enumerate(zip(test_scenes, preds, strict=True)):
        save_png(out / "test" / f"test{i:03d}.png", mask_png(pred.mask))
        save_png(out / "test" / f"test{i:03d}.overlay.png", overlay(scene.image, pred.mask, pred.points))
    test = [Sample(s.image, s.mask, s.text, f"test{i:03d}") for i, s in enumerate(test_scenes)]
    table = evaluate(model, test, ablations=True)
    print(format_table(table), flush=True)
    summary = {"family": family, "text": text, "train_samples": n_train, "test_samples": n_test,
               "train_seconds": round(train_s, 1), "branch": result.policy.branch,
               "validation": result.policy.val_metrics, "test": table}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"[learning] trained in {train_s:.0f} s; bundle {bundle_path}; test masks and overlays in {out / 'test'}")
    return summary


def run_demo(out: Path, device: str = "cpu", quick: bool = False) -> int:
    out.mkdir(parents=True, exist_ok=True)
    perception(out, device)
    learning(out, device, quick)
    return 0
