"""Training, bundles and inference on the tiny presets (real SAM / open_clip classes)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from alignsam.bundle import load_bundle, read_meta, save_bundle
from alignsam.clip_surgery import ClipSurgery
from alignsam.errors import BundleError, DataError
from alignsam.policy import TrainConfig
from alignsam.ppo import PPOConfig
from alignsam.predict import AlignSAM
from alignsam.sam import FrozenSam
from alignsam.srm import SRMConfig
from alignsam.train import split_indices, train
from tests.helpers import bright_disc_samples

# State projections narrower than the tiny SAM's 32 channels, so training, bundles and inference exercise them.
QUICK = TrainConfig(ppo=PPOConfig(episodes=2, steps=3, epochs=2), srm=SRMConfig(state_channels=16), grid=(6, 6),
                    branch="auto", seed=1, agent_state_channels=16)


@pytest.fixture(scope="module")
def sam() -> FrozenSam:
    return FrozenSam.from_preset("tiny", seed=0)


@pytest.fixture(scope="module")
def clip() -> ClipSurgery:
    return ClipSurgery.from_preset("tiny")


@pytest.fixture(scope="module")
def trained(sam, clip):
    samples = bright_disc_samples(8, seed=0)
    progress = []
    result = train(sam, samples, QUICK, clip=clip, callback=progress.append)
    return samples, result, progress


def test_training_encodes_each_image_once_and_runs_clip_once_per_image(clip):
    sam = FrozenSam.from_preset("tiny", seed=0, cache_size=2)  # a cache smaller than the data set
    samples = bright_disc_samples(6, seed=3)
    misses = clip.cache_misses
    result = train(sam, samples, QUICK, clip=clip)
    assert result.encoder_calls == 6 and sam.stats.encoder_calls == 6
    assert result.clip_calls == 6 and clip.cache_misses - misses == 6
    assert set(result.candidates) == {"implicit", "explicit"}  # auto trained both branches


def test_progress_is_reported(trained):
    _, result, progress = trained
    stages = [p.stage for p in progress]
    assert stages[0] == "encoding" and stages[-1] == "done"
    episodes = [(p.branch, p.episode) for p in progress if p.stage == "training"]
    assert episodes == [("implicit", 1), ("implicit", 2), ("explicit", 1), ("explicit", 2)]
    assert all(np.isfinite(p.srm_loss) and -1 <= p.reward <= 1 for p in progress if p.stage == "training")
    assert progress[-1].branch == result.policy.branch


def test_branch_with_the_better_validation_is_kept(trained):
    _, result, _ = trained
    best = max(result.candidates, key=lambda b: result.candidates[b]["miou"])
    assert result.policy.branch == best
    assert result.policy.val_metrics == result.candidates[best]


def test_every_trained_branch_keeps_its_episode_history_and_the_held_out_images_are_named(trained):
    samples, result, _ = trained
    assert set(result.histories) == {"implicit", "explicit"}
    for branch, history in result.histories.items():
        assert [r["episode"] for r in history] == list(range(1, QUICK.ppo.episodes + 1))
        assert all(r["branch"] == branch and -1.0 <= r["reward"] <= 1.0 for r in history)
    assert result.histories[result.policy.branch] == result.policy.history
    _, val_idx = split_indices(len(samples), QUICK.val_fraction, QUICK.seed)
    assert result.val_names == [samples[i].name for i in val_idx] and result.val_names
    assert all(m["n"] == len(result.val_names) for m in result.candidates.values())


def test_training_is_reproducible(sam, clip):
    samples = bright_disc_samples(5, seed=4)
    cfg = TrainConfig(ppo=PPOConfig(episodes=2, steps=2, epochs=2), grid=(6, 6), branch="implicit", seed=7)
    a = train(sam, samples, cfg).policy
    b = train(sam, samples, cfg).policy
    for (k, va), vb in zip(a.agent.state_dict().items(), b.agent.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    for (k, va), vb in zip(a.srm.state_dict().items(), b.srm.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k


def test_split_holds_out_validation():
    train_idx, val_idx = split_indices(50, 0.2, seed=0)
    assert len(val_idx) == 10 and not set(train_idx) & set(val_idx) and len(train_idx) == 40
    assert split_indices(1, 0.2, 0) == ([0], [])
    with pytest.raises(DataError):
        split_indices(0, 0.2, 0)


def test_explicit_branch_without_clip_is_refused(sam):
    with pytest.raises(DataError, match="CLIP"):
        train(sam, bright_disc_samples(3, seed=0), TrainConfig(branch="explicit"))


def test_bundle_round_trip_predicts_the_same(tmp_path, sam, clip, trained):
    samples, result, _ = trained
    path = tmp_path / "policy.pt"
    meta = save_bundle(result.policy, path, sam, "bright disc", clip_model="tiny")
    assert json.loads((tmp_path / "policy.json").read_text()) == meta == read_meta(path)
    assert meta["sam_preset"] == "tiny" and meta["grid"] == [6, 6] and meta["steps"] == 3
    assert meta["train_samples"] == len(result.policy.train_names)
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left no temp file
    bundle = load_bundle(path, sam)
    for (k, va), vb in zip(result.policy.agent.state_dict().items(), bundle.agent.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    images = [s.image for s in samples[:3]]
    direct = AlignSAM(sam, bundle, clip).predict(images)
    loaded = AlignSAM.from_bundle(path, sam, clip).predict(images)
    for a, b in zip(direct, loaded, strict=True):
        assert np.array_equal(a.mask, b.mask) and a.points == b.points


def test_bundle_for_another_sam_is_refused(tmp_path, sam, trained):
    _, result, _ = trained
    path = tmp_path / "p.pt"
    save_bundle(result.policy, path, sam, "bright disc")
    with pytest.raises(BundleError, match="trained with SAM preset 'tiny'.*'small'"):
        load_bundle(path, FrozenSam.from_preset("small"))
    with pytest.raises(BundleError, match="another checkpoint of 'tiny'"):
        load_bundle(path, FrozenSam.from_preset("tiny", seed=5))


def test_corrupt_or_missing_bundle_is_a_clear_error(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "none.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(BundleError, match="not a readable policy bundle"):
        load_bundle(bad)
    other = tmp_path / "other.pt"
    torch.save({"meta": {"format": "something"}}, other)
    with pytest.raises(BundleError, match="not an AlignSAM policy bundle"):
        load_bundle(other)


def test_prediction_is_deterministic_and_well_formed(sam, clip, trained):
    samples, result, _ = trained
    model = AlignSAM(sam, load_bundle_from(result, sam), clip)
    odd = np.random.default_rng(0).integers(0, 255, (77, 131, 3), dtype=np.uint8)
    images = [samples[0].image, odd]
    first, second = model.predict(images), model.predict(images, batch_size=1)
    for a, b, img in zip(first, second, images, strict=True):
        assert a.mask.shape == img.shape[:2] and a.probs.dtype == np.float32
        assert np.allclose(a.probs, b.probs, atol=1e-5) and a.points == b.points
        assert 0.0 <= a.score <= 1.0 and 0.0 <= a.present <= 1.0
        assert len(a.points) == 2 + 3  # initial pair + T
        assert all(0 <= x < img.shape[1] and 0 <= y < img.shape[0] for x, y, _ in a.points)
        assert [lab for *_, lab in a.points[:2]] == [1, 0]


def test_absent_target_gives_an_empty_mask(sam, clip, trained):
    _, result, _ = trained
    model = AlignSAM(sam, load_bundle_from(result, sam), clip)
    with torch.no_grad():
        model.srm.presence_head[-1].bias.fill_(-50.0)  # an SRM certain the target is absent
    pred = model.predict([bright_disc_samples(1, seed=9)[0].image])[0]
    assert pred.present < 0.5 and not pred.mask.any() and pred.score == 0.0


def test_ablations_change_the_rollout(sam, clip, trained):
    samples, result, _ = trained
    model = AlignSAM(sam, load_bundle_from(result, sam), clip)
    img = [samples[1].image]
    assert all(lab == 1 for *_, lab in model.predict(img, labels="positive")[0].points[2:])
    assert len(model.predict(img, steps=1)[0].points) == 3
    rand = model.predict(img, actions="random", generator=torch.Generator().manual_seed(0))[0]
    assert len({(x, y) for x, y, _ in rand.points[2:]}) == 3  # never the same patch twice
    # Ground-truth labels: a point is positive exactly where it lies on the mask; "gt-positive" prompts only those.
    gt = [samples[1].mask]
    full = model.predict(img, labels="gt", masks=gt)[0].points[2:]
    assert all(lab == int(gt[0][int(y), int(x)]) for x, y, lab in full)
    kept = model.predict(img, labels="gt-positive", masks=gt)[0].points[2:]
    assert all(lab == 1 and gt[0][int(y), int(x)] for x, y, lab in kept)
    if full[0][2] == 1:  # the first agent point comes before any label differs, so it is the same point
        assert kept and kept[0] == full[0]


def load_bundle_from(result, sam):
    """A bundle of copies of the trained modules (tests may change them; the fixture is shared)."""
    from alignsam.bundle import Bundle

    p = result.policy
    meta = {"text": "bright disc", "version": "test", "branch": p.branch}
    return Bundle(copy.deepcopy(p.agent), copy.deepcopy(p.srm), p.config, meta)


def test_a_baseline_policy_is_validated_on_the_same_images(sam, clip, trained):
    samples, result, _ = trained
    p = result.policy
    again = train(sam, samples, QUICK, clip=clip, baseline=(p.agent, p.srm, p.config))
    # Same seed, same data: the retrained winner and the baseline see the same validation images.
    assert again.baseline_metrics is not None
    assert again.baseline_metrics["n"] == again.policy.val_metrics["n"]
    assert again.baseline_metrics["miou"] == pytest.approx(p.val_metrics["miou"])
