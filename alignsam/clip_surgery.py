"""CLIP-Surgery text-to-image similarity map (the SRM's semantic attention ``A_clip``).

AlignSAM's explicit SRM branch multiplies the SAM image embedding by a text-guided attention map taken from
CLIP Surgery (Li et al. 2023, "CLIP Surgery for Better Explainability with Enhancement in Open-Vocabulary
Tasks"). This module computes that map on the real ``open_clip`` classes:

1. **Architecture surgery.** The vision transformer runs as usual (the *original path*). From the first of the
   last ``vv_blocks`` residual blocks on, a second *v-v path* is carried along: every such block computes
   multi-head attention with query = key = value (``softmax(v v^T / sqrt(d_head)) v``), projects it with the
   block's own ``out_proj`` and adds it to the v-v path residually, without the block's MLP. The v-v attention
   reads the block's input from the original path (``ln_1`` of it), as in the reference implementation, so the
   original path stays exactly CLIP. The v-v path's patch tokens go through ``ln_post`` and ``proj`` and are
   normalised over the channel dimension (``dim=-1``).
2. **Feature surgery.** The similarity of each patch token to the label text minus the "redundant" feature,
   the feature of the empty text ``""``: ``sim = tokens @ (t - t_empty)``. This removes the component that
   every patch shares with every text.
3. The CLS token is dropped, the similarity is min-max normalised over the patch positions of each image,
   reshaped to the patch grid and bilinearly resized to the SAM embedding grid (64x64 by default) or to the
   image size.

The map is computed once per (image content, text) and kept in an LRU cache; text features are cached per
text. Everything runs under ``torch.inference_mode``.

Presets (``ClipSurgery.from_preset``): ``"vit_b16"`` is OpenAI's ViT-B/16 (the paper's model); ``"tiny"`` is
a small, seeded, randomly initialised ViT built from the same open_clip classes and loading code, for tests
and CPU demos. ``ClipSurgery(model_name="ViT-B-16", pretrained=None)`` builds the ViT-B/16 architecture
with random weights (no download), which is enough for timing.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

from alignsam.errors import AlignSamError, CheckpointError, ImageError
from alignsam.image import as_rgb_uint8, image_digest

__all__ = [
    "CLIP_PRESETS",
    "TINY_CLIP_CONFIG",
    "ClipImageError",
    "ClipPreset",
    "ClipSurgery",
    "ClipSurgeryError",
    "ClipWeightsError",
    "load_open_clip",
    "time_similarity_map",
]

MapLayout = Literal["sam", "stretch"]

_WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz", ".ckpt")


class ClipSurgeryError(AlignSamError):
    """Base class of the errors this module raises for things a user can fix (bad model name, bad setting)."""


class ClipWeightsError(ClipSurgeryError, CheckpointError):
    """CLIP weights are missing, unknown, or do not fit the requested architecture."""


class ClipImageError(ClipSurgeryError, ImageError, ValueError):
    """An image is not an ``HxWx3`` (or ``HxW`` / ``HxWx4``) ``uint8`` array."""


# A small ViT/text-transformer CLIP with the architecture of OpenAI's CLIP (QuickGELU, CLS pooling), passed
# to ``open_clip.create_model`` as config overrides: the real ``CLIP`` / ``VisionTransformer`` classes and the
# real checkpoint loading code are used. Same 224 px input and 16 px patches as ViT-B/16 (14x14 patch grid).
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "patch_size": 16, "width": 64, "layers": 4, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@dataclass(frozen=True)
class ClipPreset:
    """A named CLIP model: open_clip architecture name, default weights and surgery depth.

    ``model_cfg`` holds open_clip config overrides (``embed_dim``, ``vision_cfg``, ``text_cfg``, ...) applied
    on top of ``model_name``'s built-in config; ``None`` uses the built-in config unchanged.
    """

    model_name: str
    pretrained: str | None
    vv_blocks: int
    model_cfg: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    quick_gelu: bool | None = None


CLIP_PRESETS: dict[str, ClipPreset] = {
    # CLIP Surgery's default: OpenAI ViT-B/16, surgery on the last 6 of 12 blocks.
    # QuickGELU also when the OpenAI weights come from a local file (the tag sets it by itself).
    "vit_b16": ClipPreset("ViT-B-16", "openai", vv_blocks=6, quick_gelu=True),
    # Half of the blocks, as for ViT-B/16 (2 of 4).
    "tiny": ClipPreset("ViT-B-16", None, vv_blocks=2, model_cfg=TINY_CLIP_CONFIG),
}


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.startswith(("~", ".")) or value.lower().endswith(_WEIGHT_FILE_SUFFIXES)


def _hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def load_open_clip(
    model_name: str,
    pretrained: str | os.PathLike[str] | None,
    device: str | torch.device = "cpu",
    model_cfg: dict[str, Any] | None = None,
    seed: int = 0,
    quick_gelu: bool | None = None,
) -> nn.Module:
    """Build an open_clip CLIP model and load its weights.

    Arguments:
      model_name (str): an open_clip architecture name (``open_clip.list_models()``), e.g. ``"ViT-B-16"``.
      pretrained (str, PathLike or None): an open_clip pretrained tag (``"openai"``, ``"laion2b_s34b_b88k"``,
        ...), a local weights file (open_clip / OpenAI ``.pt``, ``.bin``, ``.safetensors``), or ``None`` for
        random weights drawn with ``seed`` (the global RNG state is left untouched).
      device (str or torch.device): where the model lives.
      model_cfg (dict or None): open_clip config overrides (see ``TINY_CLIP_CONFIG``).
      seed (int): seed of the random initialisation (only meaningful for weights not loaded from a file).
      quick_gelu (bool or None): use QuickGELU activations (what OpenAI-trained weights need); ``None``
        follows the pretrained tag (``True`` for ``"openai"``) or else the architecture's config.

    Returns:
      (nn.Module): the ``open_clip.CLIP`` model in eval mode with gradients disabled.

    Raises:
      ClipWeightsError: the tag is unknown for this architecture, the file does not exist, the tag's weights
        cannot be downloaded (e.g. offline), or the file does not hold weights for this architecture.
      ClipSurgeryError: the architecture name is unknown.
    """
    if model_name not in open_clip.list_models():
        raise ClipSurgeryError(
            f"Unknown open_clip model {model_name!r}. Use one of open_clip.list_models(), e.g. 'ViT-B-16'."
        )
    kwargs: dict[str, Any] = dict(model_cfg or {})
    weights: str | None = None
    what = ""
    if pretrained is not None and str(pretrained) != "":
        value = str(pretrained)
        path = os.path.expanduser(value)
        tag_cfg = open_clip.get_pretrained_cfg(model_name, value)
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if tag_cfg:
            weights = value
            what = f"pretrained tag {value!r} of {model_name}"
            if tag_cfg.get("quick_gelu", False):
                kwargs["quick_gelu"] = True  # OpenAI-trained weights expect QuickGELU activations
        elif os.path.isfile(path):
            weights = path
            what = f"weights file {path!r}"
        elif _looks_like_path(value):
            raise ClipWeightsError(
                f"CLIP weights file not found: {path!r}. Pass the path of an existing open_clip or OpenAI "
                f"checkpoint for {model_name}, a known pretrained tag ({', '.join(tags) or 'none'}), or "
                "pretrained=None for random weights."
            )
        else:
            raise ClipWeightsError(
                f"Unknown pretrained tag {value!r} for open_clip model {model_name!r} and no such file. "
                f"Known tags: {', '.join(tags) or 'none'}. Or pass a local weights file path."
            )
    if quick_gelu is not None:
        kwargs["quick_gelu"] = quick_gelu
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = open_clip.create_model(model_name, pretrained=weights, device=device, **kwargs)
        except Exception as exc:
            if weights is None:
                raise
            offline = " (HF_HUB_OFFLINE is set: no downloads)" if _hf_offline() else ""
            raise ClipWeightsError(
                f"Could not load CLIP {what}{offline}: {str(exc).rstrip('. ')}. Download the weights on a machine with internet "
                f"access (e.g. `python -c \"import open_clip; open_clip.create_model('{model_name}', "
                f"pretrained='{pretrained}')\"` fills the Hugging Face cache; copy HF_HOME over) or pass the path "
                "of a local weights file for this architecture."
            ) from exc
    model.eval().requires_grad_(False)
    return model


def _minmax(maps: Tensor) -> Tensor:
    """Min-max normalise each map over its positions.

    Arguments:
      maps (Tensor): B x ... similarity values.

    Returns:
      (Tensor): same shape, in [0, 1]; each map has min exactly 0 and max exactly 1, or is all zeros where
        the map is constant.
    """
    flat = maps.reshape(maps.shape[0], -1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    span = hi - lo
    scaled = (flat - lo) / span.clamp_min(torch.finfo(flat.dtype).tiny)
    out = torch.where(span > 0, scaled, torch.zeros_like(flat))
    return out.clamp_(0.0, 1.0).reshape(maps.shape)


def _resize_minmax(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly resize B x h x w maps to B x size[0] x size[1] and min-max normalise them again.

    Re-normalising keeps min 0 / max 1 exact after interpolation (bilinear samples rarely hit the extreme
    patch centre exactly); it is an increasing affine map per image, so it changes no ranking.
    """
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False, antialias=True)
        maps = maps[:, 0]
    return _minmax(maps)


