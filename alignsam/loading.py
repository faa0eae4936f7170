"""Loading the frozen models: SAM and CLIP-Surgery from a preset name, a checkpoint and a device.

One place for what every entry point needs (the ``alignsam`` command, the workers, the benchmarks): the
bundled small SAM checkpoint for the ``small`` preset, the device choice (``auto`` -> ``cuda`` when visible), and
a loud warning whenever the weights cannot give real masks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from alignsam.clip_surgery import ClipSurgery
from alignsam.sam import FrozenSam

ASSETS = Path(__file__).parent / "assets"
BUNDLED_SMALL_SAM = ASSETS / "sam_small.pth"
PLUMBING_PRESETS = ("small", "tiny")
"""SAM presets trained (if at all) on synthetic scenes only: their masks try the plumbing, not real images."""


def warn(message: str) -> None:
    """One ``WARNING:`` line on stderr."""
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; any other name is returned as it is."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def sam_checkpoint(preset: str, checkpoint: str | os.PathLike | None) -> str | None:
    """The checkpoint to load for ``preset``: the given one, the bundled one for ``small``, or None (random)."""
    if checkpoint is not None:
        return str(checkpoint)
    if preset == "small" and BUNDLED_SMALL_SAM.is_file():
        return str(BUNDLED_SMALL_SAM)
    return None


def warn_if_plumbing_only(preset: str, checkpoint: str | os.PathLike | None) -> None:
    """Say loudly, as a framed banner on stderr, when this SAM cannot give real masks (a synthetic-only preset, or
    random weights); silent for a real preset with a checkpoint."""
    random = sam_checkpoint(preset, checkpoint) is None
    if not random and preset not in PLUMBING_PRESETS:
        return
    print(
        "\n" + "!" * 100 + f"\n!! SAM preset {preset!r}"
        + (" with RANDOM weights" if random else "")
        + ": masks are for trying the plumbing, NOT for real work.\n"
        "!! Set SAM_PRESET=vit_b and SAM_CHECKPOINT=/path/sam_vit_b_01ec64.pth (and CLIP_PRESET=vit_b16) "
        "for real masks.\n" + "!" * 100 + "\n",
        file=sys.stderr,
        flush=True,
    )


def load_sam(preset: str, checkpoint: str | os.PathLike | None, device: str,
             cache_dir: str | os.PathLike | None = None) -> FrozenSam:
    """SAM ``preset`` with ``checkpoint`` (see :func:`sam_checkpoint`) on ``device`` (``auto`` allowed).

    Raises:
      CheckpointError: the checkpoint is missing or does not fit the preset.
    """
    path = sam_checkpoint(preset, checkpoint)
    if path is None:
        warn(
            f"no checkpoint for SAM preset {preset!r}: using RANDOM weights. Masks are meaningless; "
            "this only exercises the plumbing. Pass --sam-checkpoint for real work."
        )
    return FrozenSam.from_preset(preset, checkpoint=path, device=resolve_device(device),
                                 cache_dir=str(cache_dir) if cache_dir is not None else None)


def load_clip(preset: str, pretrained: str | None, device: str) -> ClipSurgery | None:
    """CLIP-Surgery ``preset`` (``vit_b16`` | ``tiny``) with open_clip weights ``pretrained`` (tag or file), or
    None for ``preset="none"``.

    Raises:
      CheckpointError: the weights cannot be found or loaded.
    """
    if preset == "none":
        return None
    kwargs: dict[str, str] = {"device": resolve_device(device)}
    if pretrained:
        kwargs["pretrained"] = pretrained
    clip = ClipSurgery.from_preset(preset, **kwargs)
    if clip.pretrained is None:
        warn(f"CLIP preset {preset!r} has random weights: its similarity maps carry no text meaning.")
    return clip
