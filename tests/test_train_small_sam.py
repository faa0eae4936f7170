"""The small-SAM training script: its warm start at another input size, and its scene mix."""

import dataclasses

import pytest
import torch

from alignsam.sam import build_sam, get_spec
from alignsam.synthetic import REGION_KINDS
from benchmarks.train_small_sam import SceneBatches, TrainConfig, main, resize_position_embeddings


def test_position_embeddings_resize_to_a_larger_token_grid():
    small = get_spec("tiny")  # 128 px, patch 8: 16 x 16 tokens
    large = dataclasses.replace(small, image_size=192)  # 24 x 24 tokens
    state = build_sam(small, seed=1).state_dict()
    resized = resize_position_embeddings(state, large.embedding_size)
    model = build_sam(large, seed=2)
    model.load_state_dict(resized)  # every shape fits the larger grid
    assert resized["image_encoder.pos_embed"].shape == (1, 24, 24, small.encoder_embed_dim)
    rel = [k for k in resized if k.endswith(("rel_pos_h", "rel_pos_w"))]
    assert rel and all(resized[k].shape[0] == 2 * 24 - 1 for k in rel)
    # Everything else is the original weights, and a constant embedding stays constant.
    same = [k for k in state if "pos" not in k]
    assert all(torch.equal(resized[k], state[k]) for k in same)
    flat = {"image_encoder.pos_embed": torch.full((1, 16, 16, 4), 0.5)}
    torch.testing.assert_close(resize_position_embeddings(flat, 24)["image_encoder.pos_embed"],
                               torch.full((1, 24, 24, 4), 0.5))


def test_family_weights_choose_the_scene_mix():
    cfg = TrainConfig(batch_images=6, family_weights=(0.0, 0.0, 0.0, 1.0, 0.0))  # shadow scenes only
    batch = next(iter(SceneBatches(cfg, seed_offset=0, rng_seed=0)))
    kinds = {REGION_KINDS[k] for k in batch["kinds"].tolist()}
    assert kinds <= {"object", "shadow"} and "shadow" in kinds
    assert batch["masks"].shape[0] == 6 * cfg.regions_per_image
    with pytest.raises(SystemExit):  # a negative weight is refused before anything is built
        main(["--family-weights", "0.1", "0.1", "-0.2", "0.5", "0.2", "--minutes", "0"])


def test_small_region_boost_draws_small_regions_more_often():
    def small_share(boost: float) -> float:
        cfg = TrainConfig(batch_images=12, regions_per_image=1, family_weights=(0.0, 0.0, 0.0, 1.0, 0.0),
                          small_region_boost=boost)
        batch = next(iter(SceneBatches(cfg, seed_offset=0, rng_seed=0)))  # the same scenes for every boost
        return float((batch["masks"].sum(dim=(1, 2)) < cfg.small_region_area).float().mean())

    plain, boosted = small_share(1.0), small_share(1e6)
    assert boosted > plain
    assert boosted >= 0.25  # a scene with a small region (about a third of these) then nearly always gives it
    with pytest.raises(SystemExit):
        main(["--small-region-boost", "0", "--minutes", "0"])


def _tiny_prompts():
    """A tiny random SAM, 3 image embeddings of a 256-px scene and 17-slot prompts (all padding to start)."""
    from alignsam.sam import FrozenSam

    sam = FrozenSam.from_preset("tiny", seed=5)  # 128 px input: scene pixels * 0.5
    g = torch.Generator().manual_seed(0)
    spec = sam.spec
    emb = torch.randn(3, spec.prompt_embed_dim, spec.embedding_size, spec.embedding_size, generator=g)
    points = torch.rand(3, 17, 2, generator=g) * 256
    labels = torch.full((3, 17), -1)
    boxes = torch.tensor([[10.0, 20.0, 120.0, 200.0], [50.0, 60.0, 70.0, 90.0], [0.0, 0.0, 256.0, 256.0]])
    return sam, emb, points, labels, boxes


