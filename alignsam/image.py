"""Image arrays as the models read them: one check / conversion to RGB and one content hash."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from alignsam.errors import ImageError


def as_rgb_uint8(image: Any, error: type[ImageError] = ImageError) -> np.ndarray:
    """``image`` as a contiguous ``HxWx3`` uint8 RGB array: gray (``HxW``) is repeated to three channels, RGBA
    loses its alpha.

    Raises:
      ImageError (or ``error``, a subclass): not uint8, not ``HxW`` / ``HxWx3`` / ``HxWx4``, or under 2x2 pixels.
    """
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise error(f"expected a uint8 image (HxWx3 RGB), got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise error(f"expected an HxWx3 RGB image, got shape {tuple(arr.shape)}")
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise error(f"image is empty or under 2x2 pixels: shape {tuple(arr.shape)}")
    return np.ascontiguousarray(arr)


def image_digest(image: np.ndarray) -> str:
    """sha256 hex digest of an array's shape and bytes: the key of the embedding and CLIP-map caches."""
    h = hashlib.sha256()
    h.update(str(image.shape).encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()
