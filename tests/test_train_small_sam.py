"""The small-SAM training script's warm start at another input size."""

import dataclasses

import torch

from alignsam.sam import build_sam, get_spec
from benchmarks.train_small_sam import resize_position_embeddings


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
