"""The action grid chosen per label by validation (TrainConfig.grids): every branch trained on every grid, the best
(branch, grid) kept, the kept grid in the bundle and at inference, the settings and CLI forms of the choice."""

from __future__ import annotations

import dataclasses
import json

import pytest

from alignsam.bundle import load_bundle, save_bundle
from alignsam.errors import DataError
from alignsam.policy import TrainConfig
from alignsam.ppo import PPOConfig
from alignsam.predict import AlignSAM
from alignsam.sam import FrozenSam
from alignsam.train import Progress, action_grids, candidate_name, train
from ml_backend.settings import Settings, parse_grids
from tests.helpers import bright_disc_samples


def test_every_branch_is_trained_on_every_grid_and_the_best_validating_pair_is_kept(tmp_path) -> None:
    sam = FrozenSam.from_preset("tiny", seed=0)
    samples = bright_disc_samples(6, seed=2)
    base = TrainConfig(ppo=PPOConfig(episodes=2, steps=2, epochs=2), grid=(6, 6), branch="implicit", seed=3)
    reports: list[Progress] = []
    result = train(sam, samples, dataclasses.replace(base, grids=((9, 9), (6, 6))), callback=reports.append)
    assert list(result.candidates) == ["implicit", "implicit 9x9"]  # the duplicate grid is trained once
    assert list(result.histories) == list(result.candidates)
    assert {r["branch"] for r in result.histories["implicit 9x9"]} == {"implicit 9x9"}
    assert {p.branch for p in reports if p.stage == "training"} == {"implicit", "implicit 9x9"}
    best = max(result.candidates, key=lambda k: result.candidates[k]["miou"])
    assert result.chosen == best
    assert result.policy.val_metrics["miou"] == result.candidates[best]["miou"]
    kept = (9, 9) if best == "implicit 9x9" else (6, 6)
    assert result.policy.config.grid == kept and result.policy.config.grids == ()
    assert result.policy.agent.num_actions == kept[0] * kept[1]
    # The reference grid alone gives the same policy as before grids existed (same seed, same candidate).
    alone = train(sam, samples, base)
    assert alone.candidates["implicit"]["miou"] == result.candidates["implicit"]["miou"]
    assert alone.chosen == "implicit"
    # The 9x9 policy round-trips through a bundle and predicts on its own grid.
    cfg9 = dataclasses.replace(base, grid=(9, 9))
    nine = train(sam, samples, cfg9).policy
    meta = save_bundle(nine, tmp_path / "p.pt", sam, text="disc")
    assert meta["grid"] == [9, 9]
    bundle = load_bundle(tmp_path / "p.pt", sam)
    assert bundle.config.grid == (9, 9)
    preds = AlignSAM(sam, bundle).predict([s.image for s in samples[:2]])
    assert all(len(p.points) >= 1 and p.mask.shape == samples[0].mask.shape for p in preds)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg9.to_dict()))) == cfg9
    with_grids = dataclasses.replace(base, grids=((9, 9),))
    assert TrainConfig.from_dict(json.loads(json.dumps(with_grids.to_dict()))) == with_grids


def test_candidate_names_and_bad_grids() -> None:
    assert candidate_name("explicit", (10, 10), (10, 10)) == "explicit"
    assert candidate_name("explicit", (16, 16), (10, 10)) == "explicit 16x16"
    assert action_grids(TrainConfig(grids=((16, 16), (10, 10)))) == [(10, 10), (16, 16)]
    for bad in (((0, 4),), ((4,),), ((4.5, 4),)):
        with pytest.raises(DataError, match="two positive integers"):
            action_grids(TrainConfig(grids=bad))  # type: ignore[arg-type]


def test_train_grids_setting_parses_and_rejects_clearly() -> None:
    assert parse_grids(" 10x10, 16X16,10x10") == [(10, 10), (16, 16)]
    settings = Settings(train_grids="16x16,10x10")
    assert settings.train_grids == "16x16,10x10" and settings.train_grid_list == [(16, 16), (10, 10)]
    assert Settings().train_grid_list == [(10, 10), (16, 16)]  # the default: the paper's grid and a finer one
    for bad in ("", ",", "10", "10x", "1x10", "10x33", "axb", "-1x3", "10x10x10"):
        with pytest.raises(ValueError, match="TRAIN_GRIDS"):
            Settings(train_grids=bad)


