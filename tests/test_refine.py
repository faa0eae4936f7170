"""SRM corrective clicks (alignsam.refine): where the click goes, that it joins the prompt set after the episode,
the count chosen by validation and kept in the bundle, the ablations without an SRM never getting one, and a bundle
asking for an unreadable count refused."""

from __future__ import annotations

import dataclasses
import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alignsam.bundle import BundleError, load_bundle, save_bundle
from alignsam.env import PromptEnv
from alignsam.policy import TrainConfig
from alignsam.ppo import PPOConfig
from alignsam.predict import AlignSAM
from alignsam.refine import (
    REFINE_CANDIDATES,
    _max3x3,
    corrective_cells,
    inside_frame,
    interior_cells,
    largest_components,
)
from alignsam.rollout import SrmInputs, encode, rollout
from alignsam.sam import FrozenSam
from alignsam.synthetic.masks import dilate, interior_point
from alignsam.train import kept_refine, train
from tests.helpers import bright_disc_samples


def _square(n: int, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
    m = torch.full((n, n), -1.0)
    m[r0:r1, c0:c1] = 1.0
    return m


def test_the_click_goes_inside_the_largest_disagreement_with_its_sign() -> None:
    n = 32
    inside = torch.ones(3, n, n, dtype=torch.bool)
    srm = torch.stack([_square(n, 4, 28, 4, 28), _square(n, 10, 14, 10, 14), _square(n, 4, 20, 4, 20)])
    mask = torch.stack([_square(n, 4, 28, 4, 12),  # the map's right part is missed: a positive click there
                        _square(n, 2, 30, 2, 30),  # the mask spills far past the map: a negative click
                        _square(n, 4, 20, 4, 20)])  # agreement: no click
    cells, labels = corrective_cells(mask, srm, inside)
    assert labels.tolist() == [1, 0, -1]
    r, c = cells[0].tolist()
    assert 4 <= r < 28 and 12 <= c < 28 and 16 <= c <= 24  # inside the missed part, away from its edges
    r, c = cells[1].tolist()
    assert not (10 <= r < 14 and 10 <= c < 14)  # on the false positive, not on the map's foreground
    # A disagreement only in SAM's padding is no error.
    pad = torch.zeros(1, n, n, dtype=torch.bool)
    pad[:, :, :16] = True
    _, labels = corrective_cells(_square(n, 0, n, 20, 30)[None], torch.full((1, n, n), -1.0), pad)
    assert labels.tolist() == [-1]


def _snakes(n: int) -> np.ndarray:
    """A serpentine path through an n x n frame (its far end is n * n / 2 cells away along it) and the same with
    one rung cut: labels must travel the whole winding path, not a straight run."""
    snake = np.zeros((n, n), bool)
    for r in range(0, n, 4):
        snake[r, :] = True
        snake[r : r + 4, n - 1 if (r // 4) % 2 == 0 else 0] = True
    cut = snake.copy()
    cut[n // 2 - 2 : n // 2 + 2, :] = False
    return np.stack([snake, cut, snake.T, np.rot90(snake).copy()])


def _blobs(rng: np.random.Generator, count: int, n: int) -> np.ndarray:
    noise = torch.from_numpy(rng.random((count, 1, n, n)).astype(np.float32))
    return (F.avg_pool2d(noise, 5, 1, 2)[:, 0] > 0.5).numpy()


@pytest.mark.parametrize("kind", ["noise", "snakes", "blobs"])
def test_batched_components_and_interior_points_agree_with_the_noc_protocols(kind: str) -> None:
    rng = np.random.default_rng(0)
    if kind == "noise":
        regions = rng.random((40, 20, 20)) < 0.5
        regions[0] = False  # an empty region
    elif kind == "snakes":
        regions = _snakes(48)
    else:
        regions = _blobs(rng, 12, 48)
    largest = largest_components(torch.from_numpy(regions)).numpy()
    cells, found = interior_cells(torch.from_numpy(largest))
    assert found.tolist() == [bool(r.any()) for r in regions]
    for region, comp, cell in zip(regions, largest, cells.tolist(), strict=True):
        assert not (comp & ~region).any()
        if not comp.any():
            continue
        # a whole 8-connected component: it has no region cell next to it that it lacks ...
        assert not (dilate(comp) & region & ~comp).any()
        # ... and none larger exists: every region cell outside it lies in a component no bigger
        rest = region & ~comp
        while rest.any():
            other = largest_components(torch.from_numpy(rest)[None])[0].numpy()
            assert other.sum() <= comp.sum()
            rest &= ~other
        assert (cell[1], cell[0]) == interior_point(comp)


def test_the_separable_3x3_maximum_is_max_pooling_with_the_frame_outside_given() -> None:
    x = torch.rand(5, 17, 23)
    assert torch.equal(_max3x3(x), F.max_pool2d(x[:, None], 3, 1, 1)[:, 0])
    padded = F.pad(x, (1, 1, 1, 1), value=2.0)[:, None]
    assert torch.equal(_max3x3(x, outside=2.0), F.max_pool2d(padded, 3, 1)[:, 0])
    assert largest_components(torch.zeros(0, 4, 4, dtype=torch.bool)).shape == (0, 4, 4)  # no image: nothing to do


def test_inside_frame_follows_the_images_resized_long_side() -> None:
    sam = FrozenSam.from_preset("tiny", seed=0)
    frame = 4 * sam.embedding_size
    inside = inside_frame(sam, [(100, 200), (200, 200)], frame, sam.device)
    assert inside[1].all()
    rows = int(inside[0].any(dim=1).sum())
    assert inside[0].any(dim=0).all() and abs(rows - frame // 2) <= 1  # half the rows: a 1:2 image


def test_the_kept_count_needs_the_margin_over_fewer_clicks() -> None:
    def scores(*mious: float) -> dict[str, dict[str, float]]:
        return {str(c): {"miou": m} for c, m in zip(REFINE_CANDIDATES, mious, strict=True)}

    assert kept_refine(scores(0.60, 0.605, 0.609)) == 0  # within the 0.01 margin: the fewest clicks
    assert kept_refine(scores(0.60, 0.62, 0.625)) == 3
    assert kept_refine(scores(0.60, 0.62, 0.64)) == 6
    assert kept_refine(scores(0.60, 0.58, 0.615)) == 6  # measured against the best kept so far


@pytest.mark.parametrize(("margin", "kept"), [(-1.0, max(REFINE_CANDIDATES)), (1.0, 0)])
def test_the_click_count_is_validated_kept_in_the_bundle_and_used_at_inference(monkeypatch, tmp_path, margin: float,
                                                                               kept: int) -> None:
    train_module = importlib.import_module("alignsam.train")  # the package's ``train`` attribute is the function
    monkeypatch.setattr(train_module, "INSTANCE_MARGIN", margin)  # -1: more clicks always win; 1: never
    sam = FrozenSam.from_preset("tiny", seed=0)
    samples = bright_disc_samples(6, seed=2)
    cfg = TrainConfig(ppo=PPOConfig(episodes=1, steps=2, epochs=1), grid=(6, 6), branch="implicit", seed=3,
                      refine="auto")
    result = train(sam, samples, cfg)
    assert set(result.refine or {}) == {str(c) for c in REFINE_CANDIDATES}
    assert all(0.0 <= m["miou"] <= 1.0 for m in result.refine.values())
    policy = result.policy
    assert policy.config.refine_clicks == kept
    assert policy.val_metrics["miou"] == result.refine[str(kept)]["miou"]
    assert train(sam, samples, dataclasses.replace(cfg, refine="off")).refine is None
    save_bundle(policy, tmp_path / "p.pt", sam, text="disc")
    model = AlignSAM(sam, load_bundle(tmp_path / "p.pt", sam))
    assert model.bundle.config.refine_clicks == kept
    calls: list[int] = []
    decode = sam.decode

    def spy(*args, **kwargs):
        calls.append(1)
        return decode(*args, **kwargs)

    monkeypatch.setattr(sam, "decode", spy)
    pred = model.predict([samples[0].image])[0]
    assert len(calls) == 1 + 2 + kept  # the initial pair, T=2 steps, then the SRM's clicks
    assert 0 <= pred.corrective <= kept and len(pred.points) - pred.corrective == 2 + 2  # FR counts the agent's
    calls.clear()
    model.predict([samples[0].image], labels="positive")  # w/o SRM: no map to ask, no clicks
    assert len(calls) == 1 + 2


def test_clicks_join_the_prompt_set_after_the_episode_and_need_srm_labels() -> None:
    sam = FrozenSam.from_preset("tiny", seed=0)
    samples = bright_disc_samples(4, seed=5)
    result = train(sam, samples, TrainConfig(ppo=PPOConfig(episodes=1, steps=2, epochs=1), grid=(6, 6),
                                             branch="implicit", seed=1))
    enc = encode(sam, [s.image for s in samples], masks=[s.mask for s in samples])
    srm_in = SrmInputs(sam, enc)
    env = PromptEnv(sam, enc.embeddings, enc.sizes, enc.masks, result.policy.config.env_config())
    idx = torch.arange(len(samples))
    plain = rollout(sam, env, srm_in, result.policy.agent, result.policy.srm, idx, 2)
    refined = rollout(sam, env, srm_in, result.policy.agent, result.policy.srm, idx, 2, refine=3)
    assert plain.points.shape[1] == 4 and refined.points.shape[1] == 7
    assert torch.equal(refined.points[:, :4], plain.points)  # the episode itself is unchanged
    assert set(refined.labels[:, 4:].flatten().tolist()) <= {-1, 0, 1}
    assert refined.foreground_rate is not None and torch.equal(refined.foreground_rate, plain.foreground_rate)
    with pytest.raises(ValueError, match="SRM labels"):
        rollout(sam, env, srm_in, result.policy.agent, result.policy.srm, idx, 2, labels="positive", refine=1)


@pytest.mark.parametrize("config", [{"refine_clicks": 10**6}, {"refine_clicks": -1}, {"refine_clicks": "3"},
                                    {"refine_clicks": True}, {"no_such_setting": 1}])
def test_a_bundle_asking_for_an_unreadable_click_count_is_refused(tmp_path, config: dict) -> None:
    sam = FrozenSam.from_preset("tiny", seed=0)
    result = train(sam, bright_disc_samples(4, seed=5), TrainConfig(ppo=PPOConfig(episodes=1, steps=2, epochs=1),
                                                                    grid=(6, 6), branch="implicit", seed=1))
    path = tmp_path / "p.pt"
    save_bundle(result.policy, path, sam, text="disc")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    payload["meta"]["config"].update(config)
    torch.save(payload, path)
    with pytest.raises(BundleError):
        load_bundle(path, sam)


def test_per_instance_prompts_get_as_many_clicks_on_their_union(monkeypatch, tmp_path) -> None:
    """With per-instance prompts the same count goes to :func:`alignsam.instances.refine_instances` (after the split,
    before the filter) unless given apart, and the ablations without an SRM get none."""
    predict_module = importlib.import_module("alignsam.predict")
    seen: list[int] = []
    real = predict_module.refine_instances

    def spy(sam, embeddings, sizes, srm_logits, valid, results, clicks):
        seen.append(clicks)
        return real(sam, embeddings, sizes, srm_logits, valid, results, clicks)

    monkeypatch.setattr(predict_module, "refine_instances", spy)
    sam = FrozenSam.from_preset("tiny", seed=0)
    samples = bright_disc_samples(4, seed=5)
    result = train(sam, samples, TrainConfig(ppo=PPOConfig(episodes=1, steps=2, epochs=1), grid=(6, 6),
                                             branch="implicit", seed=1))
    save_bundle(result.policy, tmp_path / "p.pt", sam, text="disc")
    model = AlignSAM(sam, load_bundle(tmp_path / "p.pt", sam))
    images = [s.image for s in samples[:2]]
    model.predict(images, instances=True, refine=2)
    model.predict(images, instances=True, refine=2, instance_refine=0)
    model.predict(images, instances=True, refine=0)
    model.predict(images, instances=False, refine=2)  # one mask: no split, no per-instance clicks
    assert seen == [2, 0, 0]
    with pytest.raises(ValueError, match="SRM labels"):
        model.predict(images, instances=True, labels="positive", instance_refine=1)
