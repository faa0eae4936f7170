"""A frozen Segment Anything Model: named presets, checkpoint loading, an image-embedding cache,
and a mask decoder that runs many *different* images with their own prompt sets in one call.

AlignSAM never trains SAM. It encodes each image once (the expensive part) and then asks the
prompt encoder + mask decoder for a mask many times per episode, for many images at once.
SAM's stock ``SamPredictor`` holds one image and batches prompt sets on that image only, so this
module drives the ``segment_anything`` classes directly:

- :class:`SamSpec` / :data:`SAM_PRESETS` — ``vit_b``, ``vit_l``, ``vit_h`` exactly as
  ``segment_anything.build_sam`` builds them, plus small presets of the same family
  (``tiny`` for unit tests, ``small`` for CPU demos and the offline quality benchmark).
- :func:`build_sam` — the network for a preset, random-init or from a checkpoint loaded with
  ``torch.load(..., weights_only=True)``.
- :class:`FrozenSam` — the one object callers touch: ``embed`` / ``embed_many`` (cached),
  ``decode`` (batched over images), ``postprocess`` and ``to_embedding_frame`` helpers.

Coordinates: points are ``(x, y)`` in original-image pixels, like ``SamPredictor.predict``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from segment_anything.utils.transforms import ResizeLongestSide

from alignsam.errors import CheckpointError
from alignsam.image import as_rgb_uint8, image_digest

logger = logging.getLogger(__name__)

Size = tuple[int, int]


@dataclass(frozen=True)
class SamSpec:
    """Architecture of one SAM preset. The ViT presets match ``segment_anything.build_sam``."""

    name: str
    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16
    description: str = ""

    @property
    def embedding_size(self) -> int:
        """Side of the square image-embedding grid (64 for the ViT presets)."""
        return self.image_size // self.patch_size

    @property
    def low_res_size(self) -> int:
        """Side of the decoder's low-resolution mask logits (4x the embedding grid: 256)."""
        return 4 * self.embedding_size


SAM_PRESETS: dict[str, SamSpec] = {
    "vit_h": SamSpec("vit_h", 1280, 32, 16, (7, 15, 23, 31), description="SAM ViT-H (2.56 GB checkpoint)"),
    "vit_l": SamSpec("vit_l", 1024, 24, 16, (5, 11, 17, 23), description="SAM ViT-L (1.25 GB checkpoint)"),
    "vit_b": SamSpec("vit_b", 768, 12, 12, (2, 5, 8, 11), description="SAM ViT-B (375 MB checkpoint)"),
    # Same classes, scaled down. `small` is the CPU-sized model the offline benchmark trains;
    # `tiny` exists so unit tests run the real code paths in milliseconds.
    "small": SamSpec(
        "small", 128, 6, 4, (0, 1, 2, 3, 4, 5), image_size=384, patch_size=16, window_size=0,
        prompt_embed_dim=128, decoder_mlp_dim=512, decoder_num_heads=4, iou_head_hidden_dim=128,
        description="small SAM for CPU demos and the offline benchmark (384 px, 24x24 grid)",
    ),
    "tiny": SamSpec(
        "tiny", 32, 2, 2, (0, 1), image_size=128, patch_size=8, window_size=0,
        prompt_embed_dim=32, decoder_mlp_dim=64, decoder_num_heads=2, iou_head_hidden_dim=32,
        mask_in_chans=4, description="tiny SAM for unit tests (128 px, 16x16 grid)",
    ),
}


def get_spec(preset: str) -> SamSpec:
    """Returns the :class:`SamSpec` of a preset name, or raises a clear error listing them."""
    try:
        return SAM_PRESETS[preset]
    except KeyError:
        names = ", ".join(SAM_PRESETS)
        raise CheckpointError(f"unknown SAM preset {preset!r}; choose one of: {names}") from None


