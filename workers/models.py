"""The models a worker process keeps warm: SAM, CLIP-Surgery and loaded policy bundles.

Loaded once per process (:func:`models`), from the one settings object: ``SAM_PRESET`` / ``SAM_CHECKPOINT``,
``CLIP_PRESET`` / ``CLIP_PRETRAINED``, ``DEVICE`` (``auto`` -> cuda when available). Loading goes through
``alignsam.loading``, the same code the ``alignsam`` command uses (bundled small SAM
checkpoint for ``small``; loud warnings for random weights). SAM's image embeddings are cached on disk under
``MODEL_DIR/embeddings`` so every image is encoded once per SAM model, across jobs and processes.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignsam.bundle import read_meta
from alignsam.clip_surgery import ClipSurgery
from alignsam.loading import load_clip, load_sam, resolve_device, warn_if_plumbing_only
from alignsam.predict import AlignSAM
from alignsam.sam import FrozenSam
from alignsam.zeroshot import ZeroShot
from ml_backend.files import label_slug, private_dir
from ml_backend.settings import Settings, get_settings

logger = logging.getLogger(__name__)


def bundle_path(settings: Settings, project_id: int, label: str, version: str) -> Path:
    """Where the policy ``version`` of ``label`` in ``project_id`` lives (MODEL_DIR may be a shared volume)."""
    return settings.policy_dir / str(project_id) / label_slug(label) / f"{version}.pt"


@dataclass
class Models:
    """SAM + CLIP for one process, and an LRU of loaded policies."""

    settings: Settings
    sam: FrozenSam
    clip: ClipSurgery | None
    device: str
    policies: OrderedDict[str, AlignSAM] = field(default_factory=OrderedDict)
    max_policies: int = 16
    lock: threading.Lock = field(default_factory=threading.Lock)

    def policy(self, project_id: int, label: str, version: str) -> AlignSAM:
        """The loaded policy ``version`` of a label (bundles are immutable, so cached by path)."""
        path = bundle_path(self.settings, project_id, label, version)
        key = str(path)
        with self.lock:
            if key in self.policies:
                self.policies.move_to_end(key)
                return self.policies[key]
        model = AlignSAM.from_bundle(path, self.sam, clip=self.clip)
        with self.lock:
            self.policies[key] = model
            while len(self.policies) > self.max_policies:
                self.policies.popitem(last=False)
        return model

    @functools.cached_property
    def zero_shot(self) -> ZeroShot:
        """Zero-shot prediction on these models (CLIP-Surgery points -> SAM); raises AlignSamError without CLIP."""
        return ZeroShot(self.sam, self.clip)

    @property
    def clip_name(self) -> str | None:
        return None if self.clip is None else f"{self.clip.model_name}:{self.clip.pretrained or 'random'}"


_models: Models | None = None
_models_lock = threading.Lock()


def load_models(settings: Settings | None = None) -> Models:
    """Load SAM and CLIP as configured (slow; call once per process)."""
    settings = settings or get_settings()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    device = resolve_device(settings.device)
    warn_if_plumbing_only(settings.sam_preset, settings.sam_checkpoint)
    private_dir(settings.embedding_cache_dir)
    sam = load_sam(
        settings.sam_preset,
        str(settings.sam_checkpoint) if settings.sam_checkpoint else None,
        device,
        cache_dir=str(settings.embedding_cache_dir),
    )
    clip = load_clip(settings.clip_preset, settings.clip_pretrained, device)
    logger.info("models loaded: SAM %s (%s), CLIP %s, device %s", settings.sam_preset, sam.model_id,
                settings.clip_preset, device)
    return Models(settings=settings, sam=sam, clip=clip, device=device)


def models() -> Models:
    """This process's warm models, loaded on first use."""
    global _models
    with _models_lock:
        if _models is None:
            _models = load_models()
        return _models


def set_models(loaded: Models | None) -> None:
    """Install (or forget) this process's models: the worker preloads them before taking jobs."""
    global _models
    with _models_lock:
        _models = loaded


def bundle_miou(settings: Settings, project_id: int, label: str, version: str) -> float | None:
    """Validation mIoU recorded in an active bundle's metadata (None when it cannot be read)."""
    try:
        meta = read_meta(bundle_path(settings, project_id, label, version))
        return float(meta["val_metrics"]["miou"])
    except Exception:
        return None
