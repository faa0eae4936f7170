"""SRM: Dice + BCE by hand, both branches' shapes and batch independence, overfitting, point helpers."""

from __future__ import annotations

import math

import pytest
import torch

from alignsam.srm import (
    SRM,
    SRMConfig,
    SRMOutput,
    bce_loss,
    dice_loss,
    srm_loss,
    srm_update,
    update_subsets,
)


def _inputs(batch: int, channels: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    embedding = torch.randn(batch, channels, size, size, generator=g)
    prev_prob = torch.rand(batch, 1, size, size, generator=g)
    clip_map = torch.rand(batch, 1, size, size, generator=g)
    return embedding, prev_prob, clip_map


def test_config_has_the_papers_update_counts() -> None:
    assert SRMConfig(branch="implicit").updates_per_step == 1
    assert SRMConfig(branch="explicit").updates_per_step == 5
    assert SRMConfig().lr == 1e-3
    assert SRM.from_config(8, SRMConfig(branch="explicit", hidden=16)).branch == "explicit"


def test_dice_and_bce_by_hand() -> None:
    target = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    # Perfect prediction: (2 * 2 + 1) / (2 + 2 + 1) = 1 -> Dice loss 0.
    assert dice_loss(target.clone(), target).item() == 0.0
    # p = 0.5 everywhere: 1 - (2 * 1 + 1) / (2 + 2 + 1) = 1 - 3/5 = 0.4.
    half = torch.full((1, 4), 0.5)
    assert dice_loss(half, target).item() == pytest.approx(0.4)
    # Empty target: predicting nothing costs 0 (smooth / smooth); p = 0.5 costs 1 - 1 / (2 + 0 + 1) = 2/3.
    empty = torch.zeros(1, 4)
    assert dice_loss(torch.zeros(1, 4), empty).item() == 0.0
    assert dice_loss(half, empty).item() == pytest.approx(2 / 3)
    # Per sample, then averaged: (0 + 0.4) / 2 = 0.2.
    both = dice_loss(torch.cat([target, half]), torch.cat([target, target]))
    assert both.item() == pytest.approx(0.2)

    # BCE: logit 0 -> log 2 whatever the target; logit ln 3 (p = 3/4) -> -ln(3/4) on 1, -ln(1/4) on 0.
    assert bce_loss(torch.zeros(2, 3), torch.tensor([[1.0, 0, 1], [0, 0, 1]])).item() == pytest.approx(
        math.log(2)
    )
    logit = math.log(3.0)
    value = bce_loss(torch.tensor([logit, logit]), torch.tensor([1.0, 0.0])).item()
    assert value == pytest.approx((-math.log(0.75) - math.log(0.25)) / 2)


def test_srm_loss_adds_dice_mask_bce_and_presence_bce() -> None:
    gt = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).reshape(1, 1, 2, 2)
    # Zero logits: Dice 0.4 (above), mask BCE log 2, presence BCE log 2 (present defaults to 1 here).
    zero = SRMOutput(logits=torch.zeros(1, 1, 2, 2), presence_logit=torch.zeros(1))
    assert srm_loss(zero, gt).item() == pytest.approx(0.4 + 2 * math.log(2))
    # A confident, correct prediction costs almost nothing; being told the target is absent costs presence BCE.
    sure = SRMOutput(logits=(gt * 2 - 1) * 30, presence_logit=torch.tensor([30.0]))
    assert srm_loss(sure, gt).item() < 1e-6
    assert srm_loss(sure, gt, present=torch.zeros(1)).item() == pytest.approx(30.0, abs=1e-4)