def build_sam(spec: SamSpec, checkpoint: str | os.PathLike | None = None, seed: int = 0) -> Sam:
    """Builds SAM for ``spec`` (as ``segment_anything.build_sam`` does) and loads ``checkpoint``.

    Without a checkpoint the weights are random, drawn from ``seed``: fine for timing and for
    exercising code paths, meaningless as masks.
    """
    emb = spec.embedding_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = Sam(
            image_encoder=ImageEncoderViT(
                depth=spec.encoder_depth,
                embed_dim=spec.encoder_embed_dim,
                img_size=spec.image_size,
                mlp_ratio=4,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                num_heads=spec.encoder_num_heads,
                patch_size=spec.patch_size,
                qkv_bias=True,
                use_rel_pos=True,
                global_attn_indexes=spec.encoder_global_attn_indexes,
                window_size=spec.window_size,
                out_chans=spec.prompt_embed_dim,
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=spec.prompt_embed_dim,
                image_embedding_size=(emb, emb),
                input_image_size=(spec.image_size, spec.image_size),
                mask_in_chans=spec.mask_in_chans,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(
                    depth=spec.decoder_depth,
                    embedding_dim=spec.prompt_embed_dim,
                    mlp_dim=spec.decoder_mlp_dim,
                    num_heads=spec.decoder_num_heads,
                ),
                transformer_dim=spec.prompt_embed_dim,
                iou_head_depth=3,
                iou_head_hidden_dim=spec.iou_head_hidden_dim,
            ),
            pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375],
        )
    if checkpoint is not None:
        sam.load_state_dict(load_checkpoint(checkpoint, spec))
    sam.eval()
    return sam


