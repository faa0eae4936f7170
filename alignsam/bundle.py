"""Policy bundles: one trained agent + SRM in one file, with a JSON sidecar of metadata.

``<name>.pt`` holds the weights and the metadata (read with ``torch.load(weights_only=True)``);
``<name>.json`` repeats the metadata for people and dashboards. Both are written atomically
(temp file, fsync, rename), so a reader never sees half a bundle and a crash leaves the old one.

A bundle records the SAM preset and checkpoint it was trained with: the agent and SRM read SAM's
embeddings, so a bundle is refused by any other SAM.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from alignsam.agent import PromptAgent
from alignsam.errors import BundleError
from alignsam.policy import TrainConfig, TrainedPolicy
from alignsam.sam import FrozenSam
from alignsam.srm import SRM

FORMAT = "alignsam-policy"
FORMAT_VERSION = 3
"""3: the agent's stem reads each cell with its 3x3 neighbourhood mean and its history, through a LayerNorm, with no
context block (alignsam.agent); 2: agent and SRM read projected states (alignsam.projection). Older ones are
refused with a request to retrain."""
MAX_REFINE_CLICKS = 32
"""The most SRM corrective clicks a bundle may ask for (each is one more decode per image; training picks 0-6)."""


@dataclass
class Bundle:
    agent: PromptAgent
    srm: SRM
    config: TrainConfig
    meta: dict[str, Any]

    @property
    def text(self) -> str:
        return str(self.meta["text"])

    @property
    def version(self) -> str:
        return str(self.meta["version"])

    @classmethod
    def of(cls, policy: TrainedPolicy, text: str, version: str) -> Bundle:
        """An unsaved bundle of ``policy`` (to validate or evaluate it), with the inference choices
        :func:`save_bundle` records."""
        return cls(policy.agent, policy.srm, policy.config, {"text": text, "version": version, **_choices(policy)})


def _choices(policy: TrainedPolicy) -> dict[str, Any]:
    """The inference-time choices training made, as :class:`alignsam.predict.AlignSAM` reads them from the meta."""
    return {"branch": policy.branch, "instances": bool(policy.instances),
            "instance_boxes": bool(policy.instances and policy.instance_boxes),
            "instance_filter": policy.instance_filter if policy.instances else None}


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def sidecar(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".json")


def save_bundle(
    policy: TrainedPolicy,
    path: str | os.PathLike,
    sam: FrozenSam,
    text: str,
    clip_model: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes ``policy`` to ``path`` (+ ``.json``) and returns the metadata."""
    created = datetime.now(UTC)
    weights = {"agent": policy.agent.state_dict(), "srm": policy.srm.state_dict()}
    digest = hashlib.sha256()
    for part in weights.values():
        for k, v in part.items():
            digest.update(k.encode())
            digest.update(v.detach().cpu().numpy().tobytes())
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "version": f"{created.strftime('%Y%m%d-%H%M%S')}-{digest.hexdigest()[:8]}",
        "created": created.isoformat(timespec="seconds"),
        "text": text,
        "sam_preset": sam.spec.name,
        "sam_model_id": sam.model_id,
        "embed_dim": sam.embed_dim,
        "clip_model": clip_model,
        **_choices(policy),
        "grid": list(policy.config.grid),
        "steps": policy.config.ppo.steps,
        "train_samples": len(policy.train_names),
        "train_names": list(policy.train_names),
        "val_metrics": {k: v for k, v in policy.val_metrics.items()},
        "config": json.loads(json.dumps(policy.config.to_dict())),
        **(extra or {}),
    }
    p = Path(path)
    payload = {"meta": meta, **weights}
    _atomic_write(p, lambda f: torch.save(payload, f))
    _atomic_write(sidecar(p), lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode()))
    return meta


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a bundle without loading its weights (from the JSON sidecar)."""
    try:
        return json.loads(sidecar(path).read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read bundle metadata {sidecar(path)}: {exc}") from exc


def load_bundle(path: str | os.PathLike, sam: FrozenSam | None = None, device: str | torch.device = "cpu") -> Bundle:
    """Loads a bundle with ``weights_only=True``; with ``sam``, refuses a bundle made for other SAM weights."""
    p = Path(path)
    if not p.is_file():
        raise BundleError(f"policy bundle not found: {p}")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BundleError(f"{p} is not a readable policy bundle ({type(exc).__name__}: {exc})") from exc
    meta = payload.get("meta") if isinstance(payload, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BundleError(f"{p} is not an AlignSAM policy bundle")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise BundleError(f"{p} has bundle format {meta['format_version']}; this version reads up to {FORMAT_VERSION}")
    if meta.get("format_version", 0) < FORMAT_VERSION:
        raise BundleError(
            f"{p} has bundle format {meta.get('format_version', 0)}, from an older AlignSAM whose prompt agent "
            f"had another architecture; retrain the policy (format {FORMAT_VERSION})"
        )
    if sam is not None:
        if meta["sam_preset"] != sam.spec.name:
            raise BundleError(
                f"{p} was trained with SAM preset {meta['sam_preset']!r}, but this SAM is {sam.spec.name!r}; "
                f"load it with the same SAM preset and checkpoint, or retrain."
            )
        if meta["sam_model_id"] != sam.model_id:
            raise BundleError(
                f"{p} was trained with SAM weights {meta['sam_model_id']!r}, but these are {sam.model_id!r} "
                f"(another checkpoint of {sam.spec.name!r}); the policy reads SAM embeddings, so retrain."
            )
    try:
        cfg = TrainConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{p} has a training configuration this version cannot read: {exc}") from exc
    clicks = cfg.refine_clicks
    if isinstance(clicks, bool) or not isinstance(clicks, int) or not 0 <= clicks <= MAX_REFINE_CLICKS:
        raise BundleError(f"{p} asks for {clicks!r} SRM corrective clicks; expected 0-{MAX_REFINE_CLICKS}")
    agent = PromptAgent(meta["embed_dim"], tuple(meta["grid"]), hidden=cfg.agent_hidden, use_history=cfg.use_history,
                        state_channels=cfg.agent_state_channels)
    srm = SRM.from_config(meta["embed_dim"], replace(cfg.srm, branch=meta["branch"]))
    try:
        agent.load_state_dict(payload["agent"])
        srm.load_state_dict(payload["srm"])
    except (KeyError, RuntimeError) as exc:
        raise BundleError(f"{p} has weights that do not fit its own metadata: {exc}") from exc
    return Bundle(agent.to(device).eval(), srm.to(device).eval(), cfg, meta)
