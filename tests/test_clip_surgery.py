"""CLIP-Surgery similarity map on the real open_clip classes (tiny, seeded, random-init preset)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never try the network (set before open_clip is imported)

import copy

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from alignsam.clip_surgery import (
    CLIP_PRESETS,
    TINY_CLIP_CONFIG,
    ClipImageError,
    ClipSurgery,
    ClipSurgeryError,
    ClipWeightsError,
    time_similarity_map,
)
from alignsam.errors import AlignSamError, CheckpointError


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models gain nothing from intra-op threads; on a loaded 2-core CI box they cost ~3x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def clip() -> ClipSurgery:
    return ClipSurgery.from_preset("tiny")


def _image(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[h // 4 : h // 2, w // 3 : w // 2] = (250, 30, 30)  # some structure, not only noise
    return img


class _CountCalls:
    """Wraps a bound method and counts its calls."""

    def __init__(self, method):
        self.method = method
        self.calls: list[int] = []

    def __call__(self, items, *args, **kwargs):
        self.calls.append(len(items))
        return self.method(items, *args, **kwargs)


def test_tiny_preset_is_the_real_open_clip_vit(clip: ClipSurgery):
    assert isinstance(clip.model, open_clip.CLIP)
    assert isinstance(clip.model.visual, open_clip.transformer.VisionTransformer)
    assert clip.model.visual.transformer.resblocks[0].attn.num_heads == 2
    assert clip.num_layers == 4 and clip.vv_blocks == 2
    assert clip.grid_size == (14, 14)
    assert clip.embed_dim == TINY_CLIP_CONFIG["embed_dim"]
    assert not any(p.requires_grad for p in clip.model.parameters())
    assert isinstance(clip.model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)


def test_quick_gelu_follows_preset_or_argument():
    assert CLIP_PRESETS["vit_b16"].quick_gelu  # OpenAI weights need QuickGELU, also from a local file
    act = ClipSurgery.from_preset("tiny", quick_gelu=False).model.visual.transformer.resblocks[0].mlp.gelu
    assert isinstance(act, torch.nn.GELU)


def test_vv_blocks_clamped_to_depth():
    assert ClipSurgery.from_preset("tiny", vv_blocks=6).vv_blocks == 4


def test_grid_and_full_map_shapes(clip: ClipSurgery):
    img = _image(96, 128)
    assert clip.similarity_map(img, "shadow").shape == (64, 64)
    assert clip.similarity_map(img, "shadow", grid=(32, 48), layout="stretch").shape == (32, 48)
    assert clip.similarity_map_full(img, "shadow").shape == (96, 128)
    assert clip.patch_maps([img, img], "shadow").shape == (2, 14, 14)
    assert clip.similarity_maps([img, _image(50, 40)], "shadow", grid=(16, 16)).shape == (2, 16, 16)


@pytest.mark.parametrize("layout", ["sam", "stretch"])
def test_maps_span_exactly_zero_to_one(clip: ClipSurgery, layout: str):
    img = _image(80, 120)
    for m in (
        clip.similarity_map(img, "glass", layout=layout),
        clip.similarity_map_full(img, "glass"),
        clip.patch_maps([img], "glass")[0],
    ):
        assert m.dtype == torch.float32
        assert m.min().item() == 0.0
        assert m.max().item() == 1.0


def test_sam_layout_places_map_like_sam_pads_the_image(clip: ClipSurgery):
    # 100 x 150: SAM scales the long side to the grid: 64 / 150 -> content 43 x 64 cells, zero below.
    img = _image(100, 150)
    m = clip.similarity_map(img, "shadow", layout="sam")
    assert torch.all(m[43:] == 0)
    content = m[:43]
    assert content.min().item() == 0.0 and content.max().item() == 1.0
    # A square image fills the grid: both layouts agree.
    sq = _image(90, 90)
    assert torch.equal(clip.similarity_map(sq, "shadow"), clip.similarity_map(sq, "shadow", layout="stretch"))


def test_same_input_twice_gives_identical_maps(clip: ClipSurgery):
    img = _image()
    first = clip.similarity_map(img, "shadow")
    clip.clear_cache()
    second = clip.similarity_map(img, "shadow")
    assert torch.equal(first, second)


def test_fresh_instances_with_same_seed_are_identical(clip: ClipSurgery):
    img = _image()
    a = clip.similarity_map(img, "shadow")
    b = ClipSurgery.from_preset("tiny").similarity_map(img, "shadow")
    c = ClipSurgery.from_preset("tiny", seed=1).similarity_map(img, "shadow")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_random_init_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ClipSurgery.from_preset("tiny")
    assert torch.equal(torch.rand(3), expected)


def test_map_computed_once_per_image_and_text():
    clip = ClipSurgery.from_preset("tiny")
    counter = _CountCalls(clip._compute_patch_maps)
    clip._compute_patch_maps = counter  # type: ignore[method-assign]
    img = _image()
    clip.similarity_map(img, "shadow")
    clip.similarity_map(img, "shadow")
    clip.similarity_map(img.copy(), "shadow", grid=(32, 32))  # same content, other array object
    clip.similarity_map_full(img, "shadow")
    assert counter.calls == [1]
    clip.similarity_map(img, "glass")  # new text
    assert counter.calls == [1, 1]
    other = _image(seed=5)
    clip.similarity_maps([img, other, img, other], "shadow")  # only the new image, once, in one batch
    assert counter.calls == [1, 1, 1]
    assert clip.cache_misses == 3 and clip.cache_hits >= 5


def test_lru_cache_evicts_least_recently_used():
    clip = ClipSurgery.from_preset("tiny", cache_size=2)
    counter = _CountCalls(clip._compute_patch_maps)
    clip._compute_patch_maps = counter  # type: ignore[method-assign]
    a, b, c = _image(seed=1), _image(seed=2), _image(seed=3)
    clip.similarity_map(a, "x")
    clip.similarity_map(b, "x")
    clip.similarity_map(a, "x")  # a is now most recent
    clip.similarity_map(c, "x")  # evicts b
    assert len(counter.calls) == 3
    clip.similarity_map(a, "x")
    assert len(counter.calls) == 3
    clip.similarity_map(b, "x")
    assert len(counter.calls) == 4


def test_text_features_encoded_once_per_text():
    clip = ClipSurgery.from_preset("tiny")
    counter = _CountCalls(clip._encode_texts)
    clip._encode_texts = counter  # type: ignore[method-assign]
    feats = clip.encode_text(["shadow", "glass", "shadow"])
    assert feats.shape == (3, clip.embed_dim)
    assert torch.equal(feats[0], feats[2])
    clip.encode_text(["glass"])
    clip.similarity_map(_image(), "shadow")  # needs "shadow" and the redundant ""
    assert counter.calls == [2, 1]


def test_batched_maps_equal_one_by_one(clip: ClipSurgery):
    images = [_image(96, 128, seed=s) for s in range(3)] + [_image(60, 40, seed=9)]
    clip.clear_cache()
    batched = clip.similarity_maps(images, "shadow")
    for img, m in zip(images, batched, strict=True):
        clip.clear_cache()
        torch.testing.assert_close(clip.similarity_map(img, "shadow"), m, atol=1e-5, rtol=0)


def test_different_texts_give_different_maps(clip: ClipSurgery):
    img = _image()
    assert not torch.allclose(
        clip.similarity_map(img, "shadow"), clip.similarity_map(img, "glass"), atol=1e-3
    )


def test_features_are_unit_norm_over_channels(clip: ClipSurgery):
    text = clip.encode_text(["shadow", ""])
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    tokens = clip.encode_image_tokens(clip.preprocess([_image(), _image(seed=4)]))
    assert tokens.shape == (2, 1 + 14 * 14, clip.embed_dim)
    torch.testing.assert_close(tokens.norm(dim=-1), torch.ones(2, 1 + 14 * 14))


def test_plain_path_is_exactly_open_clip(clip: ClipSurgery):
    # The block-by-block forward without surgery reproduces open_clip's own image encoder.
    pixels = clip.preprocess([_image(), _image(seed=7)])
    plain = clip.encode_image_tokens(pixels, surgery=False)
    with torch.inference_mode():
        reference = clip.model.encode_image(pixels, normalize=True)
    torch.testing.assert_close(plain[:, 0], reference, atol=1e-5, rtol=1e-5)


def test_vv_path_differs_from_plain_clip(clip: ClipSurgery):
    pixels = clip.preprocess([_image()])
    plain = clip.encode_image_tokens(pixels, surgery=False)
    surgery = clip.encode_image_tokens(pixels, surgery=True)
    torch.testing.assert_close(surgery[:, 0], plain[:, 0])  # CLS token comes from the original path
    assert (surgery[:, 1:] - plain[:, 1:]).abs().max() > 1e-2
    # vv_blocks=0 turns the surgery off.
    no_vv = ClipSurgery.from_preset("tiny", vv_blocks=0)
    torch.testing.assert_close(no_vv.encode_image_tokens(pixels), plain)


def test_map_is_feature_surgery_of_vv_tokens(clip: ClipSurgery):
    img = _image()
    text, empty = clip.encode_text(["shadow", ""])
    tokens = clip.encode_image_tokens(clip.preprocess([img]))[0, 1:]  # drop CLS
    sim = tokens @ (text - empty)
    expected = ((sim - sim.min()) / (sim.max() - sim.min())).reshape(14, 14)
    clip.clear_cache()
    torch.testing.assert_close(clip.patch_maps([img], "shadow")[0], expected, atol=1e-6, rtol=0)
    # The redundant feature matters: the map without it differs.
    raw = tokens @ text
    raw = ((raw - raw.min()) / (raw.max() - raw.min())).reshape(14, 14)
    assert not torch.allclose(raw, expected, atol=1e-3)


def test_raw_text_without_prompt_ensemble():
    clip = ClipSurgery.from_preset("tiny", prompt_ensemble=False)
    tokens = clip.tokenizer(["shadow"])
    with torch.inference_mode():
        expected = clip.model.encode_text(tokens, normalize=True)
    torch.testing.assert_close(clip.encode_text(["shadow"]), expected)


def test_other_input_size_interpolates_positional_embedding():
    clip = ClipSurgery.from_preset("tiny", input_size=(288, 224))
    assert clip.grid_size == (18, 14)
    m = clip.similarity_map(_image(), "shadow")
    assert m.shape == (64, 64) and m.min().item() == 0.0 and m.max().item() == 1.0
    pos = clip._positional_embedding((18, 14))
    assert pos.shape == (1 + 18 * 14, 64)
    native = clip.model.visual.positional_embedding
    assert torch.equal(pos[0], native[0])  # CLS position kept
    # Interpolating to the native grid changes nothing.
    patch = native[1:].reshape(1, 14, 14, 64).permute(0, 3, 1, 2)
    same = F.interpolate(patch, size=(14, 14), mode="bicubic", align_corners=False)
    torch.testing.assert_close(same, patch)


def test_grayscale_and_rgba_images_are_accepted(clip: ClipSurgery):
    gray = _image()[:, :, 0]
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    rgba = np.concatenate([rgb, np.full_like(gray[:, :, None], 7)], axis=2)
    m = clip.similarity_map(rgb, "shadow")
    assert torch.equal(clip.similarity_map(gray, "shadow"), m)
    assert torch.equal(clip.similarity_map(rgba, "shadow"), m)


def test_bad_images_raise_named_error(clip: ClipSurgery):
    with pytest.raises(ClipImageError, match="uint8"):
        clip.similarity_map(np.zeros((10, 10, 3), dtype=np.float32), "x")
    with pytest.raises(ClipImageError, match="HxWx3"):
        clip.similarity_map(np.zeros((10, 10, 2), dtype=np.uint8), "x")
    with pytest.raises(ClipImageError, match="empty"):
        clip.similarity_map(np.zeros((0, 10, 3), dtype=np.uint8), "x")


def test_returned_maps_work_with_autograd(clip: ClipSurgery):
    m = clip.similarity_map(_image(), "shadow")
    assert not m.is_inference()
    w = torch.ones(64, 64, requires_grad=True)
    (w * m).sum().backward()  # SRM training multiplies F_I by the map under autograd
    torch.testing.assert_close(w.grad, m)


def test_weights_file_round_trip_through_open_clip_loader(tmp_path, clip: ClipSurgery):
    path = tmp_path / "tiny_clip.pt"
    torch.save(clip.model.state_dict(), path)
    loaded = ClipSurgery.from_preset("tiny", pretrained=str(path), seed=99)  # seed unused: weights loaded
    img = _image()
    assert torch.equal(loaded.similarity_map(img, "shadow"), clip.similarity_map(img, "shadow"))


def test_missing_weights_file_raises_with_path(tmp_path):
    missing = tmp_path / "nope" / "clip.pt"
    with pytest.raises(ClipWeightsError, match="not found") as info:
        ClipSurgery.from_preset("tiny", pretrained=str(missing))
    assert str(missing) in str(info.value)
    assert isinstance(info.value, CheckpointError) and isinstance(info.value, AlignSamError)


def test_unknown_tag_raises_with_known_tags():
    with pytest.raises(ClipWeightsError, match="Unknown pretrained tag 'no_such_tag'") as info:
        ClipSurgery("ViT-B-16", pretrained="no_such_tag")
    assert "openai" in str(info.value)  # lists the tags that exist


def test_unusable_weights_file_raises_named_error(tmp_path, clip: ClipSurgery):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ClipWeightsError, match="garbage.pt"):
        ClipSurgery.from_preset("tiny", pretrained=str(garbage))
    # Weights of another architecture (4 vision layers) into a 2-layer model.
    weights = tmp_path / "tiny4.pt"
    torch.save(clip.model.state_dict(), weights)
    cfg = copy.deepcopy(TINY_CLIP_CONFIG)
    cfg["vision_cfg"]["layers"] = 2
    with pytest.raises(ClipWeightsError, match="tiny4.pt"):
        ClipSurgery("ViT-B-16", pretrained=str(weights), model_cfg=cfg, vv_blocks=1)


def test_tag_download_failure_raises_named_error_without_network(monkeypatch: pytest.MonkeyPatch):
    def offline(*args, **kwargs):
        raise RuntimeError("cannot find the requested files in the local cache")

    # What open_clip does offline, without depending on this machine's Hugging Face cache.
    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(ClipWeightsError, match="pretrained tag 'openai' of ViT-B-16") as info:
        ClipSurgery("ViT-B-16", pretrained="openai")
    assert "HF_HUB_OFFLINE" in str(info.value) and "local weights file" in str(info.value)


def test_unknown_model_and_preset_raise():
    with pytest.raises(ClipSurgeryError, match="Unknown open_clip model"):
        ClipSurgery("ViT-Nope", pretrained=None)
    with pytest.raises(ClipSurgeryError, match="Unknown CLIP preset"):
        ClipSurgery.from_preset("huge")
    with pytest.raises(ClipSurgeryError, match="multiple"):
        ClipSurgery.from_preset("tiny", input_size=100)


def test_timing_helper_runs(clip: ClipSurgery):
    assert time_similarity_map(clip, _image(), text="shadow", repeats=1) > 0
