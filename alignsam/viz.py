"""What people see of a run: masks tinted over images with their prompt points (PNGs), training progress bars."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm


def overlay(image: np.ndarray, mask: np.ndarray, points: Sequence[tuple[float, float, int]]) -> np.ndarray:
    """``image`` (HxWx3 uint8) with ``mask`` (HxW bool) tinted and ``points`` ``(x, y, label)`` drawn, green for
    positive (1), red for negative; returns a new HxWx3 uint8 array."""
    out = image.astype(np.float32).copy()
    tint = np.array([40, 200, 255], np.float32)
    out[mask] = 0.55 * out[mask] + 0.45 * tint
    pil = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    r = max(3, round(min(image.shape[:2]) / 80))
    for x, y, label in points:
        color = (0, 230, 0) if label == 1 else (240, 0, 0)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=color, outline=(255, 255, 255))
    return np.asarray(pil)


def save_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Writes a uint8 HxW or HxWx3 ``array`` as a PNG, creating the folder."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(p)


def mask_png(mask: np.ndarray) -> np.ndarray:
    """A bool mask as a 0 / 255 uint8 image."""
    return mask.astype(np.uint8) * 255


def progress_printer() -> Callable[[Any], None]:
    """A training callback drawing one tqdm bar per SRM branch on stderr, and the chosen branch at the end."""
    bars: dict[str, tqdm] = {}

    def callback(p) -> None:
        if p.stage == "training":
            bar = bars.get(p.branch)
            if bar is None:
                bar = bars[p.branch] = tqdm(total=p.episodes, desc=f"train {p.branch}", unit="ep", file=sys.stderr)
            bar.update(p.episode - bar.n)
            bar.set_postfix(reward=f"{p.reward:.2f}", fr=f"{p.foreground_rate:.2f}", srm=f"{p.srm_loss:.3f}")
            if p.episode == p.episodes:
                bar.close()
        elif p.stage == "done":
            print(f"chose the {p.branch} SRM branch (validation mIoU {p.val_miou:.3f})", file=sys.stderr)

    return callback
