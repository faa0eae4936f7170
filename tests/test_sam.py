"""The frozen SAM wrapper, on the real segment_anything classes (tiny preset)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from alignsam.errors import CheckpointError
from alignsam.sam import FrozenSam, build_sam, get_spec, list_presets, save_checkpoint


@pytest.fixture(scope="module")
def sam() -> FrozenSam:
    return FrozenSam.from_preset("tiny", seed=3)


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (90 + 7 * i, 120 - 5 * i, 3), dtype=np.uint8) for i in range(n)]


def test_vit_presets_match_official_sizes():
    params = {p.name: p.parameters for p in list_presets()}
    # Parameter counts of the official SAM checkpoints.
    assert params["vit_b"] == 93_735_472
    assert params["vit_l"] == 312_342_832
    assert params["vit_h"] == 641_090_608
    assert params["small"] < 3_000_000


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(CheckpointError, match="unknown SAM preset 'vit_x'.*vit_b"):
        get_spec("vit_x")


def test_checkpoint_round_trip_through_real_loader(tmp_path):
    a = FrozenSam.from_preset("tiny", seed=1)
    path = tmp_path / "sam_tiny.pth"
    digest = save_checkpoint(a.model, path)
    b = FrozenSam.from_preset("tiny", checkpoint=path, seed=99)  # the seed must not matter now
    assert b.model_id == f"tiny-{digest[:16]}"
    for (k, va), (_, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert torch.equal(va, vb), k
    img = _images(1)[0]
    assert torch.allclose(a.embed(img).features, b.embed(img).features)


def test_missing_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "sam_vit_b_01ec64.pth"
    with pytest.raises(CheckpointError, match=str(missing)):
        FrozenSam.from_preset("vit_b", checkpoint=missing)


def test_non_checkpoint_file_is_refused(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"definitely not a pickle")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        FrozenSam.from_preset("tiny", checkpoint=junk)
    other = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a SAM checkpoint"):
        FrozenSam.from_preset("tiny", checkpoint=other)


def test_checkpoint_of_another_preset_is_refused(tmp_path):
    path = tmp_path / "small.pth"
    save_checkpoint(build_sam(get_spec("small")), path)
    with pytest.raises(CheckpointError, match="another SAM preset than 'tiny'.*'small'"):
        FrozenSam.from_preset("tiny", checkpoint=path)


def test_parameters_are_frozen(sam):
    assert not any(p.requires_grad for p in sam.model.parameters())


def test_embedding_cache_encodes_each_image_once(tmp_path):
    s = FrozenSam.from_preset("tiny", cache_size=2, cache_dir=tmp_path)
    imgs = _images(3)
    s.embed_many([*imgs, imgs[0].copy()])  # a duplicate in the same call
    assert s.stats.encoder_calls == 3
    s.embed(imgs[1])
    s.embed(imgs[2])
    assert s.stats.encoder_calls == 3 and s.stats.memory_hits == 2
    # imgs[0] fell out of the 2-entry LRU; the fp16 disk cache answers instead of the encoder.
    e0 = s.embed(imgs[0])
    assert s.stats.encoder_calls == 3 and s.stats.disk_hits == 1
    # A second process (new object, same weights) reads the disk cache too.
    s2 = FrozenSam.from_preset("tiny", cache_dir=tmp_path)
    e0b = s2.embed(imgs[0])
    assert s2.stats.encoder_calls == 0
    assert torch.equal(e0.features, e0b.features)
    fresh = FrozenSam.from_preset("tiny").embed(imgs[0]).features
    assert torch.allclose(e0b.features, fresh, atol=1e-2, rtol=1e-2)  # fp16 storage


def test_disk_cache_is_keyed_by_weights(tmp_path):
    a = FrozenSam.from_preset("tiny", seed=1, cache_dir=tmp_path)
    b = FrozenSam.from_preset("tiny", seed=2, cache_dir=tmp_path)
    img = _images(1)[0]
    a.embed(img)
    b.embed(img)
    assert a.stats.encoder_calls == 1 and b.stats.encoder_calls == 1


def test_batched_decode_equals_one_image_at_a_time(sam):
    imgs = _images(5)
    embs = sam.embed_many(imgs)
    rng = np.random.default_rng(1)
    pts = torch.tensor(np.stack([rng.uniform(0, 80, (4, 2)) for _ in imgs]), dtype=torch.float32)
    labels = torch.tensor([[1, 0, 1, -1], [1, 1, 0, 0], [0, 1, -1, -1], [1, -1, -1, -1], [1, 0, 0, 1]])
    mask_input = torch.randn(5, 1, 64, 64)
    batched = sam.decode(embs, pts, labels, None, mask_input=mask_input)
    for i in range(5):
        alone = sam.decode(embs[i : i + 1], pts[i : i + 1], labels[i : i + 1], None, mask_input=mask_input[i : i + 1])
        torch.testing.assert_close(batched.low_res_logits[i], alone.low_res_logits[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(batched.probs[i], alone.probs[0], atol=1e-5, rtol=1e-4)
        assert batched.probs[i].shape == imgs[i].shape[:2]


def test_decode_matches_segment_anything_predictor(sam):
    img = _images(1, seed=5)[0]
    pts = np.array([[30.0, 40.0], [70.0, 20.0], [10.0, 10.0]])
    labels = np.array([1, 0, 1])
    predictor = SamPredictor(sam.model)
    predictor.set_image(img)
    for multimask in (False, True):
        masks, scores, low_res = predictor.predict(pts, labels, multimask_output=multimask, return_logits=True)
        out = sam.decode([sam.embed(img)], torch.tensor(pts)[None], torch.tensor(labels)[None], None, multimask=multimask)
        np.testing.assert_allclose(out.low_res_logits[0].numpy(), low_res, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(out.iou_predictions[0].numpy(), scores, atol=1e-5)
        best = int(np.argmax(scores))
        np.testing.assert_allclose(torch.logit(out.probs[0].double()).numpy(), masks[best], atol=2e-3)


def test_decode_same_size_batch_stacks_probs(sam):
    img = _images(1)[0]
    embs = sam.embed_many([img, img[::-1].copy()])
    out = sam.decode(embs, torch.full((2, 1, 2), 20.0), torch.ones(2, 1, dtype=torch.long), None)
    assert isinstance(out.probs, torch.Tensor) and out.probs.shape == (2, *img.shape[:2])
    assert float(out.probs.min()) >= 0.0 and float(out.probs.max()) <= 1.0
    small = sam.decode(embs, torch.full((2, 1, 2), 20.0), torch.ones(2, 1, dtype=torch.long), None, out_size=(8, 9))
    assert small.probs.shape == (2, 8, 9)


def test_to_embedding_frame_aligns_with_sam_input(sam):
    # A 64x128 image fills the top half of SAM's padded square frame.
    frame = sam.to_embedding_frame(torch.ones(64, 128), (64, 128))
    assert frame.shape == (16, 16)
    assert torch.allclose(frame[:8], torch.ones(8, 16)) and torch.allclose(frame[8:], torch.zeros(8, 16))


def test_gray_and_rgba_images_are_accepted(sam):
    img = _images(1)[0]
    rgba = np.concatenate([img, np.full((*img.shape[:2], 1), 255, np.uint8)], axis=2)
    assert torch.equal(sam.embed(rgba).features, sam.embed(img).features)
    assert sam.embed(img[:, :, 0]).features.shape == (32, 16, 16)


def test_points_to_grid_and_back(sam):
    sizes = [(100, 200), (200, 100)]
    # (x, y) = (199, 99) is the far corner of a 100x200 image: it fills the top half of the frame.
    pts = torch.tensor([[[199.0, 99.0], [0.0, 0.0]], [[99.0, 199.0], [50.0, 100.0]]])
    cells = sam.points_to_grid(pts, sizes, 16)
    assert cells.tolist() == [[[7, 15], [0, 0]], [[15, 7], [8, 4]]]
    back = sam.grid_to_points(cells, sizes, 16)
    assert torch.equal(sam.points_to_grid(back, sizes, 16), cells)
    assert (back[0, :, 0] <= 199).all() and (back[0, :, 1] <= 99).all()