def test_explicit_branch_requires_the_clip_map() -> None:
    srm = SRM(8, "explicit", hidden=16)
    embedding, prev_prob, _ = _inputs(2, 8, 16)
    with pytest.raises(ValueError, match="clip_map"):
        srm(embedding, prev_prob)
    with pytest.raises(ValueError, match="implicit"):
        SRM(8, "both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="embedding grid"):
        srm(embedding, prev_prob[..., :8, :8], prev_prob)


@pytest.mark.parametrize("branch", ["implicit", "explicit"])
@pytest.mark.parametrize(("channels", "size"), [(32, 16), (256, 64)])
def test_shapes_for_small_and_vit_embeddings(branch: str, channels: int, size: int) -> None:
    torch.manual_seed(0)
    srm = SRM(channels, branch, hidden=16)  # type: ignore[arg-type]
    embedding, prev_prob, clip_map = _inputs(2, channels, size)
    out = srm(embedding, prev_prob, clip_map)
    assert out.logits.shape == (2, 1, size, size)
    assert out.presence_logit.shape == (2,)
    assert torch.isfinite(out.logits).all()


def test_fusion_kernel_comes_from_the_config() -> None:
    torch.manual_seed(0)
    srm = SRM.from_config(32, SRMConfig(branch="explicit", hidden=16, fuse_kernel=1))
    assert srm.fuse[0].kernel_size == (1, 1)
    assert SRM.from_config(32, SRMConfig(branch="explicit", hidden=16)).fuse[0].kernel_size == (3, 3)
    embedding, prev_prob, clip_map = _inputs(2, 32, 16)
    assert srm(embedding, prev_prob, clip_map).logits.shape == (2, 1, 16, 16)


@pytest.mark.parametrize("branch", ["implicit", "explicit"])
def test_sample_output_does_not_depend_on_the_rest_of_the_batch(branch: str) -> None:
    torch.manual_seed(0)
    # 32 x 32 embedding with work_grid 16 and attn_grid 8: pooling, attention on pooled tokens, upsampling.
    srm = SRM(16, branch, hidden=16, attn_grid=8, work_grid=16).eval()  # type: ignore[arg-type]
    embedding, prev_prob, clip_map = _inputs(5, 16, 32, seed=3)
    batch = srm(embedding, prev_prob, clip_map)
    for i in range(5):
        one = slice(i, i + 1)
        alone = srm(embedding[one], prev_prob[one], clip_map[one])
        torch.testing.assert_close(alone.logits[0], batch.logits[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(alone.presence_logit[0], batch.presence_logit[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("branch", ["implicit", "explicit"])
def test_srm_overfits_four_samples(branch: str) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    embedding = torch.randn(4, 16, 16, 16, generator=g)
    # Foreground: where a smoothed channel 0 is positive (learnable from the features), image 3 has none.
    smooth = torch.nn.functional.avg_pool2d(embedding[:, :1], 3, stride=1, padding=1)
    gt = (smooth > 0).float()
    gt[3] = 0
    ones = torch.ones(4, 1, 16, 16)
    clip_map = gt * 0.5 + 0.25
    cfg = SRMConfig(branch=branch, hidden=32)  # type: ignore[arg-type]
    srm = SRM.from_config(16, cfg)
    optimizer = torch.optim.Adam(srm.parameters(), lr=cfg.lr)
    with torch.no_grad():
        before = srm_loss(srm(embedding, ones, clip_map), gt).item()
    semantic = srm.pool_semantic(embedding, clip_map) if branch == "explicit" else None
    for _ in range(60 // cfg.updates_per_step):
        srm_update(srm, optimizer, embedding, ones, clip_map, gt, cfg, semantic=semantic)
    with torch.no_grad():
        out = srm(embedding, ones, clip_map)
    after = srm_loss(out, gt).item()
    assert after < 0.3 * before
    assert ((out.logits > 0).float() == gt).float().mean() > 0.9
    assert (out.presence_logit > 0).tolist() == [True, True, True, False]


def _explicit_srm_and_adam() -> tuple[SRMConfig, SRM, torch.optim.Adam]:
    cfg = SRMConfig(branch="explicit", hidden=16)
    srm = SRM.from_config(8, cfg)
    return cfg, srm, torch.optim.Adam(srm.parameters(), lr=cfg.lr)


def test_srm_update_takes_m_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, srm, optimizer = _explicit_srm_and_adam()
    steps = []
    original = optimizer.step
    monkeypatch.setattr(optimizer, "step", lambda *a, **k: (steps.append(1), original(*a, **k))[1])
    embedding, prev_prob, clip_map = _inputs(2, 8, 16)
    gt = (prev_prob > 0.5).float()
    loss = srm_update(srm, optimizer, embedding, prev_prob, clip_map, gt, cfg)
    assert len(steps) == 5 and math.isfinite(loss)


def test_update_subsets_are_disjoint_until_the_batch_runs_out() -> None:
    g = torch.Generator().manual_seed(0)
    five = update_subsets(40, 5, 8, g)  # the explicit branch's M=5 updates of 8 images see 40 images once
    assert [len(rows) for rows in five] == [8] * 5
    assert sorted(torch.cat(five).tolist()) == list(range(40))
    wrap = update_subsets(10, 5, 4, g)  # 20 rows from 10 images: every image twice, none in one update twice
    assert sorted(torch.cat(wrap).tolist()) == sorted(list(range(10)) * 2)
    assert all(len(set(rows.tolist())) == 4 for rows in wrap)
    assert [rows.tolist() for rows in update_subsets(6, 2, None)] == [list(range(6))] * 2
    assert [rows.tolist() for rows in update_subsets(6, 1, 8)] == [list(range(6))]  # a batch smaller than the subset


def test_srm_update_trains_each_update_on_its_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, srm, optimizer = _explicit_srm_and_adam()
    seen = []
    original = srm.forward_pooled
    def recording(spatial, semantic, size):
        seen.append((spatial.clone(), semantic.clone()))
        return original(spatial, semantic, size)

    monkeypatch.setattr(srm, "forward_pooled", recording)
    embedding, prev_prob, clip_map = _inputs(6, 8, 16)
    gt = (prev_prob > 0.5).float()
    subsets = [torch.tensor([0, 5]), torch.tensor([1]), torch.tensor([2, 3]), torch.tensor([4]), torch.tensor([0])]
    srm_update(srm, optimizer, embedding, prev_prob, clip_map, gt, cfg, subsets=subsets)
    spatial, semantic = srm.pool_spatial(embedding, prev_prob), srm.pool_semantic(embedding, clip_map)
    assert len(seen) == 5
    for rows, (sp, se) in zip(subsets, seen, strict=True):
        torch.testing.assert_close(sp, spatial[rows])
        torch.testing.assert_close(se, semantic[rows])
    with pytest.raises(ValueError, match="subsets"):
        srm_update(srm, optimizer, embedding, prev_prob, clip_map, gt, cfg, subsets=subsets[:2])


def test_float16_embeddings_are_accepted() -> None:
    torch.manual_seed(0)
    srm = SRM(8, "explicit", hidden=16)
    embedding, prev_prob, clip_map = _inputs(2, 8, 16)
    full = srm(embedding, prev_prob, clip_map)
    half = srm(embedding.half(), prev_prob.half(), clip_map.half())
    assert half.logits.dtype == torch.float32
    torch.testing.assert_close(half.logits, full.logits, rtol=1e-2, atol=1e-2)


class _FixedSRM(torch.nn.Module):
    """Stands in for the network only: answers every call with the given logits, to pin how they are read."""

    branch = "implicit"

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, embedding, prev, clip=None) -> SRMOutput:
        return SRMOutput(logits=self.logits[: len(embedding)], presence_logit=torch.zeros(len(embedding)))


def _srm_inputs(sizes):
    from alignsam import FrozenSam
    from alignsam.rollout import Encoded, SrmInputs

    sam = FrozenSam.from_preset("tiny", seed=0)
    g = sam.embedding_size
    enc = Encoded(torch.zeros(len(sizes), sam.embed_dim, g, g), list(sizes))
    return sam, SrmInputs(sam, enc), g


def test_initial_points_are_the_srms_argmax_and_argmin_inside_the_image() -> None:
    from alignsam.rollout import srm_initial_points

    # image 1 is twice as wide as tall: the bottom half of its grid is SAM's padding, never a point
    sam, srm_in, g = _srm_inputs([(64, 64), (32, 64)])
    logits = torch.zeros(2, 1, g, g)
    logits[0, 0, 1, 3], logits[0, 0, 2, 0] = 5.0, -5.0
    logits[1, 0, g - 1, 0], logits[1, 0, 0, 1] = 9.0, -1.0  # the 9 lies in the padding
    logits[1, 0, 3, 4] = 2.0
    points, labels, present = srm_initial_points(sam, srm_in, _FixedSRM(logits), torch.arange(2))
    cells = sam.points_to_grid(points, srm_in.sizes, g)
    assert cells.tolist() == [[[1, 3], [2, 0]], [[3, 4], [0, 1]]]
    assert labels.tolist() == [[1, 0], [1, 0]]
    assert present.tolist() == [0.5, 0.5]


def test_point_labels_read_the_srms_logit_under_each_point() -> None:
    from alignsam.rollout import srm_point_labels

    sam, srm_in, g = _srm_inputs([(64, 64)])
    logits = torch.full((1, 1, g, g), -1.0)
    logits[0, 0, 1, 3] = 1.0
    on = sam.grid_to_points(torch.tensor([[[1, 3]]]), srm_in.sizes, g)[:, 0]
    off = sam.grid_to_points(torch.tensor([[[3, 1]]]), srm_in.sizes, g)[:, 0]
    srm = _FixedSRM(logits)
    prev = torch.ones(1, 1, g, g)
    assert srm_point_labels(sam, srm_in, srm, torch.arange(1), prev, on, srm_in.sizes).tolist() == [1]
    assert srm_point_labels(sam, srm_in, srm, torch.arange(1), prev, off, srm_in.sizes).tolist() == [0]
