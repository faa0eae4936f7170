"""Training and evaluation samples: (image, mask, text prompt), and folders of them.

A folder pair is ``images/`` + ``masks/`` matched by file stem; a mask is an image whose nonzero
pixels are foreground, of the same size as its image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from alignsam.errors import DataError, ImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class Sample:
    """One labelled image: ``image`` HxWx3 uint8, ``mask`` HxW bool, ``text`` the target's prompt."""

    image: np.ndarray
    mask: np.ndarray
    text: str
    name: str = ""


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Reads an image file as HxWx3 uint8 RGB; raises :class:`ImageError` naming the file."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot read image {path}: {exc}") from exc


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Reads a mask file: nonzero pixels (of any channel) are foreground. HxW bool."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot read mask {path}: {exc}") from exc
    if arr.ndim == 3:
        arr = arr[:, :, :3].max(axis=2) if arr.shape[2] != 2 else arr[:, :, 0]
    return arr > 0


def list_images(folder: str | os.PathLike) -> dict[str, Path]:
    """Image files of a folder by stem; raises :class:`DataError` if it is missing or has none."""
    d = Path(folder)
    if not d.is_dir():
        raise DataError(f"not a folder: {d}")
    files = {p.stem: p for p in sorted(d.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {d}")
    return files


def load_folder(
    images: str | os.PathLike, masks: str | os.PathLike, text: str, limit: int | None = None
) -> list[Sample]:
    """Loads image/mask pairs matched by stem. Every image needs a mask of its size."""
    imgs, msks = list_images(images), list_images(masks)
    unmatched = sorted(set(imgs) ^ set(msks))
    if unmatched:
        raise DataError(
            f"{len(unmatched)} files have no partner between {images} and {masks} "
            f"(paired by file stem), e.g. {unmatched[:3]}"
        )
    samples = []
    for stem in sorted(imgs)[:limit]:
        image, mask = read_image(imgs[stem]), read_mask(msks[stem])
        if mask.shape != image.shape[:2]:
            raise DataError(f"mask {msks[stem]} is {mask.shape[::-1]} but its image is {image.shape[1::-1]} (W x H)")
        samples.append(Sample(image=image, mask=mask, text=text, name=stem))
    return samples