def test_the_workers_training_config_takes_the_grids_from_the_settings() -> None:
    from workers.jobs import train_config

    cfg = train_config(Settings(train_grids="10x10,16x16"))
    assert cfg.grid == (10, 10) and cfg.grids == ((16, 16),)
    assert train_config(Settings(train_grids="10x10")).grids == ()


def test_the_cli_takes_grids(tmp_path) -> None:
    from alignsam.cli import build_parser

    args = build_parser().parse_args(["train", "--images", "i", "--masks", "m", "--prompt", "p", "--out", "o.pt",
                                      "--grids", "10x10", "16x16"])
    assert args.grids == [(10, 10), (16, 16)]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--images", "i", "--masks", "m", "--prompt", "p", "--out", "o.pt",
                                   "--grids", "16"])


def test_with_instances_every_candidate_is_validated_in_each_mode_and_the_best_kept_mode_wins() -> None:
    sam = FrozenSam.from_preset("tiny", seed=0)
    samples = bright_disc_samples(6, seed=2)
    cfg = TrainConfig(ppo=PPOConfig(episodes=2, steps=2, epochs=2), grid=(6, 6), grids=((9, 9),), branch="implicit",
                      seed=3, instances="auto")
    result = train(sam, samples, cfg)
    assert set(result.instance_candidates) == {"implicit", "implicit 9x9"}
    assert all(set(m) == {"points", "box"} for m in result.instance_candidates.values())

    def kept_score(name: str) -> float:  # what the candidate validates at in the mode it would keep
        one = result.candidates[name]["miou"]
        split = max(m["miou"] for m in result.instance_candidates[name].values())
        return split if split >= one + 0.01 else one

    assert result.chosen == max(result.candidates, key=kept_score)
    assert result.policy.val_metrics["miou"] == kept_score(result.chosen)


@pytest.mark.parametrize(("margin", "kept_on"), [(-1.0, True), (1.0, False)])
def test_mask_feedback_is_validated_and_kept_only_when_it_validates_better(monkeypatch, tmp_path, margin: float,
                                                                           kept_on: bool) -> None:
    import importlib

    train_module = importlib.import_module("alignsam.train")  # the package's ``train`` attribute is the function
    monkeypatch.setattr(train_module, "INSTANCE_MARGIN", margin)  # -1: any score wins; 1: none can
    sam = FrozenSam.from_preset("tiny", seed=0)
    samples = bright_disc_samples(6, seed=2)
    cfg = TrainConfig(ppo=PPOConfig(episodes=1, steps=2, epochs=1), grid=(6, 6), branch="implicit", seed=3,
                      mask_feedback="auto")
    result = train(sam, samples, cfg)
    assert set(result.mask_feedback or {}) == {"off", "on"}
    assert all(0.0 <= m["miou"] <= 1.0 for m in result.mask_feedback.values())
    policy = result.policy
    assert policy.config.use_mask_input is kept_on
    assert policy.val_metrics["miou"] == result.mask_feedback["on" if kept_on else "off"]["miou"]
    assert train(sam, samples, dataclasses.replace(cfg, mask_feedback="off")).mask_feedback is None
    # Inference follows the kept setting: SAM gets the previous low-res logits back from the second step on.
    save_bundle(policy, tmp_path / "p.pt", sam, text="disc")
    model = AlignSAM(sam, load_bundle(tmp_path / "p.pt", sam))
    fed_back: list[bool] = []
    decode = sam.decode

    def spy(*args, **kwargs):
        fed_back.append(kwargs.get("mask_input") is not None)
        return decode(*args, **kwargs)

    monkeypatch.setattr(sam, "decode", spy)
    model.predict([samples[0].image])
    assert any(fed_back) is kept_on