def test_a_box_alone_decodes_in_training_as_frozen_sam_decodes_it():
    # Run 14 (issue 17): a box prompt in a training batch carries 17 padding slots; the decoder must not see
    # them, since FrozenSam.decode (SAM's PromptEncoder) sends a box alone as its two corner tokens.
    from alignsam.sam import predict_masks_batched
    from benchmarks.train_small_sam import decode, input_scale

    sam, emb, points, labels, boxes = _tiny_prompts()
    scale = input_scale(sam.model, 256)
    logits, iou = decode(sam.model, emb, points, labels, scale=scale, boxes=boxes, has_box=torch.ones(3, dtype=bool))
    ref = sam.decode(emb, torch.zeros(3, 0, 2), torch.zeros(3, 0, dtype=torch.long), (256, 256), boxes=boxes,
                     return_probs=False)
    torch.testing.assert_close(logits[:, :1], ref.low_res_logits, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(iou[:, :1], ref.iou_predictions, atol=1e-6, rtol=1e-5)
    multi = sam.decode(emb, torch.zeros(3, 0, 2), torch.zeros(3, 0, dtype=torch.long), (256, 256), boxes=boxes,
                       multimask=True, return_probs=False)
    torch.testing.assert_close(logits[:, 1:], multi.low_res_logits, atol=1e-6, rtol=1e-5)
    # The layout up to run 13 (the padding tokens attended to) is another input: the test can tell them apart.
    pe = sam.model.prompt_encoder
    padded = torch.cat([pe._embed_points(points * scale, labels, pad=False), pe._embed_boxes(boxes * scale)], dim=1)
    _, dense = pe(points=None, boxes=None, masks=None)
    old, _ = predict_masks_batched(sam.model.mask_decoder, emb, pe.get_dense_pe(), padded, dense.expand(3, -1, -1, -1))
    assert (old[:, :1] - ref.low_res_logits).abs().max() > 100 * (logits[:, :1] - ref.low_res_logits).abs().max()


def test_a_mixed_batch_decodes_every_prompt_kind_as_inference():
    # One batch: a box with one click, clicks with SAM's own padding point, a mask input, and a box alone.
    from benchmarks.train_small_sam import decode, input_scale

    sam, emb, points, labels, boxes = _tiny_prompts()
    labels[0, 0] = 1
    labels[2, :3] = torch.tensor([1, 0, 1])
    has_box = torch.tensor([True, True, False])  # row 1: a box alone (every slot padding)
    g = torch.Generator().manual_seed(1)
    mask_input = torch.randn(3, 1, sam.spec.low_res_size, sam.spec.low_res_size, generator=g)
    use_mask = torch.tensor([False, False, True])
    logits, _ = decode(sam.model, emb, points, labels, mask_input, use_mask, input_scale(sam.model, 256), boxes,
                       has_box)
    size = (256, 256)
    refs = [
        sam.decode(emb[:1], points[:1, :1], labels[:1, :1], size, boxes=boxes[:1], return_probs=False),
        sam.decode(emb[2:], points[2:, :3], labels[2:, :3], size, mask_input=mask_input[2:], return_probs=False),
        sam.decode(emb[1:2], torch.zeros(1, 0, 2), torch.zeros(1, 0, dtype=torch.long), size, boxes=boxes[1:2],
                   return_probs=False),
    ]
    for row, ref in zip((0, 2, 1), refs, strict=True):
        torch.testing.assert_close(logits[row : row + 1, :1], ref.low_res_logits, atol=1e-6, rtol=1e-5)


def test_a_training_step_with_boxes_and_point_sets_has_finite_gradients():
    from benchmarks.train_small_sam import train_step

    cfg = TrainConfig(batch_images=2, rounds=2, prompt_mix=(0.3, 0.3, 0.4), max_points=17)
    model = build_sam(get_spec("tiny"), seed=0)
    batch = next(iter(SceneBatches(cfg, seed_offset=0, rng_seed=0)))
    loss, _ = train_step(model, batch, cfg, torch.Generator().manual_seed(0))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    assert model.prompt_encoder.point_embeddings[2].weight.grad.abs().sum() > 0  # the box corners learn
