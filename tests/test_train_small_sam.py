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