def _sam_content_size(image_hw: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    """Cells of ``grid`` that the image covers in SAM's frame (long side scaled to the grid, top-left)."""
    h, w = image_hw
    scale = min(grid[0] / h, grid[1] / w)
    return min(grid[0], max(1, int(h * scale + 0.5))), min(grid[1], max(1, int(w * scale + 0.5)))


def _vv_and_plain_attention(
    attn: nn.MultiheadAttention, x: Tensor, with_vv: bool
) -> tuple[Tensor, Tensor | None]:
    """Run one block's attention on normalised tokens, optionally with the v-v attention beside it.

    Arguments:
      attn (nn.MultiheadAttention): the block's attention (its weights are used; the module is not called).
      x (Tensor): B x L x C tokens after the block's ``ln_1``.
      with_vv (bool): also compute the v-v attention.

    Returns:
      (Tensor): B x L x C, standard attention ``softmax(q k^T / sqrt(d)) v`` after ``out_proj``.
      (Tensor or None): B x L x C, v-v attention ``softmax(v v^T / sqrt(d)) v`` after ``out_proj``.
    """
    b, n, c = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # B x L x 3C
    # B x h x L x d each
    q, k, v = (t.reshape(b, n, heads, c // heads).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    plain = F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(d)
    plain = attn.out_proj(plain.transpose(1, 2).reshape(b, n, c))
    if not with_vv:
        return plain, None
    vv = F.scaled_dot_product_attention(v, v, v)
    return plain, attn.out_proj(vv.transpose(1, 2).reshape(b, n, c))


class ClipSurgery:
    """CLIP-Surgery similarity maps of images for a label text, on an open_clip ViT.

    Arguments:
      model_name (str): open_clip architecture (``open_clip.list_models()``).
      pretrained (str, PathLike or None): open_clip pretrained tag, local weights file, or ``None`` for
        random (seeded) weights. Missing or unknown weights raise ``ClipWeightsError``.
      device (str or torch.device): where the model runs.
      vv_blocks (int): number of last residual blocks that get the v-v path (clamped to the depth; 0 gives
        plain CLIP patch tokens).
      input_size (int, (int, int) or None): side(s) of the square-resized CLIP input; ``None`` uses the model's
        native size (224 for ViT-B/16: a 14x14 patch grid). Other sizes interpolate the positional embedding.
      prompt_ensemble (bool): encode each text with open_clip's 80 OpenAI ImageNet templates ("a photo of a
        {}.", ...) and average, as CLIP Surgery does (the empty text too); ``False`` encodes the raw text.
      model_cfg (dict or None): open_clip config overrides (used by the ``"tiny"`` preset).
      seed (int): seed of the random initialisation when weights are not loaded.
      quick_gelu (bool or None): QuickGELU activations; ``None`` follows the tag / config (see
        ``load_open_clip``). Pass ``True`` for OpenAI weights loaded from a local file.
      cache_size (int): number of (image, text) patch-grid maps kept in the LRU cache.
      batch_size (int): images per forward pass in ``similarity_maps``.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-16",
        pretrained: str | os.PathLike[str] | None = "openai",
        device: str | torch.device = "cpu",
        vv_blocks: int = 6,
        *,
        input_size: int | tuple[int, int] | None = None,
        prompt_ensemble: bool = True,
        model_cfg: dict[str, Any] | None = None,
        seed: int = 0,
        quick_gelu: bool | None = None,
        cache_size: int = 1024,
        batch_size: int = 16,
    ) -> None:
        if vv_blocks < 0:
            raise ClipSurgeryError(f"vv_blocks must be >= 0, got {vv_blocks}.")
        self.device = torch.device(device)
        self.model_name = model_name
        self.pretrained = None if pretrained is None else str(pretrained)
        self.model = load_open_clip(
            model_name, pretrained, self.device, model_cfg=model_cfg, seed=seed, quick_gelu=quick_gelu
        )
        visual = self.model.visual
        if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None:
            raise ClipSurgeryError(
                f"CLIP Surgery here needs an open_clip VisionTransformer without attentional pooling; "
                f"{model_name!r} has {type(visual).__name__}."
            )
        for block in visual.transformer.resblocks:
            attn = getattr(block, "attn", None)
            if (
                not isinstance(attn, nn.MultiheadAttention)
                or not attn._qkv_same_embed_dim
                or attn.bias_k is not None
                or attn.add_zero_attn
            ):
                raise ClipSurgeryError(
                    f"{model_name!r} uses custom attention blocks; only standard open_clip ResidualAttentionBlock "
                    "(nn.MultiheadAttention) ViTs are supported."
                )
        self.num_layers = len(visual.transformer.resblocks)
        self.vv_blocks = min(vv_blocks, self.num_layers)
        self.patch_size: tuple[int, int] = tuple(visual.patch_size)  # type: ignore[assignment]
        if input_size is None:
            input_size = tuple(visual.image_size)  # type: ignore[assignment]
        self.input_size: tuple[int, int] = (
            (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)  # type: ignore[assignment]
        )
        if any(s % p or s <= 0 for s, p in zip(self.input_size, self.patch_size, strict=True)):
            raise ClipSurgeryError(
                f"input_size {self.input_size} must be a positive multiple of {self.patch_size}."
            )
        self.grid_size = (self.input_size[0] // self.patch_size[0], self.input_size[1] // self.patch_size[1])
        pp = open_clip.get_model_preprocess_cfg(self.model)
        mean, std = pp.get("mean", open_clip.OPENAI_DATASET_MEAN), pp.get("std", open_clip.OPENAI_DATASET_STD)
        self._mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.tokenizer = open_clip.get_tokenizer(model_name, context_length=self.model.context_length)
        # Prompt ensemble: the label is put into open_clip's 80 OpenAI ImageNet templates and the normalised
        # features are averaged, like CLIP Surgery's demo; the redundant ("") feature gets the same treatment.
        self.prompt_ensemble = prompt_ensemble
        self._templates = tuple(open_clip.OPENAI_IMAGENET_TEMPLATES) if prompt_ensemble else ()
        self.cache_size = cache_size
        self.batch_size = batch_size
        self._text_cache: dict[str, Tensor] = {}
        self._map_cache: OrderedDict[tuple[str, str], Tensor] = OrderedDict()
        self._pos_cache: dict[tuple[int, int], Tensor] = {}
        self.cache_hits = 0
        self.cache_misses = 0

    @classmethod
    def from_preset(cls, name: str, **kwargs: Any) -> ClipSurgery:
        """Build a named preset (``CLIP_PRESETS``: ``"vit_b16"``, ``"tiny"``); keyword arguments override it.

        ``ClipSurgery.from_preset("tiny", pretrained="tiny.pt")`` loads tiny weights saved with
        ``torch.save(clip.model.state_dict(), "tiny.pt")`` through open_clip's checkpoint loader.
        """
        if name not in CLIP_PRESETS:
            raise ClipSurgeryError(f"Unknown CLIP preset {name!r}; known: {', '.join(CLIP_PRESETS)}.")
        preset = CLIP_PRESETS[name]
        args: dict[str, Any] = {
            "model_name": preset.model_name,
            "pretrained": preset.pretrained,
            "vv_blocks": preset.vv_blocks,
            "model_cfg": preset.model_cfg,
            "quick_gelu": preset.quick_gelu,
        }
        args.update(kwargs)
        return cls(**args)

    @property
    def embed_dim(self) -> int:
        """Dimension D of the joint image-text embedding."""
        return int(self.model.text_projection.shape[-1])

    # ------------------------------------------------------------------ text

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """Normalised text features, computed once per text.

        Arguments:
          texts (list[str]): n label texts (e.g. ``["shadow"]``); ``""`` is the redundant feature.

        Returns:
          (Tensor): n x D features on ``self.device``, unit norm over ``dim=-1``.
        """
        if isinstance(texts, str):
            texts = [texts]
        missing = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if missing:
            for text, feature in zip(missing, self._encode_texts(missing), strict=True):
                self._text_cache[text] = feature
        if not texts:
            return torch.empty(0, self.embed_dim, device=self.device)
        return torch.stack([self._text_cache[t] for t in texts])

    @torch.inference_mode()
    def _encode_texts(self, texts: list[str]) -> Tensor:
        if not self._templates:
            tokens = self.tokenizer(texts).to(self.device)
            return self.model.encode_text(tokens, normalize=True).float()
        prompts = [template(text) for text in texts for template in self._templates]
        tokens = self.tokenizer(prompts).to(self.device)
        feats = self.model.encode_text(tokens, normalize=True).float()
        feats = feats.reshape(len(texts), len(self._templates), -1).mean(dim=1)
        return F.normalize(feats, dim=-1)

    # ----------------------------------------------------------------- image

    def preprocess(self, images: Sequence[np.ndarray]) -> Tensor:
        """Resize (bicubic, whole image, no crop) and normalise images with the model's mean and std.

        The whole image is squashed to ``input_size`` rather than centre-cropped (open_clip's stock transform
        crops), so every part of the image gets a value in the map.

        Arguments:
          images (list[np.ndarray]): B images, each H_i x W_i x 3 uint8 RGB.

        Returns:
          (Tensor): B x 3 x input_size[0] x input_size[1] float32 pixels on ``self.device``.
        """
        batch = []
        for image in images:
            arr = as_rgb_uint8(image, ClipImageError)
            x = torch.from_numpy(arr).to(self.device).permute(2, 0, 1)[None].float() / 255.0
            x = F.interpolate(x, size=self.input_size, mode="bicubic", align_corners=False, antialias=True)
            batch.append(x.clamp_(0.0, 1.0))
        pixels = torch.cat(batch) if batch else torch.empty(0, 3, *self.input_size, device=self.device)
        return (pixels - self._mean) / self._std

    def _positional_embedding(self, grid: tuple[int, int]) -> Tensor:
        """(1 + gh*gw) x C positional embedding, bicubically interpolated when the grid is not native."""
        visual = self.model.visual
        pos = visual.positional_embedding
        native = tuple(visual.grid_size)
        if grid == native:
            return pos
        if grid not in self._pos_cache:
            width = pos.shape[-1]
            patch = pos[1:].reshape(1, native[0], native[1], width).permute(0, 3, 1, 2)
            patch = F.interpolate(patch.float(), size=grid, mode="bicubic", align_corners=False)
            patch = patch.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], width).to(pos.dtype)
            self._pos_cache[grid] = torch.cat([pos[:1], patch])
        return self._pos_cache[grid]

    @torch.inference_mode()
    def encode_image_tokens(self, pixels: Tensor, surgery: bool = True) -> Tensor:
        """Image tokens in the joint embedding space, with or without the v-v (surgery) path.

        Runs the open_clip ``VisionTransformer`` block by block (patch embedding, CLS token, positional
        embedding, ``ln_pre``; patch dropout is off at inference). With ``surgery``, the patch tokens come
        from the v-v path over the last ``vv_blocks`` blocks and the CLS token from the original path (as in
        CLIP Surgery); without it all tokens are plain CLIP tokens.

        Arguments:
          pixels (Tensor): B x 3 x H x W preprocessed images (see ``preprocess``), H and W multiples of the
            patch size.
          surgery (bool): use the v-v path for the patch tokens.

        Returns:
          (Tensor): B x (1 + gh*gw) x D tokens (CLS first, then patches row-major), unit norm over ``dim=-1``.
        """
        visual = self.model.visual
        x = visual.conv1(pixels.to(self.device, visual.conv1.weight.dtype))  # B x C x gh x gw
        b, c, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)  # B x N x C
        cls = visual.class_embedding.to(x.dtype).view(1, 1, c).expand(b, 1, c)
        x = torch.cat([cls, x], dim=1) + self._positional_embedding((gh, gw)).to(x.dtype)
        x = visual.ln_pre(x)

        blocks = visual.transformer.resblocks
        first_vv = len(blocks) - (self.vv_blocks if surgery else 0)
        x_vv: Tensor | None = None
        for i, block in enumerate(blocks):
            with_vv = i >= first_vv
            plain, vv = _vv_and_plain_attention(block.attn, block.ln_1(x), with_vv)
            if vv is not None:
                # v-v path: starts from the original path's tokens, gets the v-v attention residual, no MLP
                x_vv = (x if x_vv is None else x_vv) + block.ls_1(vv)
            x = x + block.ls_1(plain)
            x = x + block.ls_2(block.mlp(block.ln_2(x)))

        tokens = x if x_vv is None else torch.cat([x[:, :1], x_vv[:, 1:]], dim=1)
        tokens = visual.ln_post(tokens)
        if visual.proj is not None:
            tokens = tokens @ visual.proj
        return F.normalize(tokens.float(), dim=-1)

    @torch.inference_mode()
    def _compute_patch_maps(self, images: Sequence[np.ndarray], text: str) -> Tensor:
        """B x gh x gw min-max normalised feature-surgery similarity on the patch grid (no cache)."""
        text_feat, redundant = self.encode_text([text, ""])
        direction = text_feat - redundant  # feature surgery: remove what every text shares
        tokens = self.encode_image_tokens(self.preprocess(images))
        similarity = tokens[:, 1:] @ direction  # B x N, CLS dropped
        return _minmax(similarity.reshape(-1, *self.grid_size))

    # ------------------------------------------------------------------- maps

    def patch_maps(self, images: Sequence[np.ndarray], text: str) -> Tensor:
        """Cached patch-grid similarity maps of several images for one text.

        Arguments:
          images (list[np.ndarray]): B images, each H_i x W_i x 3 uint8 RGB.
          text (str): the label text.

        Returns:
          (Tensor): B x gh x gw maps in [0, 1] (min 0, max 1 per image unless constant, then all 0).
        """
        arrays = [as_rgb_uint8(image, ClipImageError) for image in images]
        keys = [(image_digest(a), text) for a in arrays]
        todo: dict[tuple[str, str], np.ndarray] = {}
        for key, arr in zip(keys, arrays, strict=True):
            if key in self._map_cache:
                self._map_cache.move_to_end(key)
                self.cache_hits += 1
            elif key not in todo:
                todo[key] = arr
        if todo:
            self.cache_misses += len(todo)
            todo_keys = list(todo)
            for start in range(0, len(todo_keys), self.batch_size):
                chunk = todo_keys[start : start + self.batch_size]
                maps = self._compute_patch_maps([todo[k] for k in chunk], text)
                for key, patch_map in zip(chunk, maps, strict=True):
                    self._map_cache[key] = patch_map
        out = torch.stack([self._map_cache[k] for k in keys]) if keys else torch.empty(0, *self.grid_size)
        while len(self._map_cache) > self.cache_size:
            self._map_cache.popitem(last=False)
        return out.to(self.device)

    def similarity_maps(
        self,
        images: Sequence[np.ndarray],
        text: str,
        grid: tuple[int, int] = (64, 64),
        layout: MapLayout = "sam",
    ) -> Tensor:
        """CLIP-Surgery maps of several images for one text, on the SAM embedding grid.

        Arguments:
          images (list[np.ndarray]): B images, each H_i x W_i x 3 uint8 RGB.
          text (str): the label text, e.g. ``"shadow"``.
          grid (tuple(int, int)): output size, the SAM image-embedding grid (64 x 64 for ViT-B/L/H).
          layout (str): ``"sam"`` places the map as SAM lays out the image in its embedding (long side
            scaled to the grid, top-left, zero padding bottom/right), so ``embedding * map`` lines up for
            non-square images; ``"stretch"`` stretches the map over the whole grid. Same for square images.

        Returns:
          (Tensor): B x grid[0] x grid[1] float32 maps in [0, 1] on ``self.device``: min 0 and max 1 over
            each image's content (constant maps are all 0), padding 0.
        """
        if layout not in ("sam", "stretch"):
            raise ClipSurgeryError(f"layout must be 'sam' or 'stretch', got {layout!r}.")
        grid = (int(grid[0]), int(grid[1]))
        patch = self.patch_maps(images, text)
        if layout == "stretch" or not len(images):
            return _resize_minmax(patch, grid)
        out = torch.zeros(len(images), *grid, device=patch.device)
        for i, image in enumerate(images):
            ch, cw = _sam_content_size(np.asarray(image).shape[:2], grid)
            out[i, :ch, :cw] = _resize_minmax(patch[i : i + 1], (ch, cw))[0]
        return out

    def similarity_map(
        self, image: np.ndarray, text: str, grid: tuple[int, int] = (64, 64), layout: MapLayout = "sam"
    ) -> Tensor:
        """CLIP-Surgery map of one image for a text on the SAM embedding grid (see ``similarity_maps``).

        Arguments:
          image (np.ndarray): H x W x 3 uint8 RGB image.
          text (str): the label text.
          grid (tuple(int, int)): output size (the SAM embedding grid).
          layout (str): ``"sam"`` or ``"stretch"``.

        Returns:
          (Tensor): grid[0] x grid[1] float32 map in [0, 1].
        """
        return self.similarity_maps([image], text, grid=grid, layout=layout)[0]

    def similarity_map_full(self, image: np.ndarray, text: str) -> Tensor:
        """CLIP-Surgery map of one image for a text at the image's resolution.

        Arguments:
          image (np.ndarray): H x W x 3 uint8 RGB image.
          text (str): the label text.

        Returns:
          (Tensor): H x W float32 map in [0, 1] (min 0, max 1 unless constant).
        """
        h, w = np.asarray(image).shape[:2]
        return _resize_minmax(self.patch_maps([image], text), (h, w))[0]

    def clear_cache(self) -> None:
        """Forget cached maps (text features stay: they do not depend on images)."""
        self._map_cache.clear()

    def __repr__(self) -> str:
        return (
            f"ClipSurgery(model_name={self.model_name!r}, pretrained={self.pretrained!r}, device='{self.device}', "
            f"vv_blocks={self.vv_blocks}/{self.num_layers}, input_size={self.input_size}, grid={self.grid_size})"
        )


def time_similarity_map(
    clip: ClipSurgery, image: np.ndarray | None = None, text: str = "object", repeats: int = 3
) -> float:
    """Median seconds to compute one uncached CLIP-Surgery map (text features warmed up first).

    For benchmarks: ``time_similarity_map(ClipSurgery("ViT-B-16", pretrained=None))`` times the ViT-B/16
    architecture with random weights, offline. Includes preprocessing, the surgery forward pass and the
    64 x 64 resize; excludes text encoding (cached per label in real use).

    Arguments:
      clip (ClipSurgery): the model to time.
      image (np.ndarray or None): H x W x 3 uint8 image; ``None`` uses a seeded random 480 x 640 image.
      text (str): the label text.
      repeats (int): timed runs (after one warm-up run).

    Returns:
      (float): median wall-clock seconds per map.
    """
    if image is None:
        image = np.random.default_rng(0).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    clip.encode_text([text, ""])
    times = []
    for _ in range(repeats + 1):
        clip.clear_cache()
        if clip.device.type == "cuda":
            torch.cuda.synchronize(clip.device)
        start = time.perf_counter()
        clip.similarity_map(image, text)
        if clip.device.type == "cuda":
            torch.cuda.synchronize(clip.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])