def load_checkpoint(path: str | os.PathLike, spec: SamSpec) -> dict[str, torch.Tensor]:
    """Reads a SAM state dict with ``weights_only=True`` and checks it fits ``spec``.

    Raises :class:`CheckpointError` naming the path when the file is missing, is not a torch
    checkpoint, is not a SAM state dict, or was made for another preset.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(
            f"SAM checkpoint not found: {p}. Download the official {spec.name} checkpoint "
            f"(or train one) and point SAM_CHECKPOINT / --sam-checkpoint at it."
        )
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a non-checkpoint file
        raise CheckpointError(f"{p} is not a readable torch checkpoint ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    key = "image_encoder.patch_embed.proj.weight"
    if not isinstance(state, dict) or key not in state:
        raise CheckpointError(f"{p} is not a SAM checkpoint (no {key!r} in its state dict)")
    found_dim = int(state[key].shape[0])
    if found_dim != spec.encoder_embed_dim:
        guess = [s.name for s in SAM_PRESETS.values() if s.encoder_embed_dim == found_dim]
        hint = f" It looks like {guess[0]!r}." if guess else ""
        raise CheckpointError(
            f"{p} was made for another SAM preset than {spec.name!r} "
            f"(encoder width {found_dim}, expected {spec.encoder_embed_dim}).{hint}"
        )
    model_keys = set(build_sam_keys(spec))
    missing = sorted(model_keys - set(state))
    if missing:
        raise CheckpointError(f"{p} does not fit SAM preset {spec.name!r}: missing {missing[:3]}...")
    return state


def build_sam_keys(spec: SamSpec) -> list[str]:
    """State-dict keys of a preset, without allocating its weights."""
    with torch.device("meta"):
        return list(build_sam(spec).state_dict().keys())


def save_checkpoint(sam: Sam, path: str | os.PathLike) -> str:
    """Saves SAM's state dict in the official checkpoint format, atomically; returns its sha256."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(sam.state_dict(), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    return file_sha256(p)


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, memoised per (path, size, mtime) so big checkpoints are hashed once."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def predict_masks_batched(
    decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    transformer: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``MaskDecoder.predict_masks`` with one image embedding *per prompt set*.

    The stock decoder repeats one image embedding for every prompt set; here row i of the batch
    pairs embedding i with prompt set i. Same weights and the same operations (differentiable, so
    the offline benchmark's SAM trainer uses it too).

    Arguments:
      image_embeddings: ``[B, C, h, w]``; image_pe: ``[1, C, h, w]`` (``get_dense_pe()``);
      sparse: ``[B, N, C]`` and dense: ``[B, C, h, w]`` prompt embeddings.
      transformer: in place of ``decoder.transformer(src, pos_src, tokens) -> (hs, src)`` (the small-SAM trainer
        passes one that masks padding tokens out of the attention); None: the decoder's own.
    Returns:
      mask logits ``[B, 4, 4h, 4w]`` (index 0: single-mask output, 1-3: multimask) and IoU
      predictions ``[B, 4]``.
    """
    b = sparse.shape[0]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(b, -1, -1), sparse), dim=1)
    src = image_embeddings + dense
    pos_src = image_pe.expand(b, -1, -1, -1)
    _, c, h, w = src.shape
    hs, src = (transformer or decoder.transformer)(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : 1 + decoder.num_mask_tokens, :]
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper_in = torch.stack(
        [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1
    )
    _, c2, h2, w2 = upscaled.shape
    masks = (hyper_in @ upscaled.reshape(b, c2, h2 * w2)).reshape(b, -1, h2, w2)
    return masks, decoder.iou_prediction_head(iou_token_out)


@dataclass
class ImageEmbedding:
    """SAM's encoding of one image.

    Attributes:
      features: ``[C, h, w]`` image embedding (C = prompt_embed_dim, h = w = embedding grid).
      original_size: ``(H, W)`` of the image as given.
      input_size: ``(H', W')`` after resizing the long side to SAM's input size, before padding.
      key: content hash of the image.
    """

    features: torch.Tensor
    original_size: Size
    input_size: Size
    key: str


@dataclass
class DecodeOutput:
    """Result of :meth:`FrozenSam.decode` for a batch of B prompt sets on B images.

    Attributes:
      low_res_logits: ``[B, K, 4h, 4w]`` mask logits in SAM's padded input frame (K = 1, or 3
        with ``multimask``); feed back as ``mask_input`` or downsample as the next state.
      iou_predictions: ``[B, K]`` SAM's own quality estimate.
      probs: full-resolution probabilities of the best mask, ``[B, H, W]`` when all images share
        one size (or ``out_size`` was given), else a list of ``[H_i, W_i]``; None if not asked.
    """

    low_res_logits: torch.Tensor
    iou_predictions: torch.Tensor
    probs: torch.Tensor | list[torch.Tensor] | None = None


@dataclass
class _Stats:
    encoder_calls: int = 0  # images run through the image encoder
    memory_hits: int = 0
    disk_hits: int = 0


class FrozenSam:
    """SAM with frozen weights, an embedding cache, and batched multi-image decoding.

    Arguments:
      sam: a ``segment_anything`` ``Sam`` model.
      spec: its preset.
      model_id: identifies these weights in the disk cache (preset + checkpoint hash).
      device: where to run.
      cache_size: embeddings kept in memory (LRU).
      cache_dir: optional folder for an on-disk fp16 embedding cache shared across processes.
    """

    def __init__(
        self,
        sam: Sam,
        spec: SamSpec,
        model_id: str,
        device: str | torch.device = "cpu",
        cache_size: int = 64,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        self.spec = spec
        self.model_id = model_id
        self.device = torch.device(device)
        self.model = sam.to(self.device).eval()
        self.model.requires_grad_(False)
        self.transform = ResizeLongestSide(spec.image_size)
        self.cache_size = cache_size
        self.cache_dir = Path(cache_dir) / model_id if cache_dir else None
        self._cache: OrderedDict[str, ImageEmbedding] = OrderedDict()
        self._cache_lock = threading.Lock()  # a worker answers clicks from a second thread (workers.interactive)
        self.stats = _Stats()
        self._dense_pe = self.model.prompt_encoder.get_dense_pe()  # [1, C, h, w], constant

    @classmethod
    def from_preset(
        cls,
        preset: str,
        checkpoint: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
        **kwargs,
    ) -> FrozenSam:
        """Loads a preset from a checkpoint, or random-init (seeded) when ``checkpoint`` is None."""
        spec = get_spec(preset)
        sam = build_sam(spec, checkpoint, seed=seed)
        weights = file_sha256(checkpoint)[:16] if checkpoint is not None else f"random{seed}"
        return cls(sam, spec, f"{spec.name}-{weights}", device=device, **kwargs)

    # ------------------------------------------------------------------ geometry
    @property
    def embed_dim(self) -> int:
        return self.spec.prompt_embed_dim

    @property
    def embedding_size(self) -> int:
        return self.spec.embedding_size

    def input_size(self, original_size: Size) -> Size:
        """``(H', W')`` of an image of ``original_size`` once its long side is resized."""
        return ResizeLongestSide.get_preprocess_shape(original_size[0], original_size[1], self.spec.image_size)

    def to_embedding_frame(self, maps: torch.Tensor, original_size: Size, size: int | None = None) -> torch.Tensor:
        """Moves image-aligned maps into SAM's padded input frame at ``size`` (default: embedding grid).

        Arguments:
          maps: ``[..., H, W]`` (a mask, probability or similarity map over the whole image).
        Returns:
          ``[..., size, size]`` aligned with the image embedding (padding region = 0), area-averaged.
        """
        size = size or self.embedding_size
        lead = maps.shape[:-2]
        x = maps.reshape(-1, 1, *maps.shape[-2:]).float()
        in_h, in_w = self.input_size(original_size)
        s = self.spec.image_size
        # Resize to SAM's input frame first (as the image is), pad, then area-pool to the grid.
        x = F.interpolate(x, (in_h, in_w), mode="bilinear", align_corners=False)
        x = F.pad(x, (0, s - in_w, 0, s - in_h))
        x = F.adaptive_avg_pool2d(x, size)
        return x.reshape(*lead, size, size)

    # ------------------------------------------------------------------ encoding
    def _preprocess(self, image: np.ndarray) -> torch.Tensor:
        resized = self.transform.apply_image(image)
        x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).float()
        return self.model.preprocess(x)  # normalise + pad to [3, S, S]

    def _disk_path(self, key: str) -> Path | None:
        return self.cache_dir / f"{key[:2]}/{key}.pt" if self.cache_dir else None

    def _remember(self, emb: ImageEmbedding) -> None:
        with self._cache_lock:
            self._cache[emb.key] = emb
            self._cache.move_to_end(emb.key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _lookup(self, key: str) -> ImageEmbedding | None:
        with self._cache_lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.stats.memory_hits += 1
                return hit
        path = self._disk_path(key)
        if path is not None and path.is_file():
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
                emb = ImageEmbedding(
                    features=blob["features"].to(self.device, torch.float32),
                    original_size=tuple(blob["original_size"]),
                    input_size=tuple(blob["input_size"]),
                    key=key,
                )
            except Exception as exc:  # a torn or stale file is a cache miss, never an error
                logger.warning("ignoring unreadable cached embedding %s: %s", path, exc)
                return None
            self.stats.disk_hits += 1
            self._remember(emb)
            return emb
        return None

    def _store_disk(self, emb: ImageEmbedding) -> None:
        path = self._disk_path(emb.key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        blob = {
            "features": emb.features.to("cpu", torch.float16),
            "original_size": list(emb.original_size),
            "input_size": list(emb.input_size),
        }
        torch.save(blob, tmp)
        os.replace(tmp, path)

    @torch.no_grad()
    def embed_many(self, images: Sequence[np.ndarray], batch_size: int = 4) -> list[ImageEmbedding]:
        """Encodes images (each at most once, ever, thanks to the caches) in batches.

        ``torch.no_grad`` rather than ``inference_mode``: embeddings feed trainable heads later,
        and inference tensors cannot be saved for their backward pass.
        """
        rgb = [as_rgb_uint8(im) for im in images]
        keys = [image_digest(im) for im in rgb]
        out: dict[str, ImageEmbedding] = {}
        pending: dict[str, int] = {}  # key -> index of the first image with that content
        for i, key in enumerate(keys):
            if key in out or key in pending:
                continue
            hit = self._lookup(key)
            if hit is not None:
                out[key] = hit
            else:
                pending[key] = i
        todo = list(pending.values())
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            x = torch.stack([self._preprocess(rgb[i]) for i in chunk])
            feats = self.model.image_encoder(x)
            self.stats.encoder_calls += len(chunk)
            for i, f in zip(chunk, feats, strict=True):
                size = (rgb[i].shape[0], rgb[i].shape[1])
                emb = ImageEmbedding(f.clone(), size, self.input_size(size), keys[i])
                self._remember(emb)
                self._store_disk(emb)
                out[keys[i]] = emb
        return [out[k] for k in keys]

    def embed(self, image: np.ndarray) -> ImageEmbedding:
        """Encodes one ``HxWx3`` uint8 image (cached)."""
        return self.embed_many([image])[0]

    # ------------------------------------------------------------------ decoding
    def transform_points(self, points: torch.Tensor, original_sizes: Sequence[Size]) -> torch.Tensor:
        """Maps ``[B, N, 2]`` (x, y) image-pixel points into SAM's input frame, per image."""
        scale = torch.tensor(
            [[self.input_size(s)[1] / s[1], self.input_size(s)[0] / s[0]] for s in original_sizes],
            device=points.device,
            dtype=torch.float32,
        )
        return points.float() * scale[:, None, :]

    def points_to_grid(self, points: torch.Tensor, original_sizes: Sequence[Size], grid: int) -> torch.Tensor:
        """``[B, N, 2]`` (x, y) image pixels -> ``[B, N, 2]`` (row, col) cells of a ``grid`` x ``grid``
        map laid over SAM's padded input frame (the frame of :meth:`to_embedding_frame`)."""
        xy = self.transform_points(points, original_sizes) * (grid / self.spec.image_size)
        rc = xy.flip(-1).long()
        return rc.clamp_(0, grid - 1)

    def grid_to_points(self, cells: torch.Tensor, original_sizes: Sequence[Size], grid: int) -> torch.Tensor:
        """Inverse of :meth:`points_to_grid`: ``[B, N, 2]`` (row, col) -> cell centres (x, y) in pixels,
        clamped inside each image."""
        xy = (cells.flip(-1).float() + 0.5) * (self.spec.image_size / grid)
        scale = torch.tensor(
            [[self.input_size(s)[1] / s[1], self.input_size(s)[0] / s[0]] for s in original_sizes],
            device=cells.device,
        )
        limit = torch.tensor([[s[1] - 1, s[0] - 1] for s in original_sizes], device=cells.device, dtype=torch.float32)
        return torch.minimum(xy / scale[:, None, :], limit[:, None, :]).clamp_(min=0)

    @torch.no_grad()
    def decode(
        self,
        embeddings: torch.Tensor | Sequence[ImageEmbedding],
        points: torch.Tensor,
        labels: torch.Tensor,
        original_sizes: Sequence[Size] | Size,
        mask_input: torch.Tensor | None = None,
        multimask: bool = False,
        return_probs: bool = True,
        out_size: Size | None = None,
        boxes: torch.Tensor | None = None,
    ) -> DecodeOutput:
        """Prompt encoder + mask decoder for B different images, each with its own prompt set.

        Arguments:
          embeddings: ``[B, C, h, w]`` image embeddings, or B :class:`ImageEmbedding`.
          points: ``[B, N, 2]`` (x, y) in original-image pixels.
          labels: ``[B, N]``: 1 positive, 0 negative, -1 padding (no point).
          original_sizes: ``(H, W)`` per image, or one size shared by all.
          mask_input: optional ``[B, 1, 4h, 4w]`` previous low-res logits.
          multimask: return SAM's 3 ambiguity masks instead of 1 (probs use the best-scored one).
          return_probs: also compute full-resolution probabilities.
          out_size: resize every probability map to this ``(H, W)`` instead of its image's size.
          boxes: optional ``[B, 4]`` (x0, y0, x1, y1) boxes in original-image pixels, one per prompt set (SAM's
            box prompt); ``points`` may then have ``N = 0``.
        """
        if not isinstance(embeddings, torch.Tensor):
            embs = list(embeddings)
            original_sizes = [e.original_size for e in embs]
            embeddings = torch.stack([e.features for e in embs])
        b = embeddings.shape[0]
        if isinstance(original_sizes, tuple) and len(original_sizes) == 2 and isinstance(original_sizes[0], int):
            original_sizes = [original_sizes] * b
        sizes = [tuple(int(v) for v in s) for s in original_sizes]
        if points.shape[0] != b or labels.shape[0] != b or len(sizes) != b:
            raise ValueError(f"batch mismatch: {b} embeddings, {points.shape[0]} point sets, {len(sizes)} sizes")
        dev = self.device
        if boxes is not None and boxes.shape != (b, 4):
            raise ValueError(f"boxes must be [{b}, 4] (x0, y0, x1, y1), got {list(boxes.shape)}")
        coords = self.transform_points(points.to(dev), sizes)
        box_coords = None
        if boxes is not None:
            box_coords = self.transform_points(boxes.to(dev).float().reshape(b, 2, 2), sizes).reshape(b, 4)
        sparse, dense = self.model.prompt_encoder(
            points=(coords, labels.to(dev)) if points.shape[1] > 0 else None,
            boxes=box_coords,
            masks=mask_input.to(dev) if mask_input is not None else None,
        )
        logits, iou = predict_masks_batched(self.model.mask_decoder, embeddings.to(dev), self._dense_pe, sparse, dense)
        if multimask:
            logits, iou = logits[:, 1:], iou[:, 1:]
        else:
            logits, iou = logits[:, :1], iou[:, :1]
        out = DecodeOutput(low_res_logits=logits, iou_predictions=iou)
        if return_probs:
            best = iou.argmax(dim=1)
            chosen = logits[torch.arange(b, device=dev), best][:, None]
            out.probs = self.postprocess(chosen, sizes, out_size)
        return out

    def postprocess(
        self, low_res: torch.Tensor, original_sizes: Sequence[Size], out_size: Size | None = None
    ) -> torch.Tensor | list[torch.Tensor]:
        """Low-res logits ``[B, 1, 4h, 4w]`` -> probabilities at each image's size (as SAM does)."""
        s = self.spec.image_size
        up = F.interpolate(low_res.float(), (s, s), mode="bilinear", align_corners=False)
        results = []
        groups: dict[Size, list[int]] = {}
        for i, size in enumerate(original_sizes):
            groups.setdefault(size, []).append(i)
        for size, idx in groups.items():
            in_h, in_w = self.input_size(size)
            part = up[idx, :, :in_h, :in_w]
            part = F.interpolate(part, out_size or size, mode="bilinear", align_corners=False)
            results.append((idx, torch.sigmoid(part[:, 0])))
        if len(groups) == 1 or out_size is not None:
            full = torch.empty(len(original_sizes), *results[0][1].shape[-2:], device=low_res.device)
            for idx, probs in results:
                full[idx] = probs
            return full
        ordered: list[torch.Tensor] = [torch.empty(0)] * len(original_sizes)
        for idx, probs in results:
            for j, i in enumerate(idx):
                ordered[i] = probs[j]
        return ordered

    def low_res_to_grid(self, low_res: torch.Tensor) -> torch.Tensor:
        """``[B, 1, 4h, 4w]`` logits -> ``[B, 1, h, w]`` probabilities on the embedding grid."""
        return F.avg_pool2d(torch.sigmoid(low_res.float()), kernel_size=4)


@dataclass
class PresetInfo:
    name: str
    description: str
    image_size: int
    embedding: str
    parameters: int = field(default=0)


def list_presets() -> list[PresetInfo]:
    """Presets with their sizes (parameter counts computed on the meta device, no memory used)."""
    infos = []
    for spec in SAM_PRESETS.values():
        with torch.device("meta"):
            n = sum(p.numel() for p in build_sam(spec).parameters())
        emb = f"{spec.prompt_embed_dim}x{spec.embedding_size}x{spec.embedding_size}"
        infos.append(PresetInfo(spec.name, spec.description, spec.image_size, emb, n))
    return infos
