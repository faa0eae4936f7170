"""The `alignsam` command line: train -> predict -> eval on folders, and its error messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alignsam.cli import main
from tests.helpers import bright_disc_samples

TINY = ["--sam-preset", "tiny", "--clip-preset", "tiny", "--device", "cpu"]


def _write(folder: Path, samples, masks: bool = True) -> tuple[Path, Path]:
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir(parents=True)
    for s in samples:
        Image.fromarray(s.image).save(folder / "images" / f"{s.name}.png")
        if masks:
            Image.fromarray((s.mask * 255).astype(np.uint8)).save(folder / "masks" / f"{s.name}.png")
    return folder / "images", folder / "masks"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    images, masks = _write(root / "train", bright_disc_samples(5, seed=0))
    out = root / "disc.pt"
    code = main(["train", "--images", str(images), "--masks", str(masks), "--prompt", "bright disc",
                 "--out", str(out), "--episodes", "2", "--steps", "3", "--branch", "auto", *TINY])
    assert code == 0 and out.is_file() and out.with_suffix(".json").is_file()
    return out


def test_train_writes_a_bundle_with_metadata(bundle):
    meta = json.loads(bundle.with_suffix(".json").read_text())
    assert meta["text"] == "bright disc" and meta["steps"] == 3 and meta["sam_preset"] == "tiny"
    assert meta["branch"] in ("implicit", "explicit") and meta["train_samples"] == 4  # one held out


def test_predict_writes_masks_and_overlays(bundle, tmp_path):
    images, _ = _write(tmp_path / "test", bright_disc_samples(3, seed=50), masks=False)
    out = tmp_path / "pred"
    assert main(["predict", "--bundle", str(bundle), "--images", str(images), "--out", str(out), *TINY]) == 0
    for s in bright_disc_samples(3, seed=50):
        mask = np.asarray(Image.open(out / f"{s.name}.png"))
        assert mask.shape == s.mask.shape and set(np.unique(mask)) <= {0, 255}
        assert np.asarray(Image.open(out / f"{s.name}.overlay.png")).shape == s.image.shape
    summary = json.loads((out / "predictions.json").read_text())
    assert [row["image"] for row in summary] == sorted(s.name for s in bright_disc_samples(3, seed=50))


def test_eval_prints_the_table_with_ablations(bundle, tmp_path, capsys):
    images, masks = _write(tmp_path / "test", bright_disc_samples(3, seed=60))
    report = tmp_path / "eval.json"
    assert main(["eval", "--bundle", str(bundle), "--images", str(images), "--masks", str(masks),
                 "--ablations", "--json", str(report), *TINY]) == 0
    out = capsys.readouterr().out
    for row in ("AlignSAM", "w/o RL", "w/o SRM", "w/o multi-step"):
        assert f"| {row} |" in out
    table = json.loads(report.read_text())
    assert set(table) == {"AlignSAM", "w/o RL", "w/o SRM", "w/o multi-step"}
    assert all(0.0 <= table[r]["miou"] <= 1.0 and 0.0 <= table[r]["fr"] <= 1.0 for r in table)


def _error(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    return lines[0]


def test_user_errors_are_one_readable_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["train", "--prompt", "x", "--out", str(tmp_path / "o.pt"), *TINY]
    assert "no images" in _error(capsys, [*base, "--images", str(empty), "--masks", str(empty)])
    assert "not a folder" in _error(capsys, [*base, "--images", str(tmp_path / "nope"), "--masks", str(empty)])

    samples = bright_disc_samples(2, seed=1)
    images, masks = _write(tmp_path / "a", samples)
    (masks / f"{samples[0].name}.png").unlink()
    assert "no partner" in _error(capsys, [*base, "--images", str(images), "--masks", str(masks)])

    images, masks = _write(tmp_path / "b", samples)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(masks / f"{samples[0].name}.png")
    assert "is (10, 10) but its image is (128, 128)" in _error(capsys, [*base, "--images", str(images), "--masks", str(masks)])

    images, masks = _write(tmp_path / "c", samples)
    (images / f"{samples[1].name}.png").write_bytes(b"not a png")
    assert "cannot read image" in _error(capsys, [*base, "--images", str(images), "--masks", str(masks)])

    images, masks = _write(tmp_path / "d", samples)
    missing = tmp_path / "sam_vit_b.pth"
    msg = _error(capsys, [*base, "--images", str(images), "--masks", str(masks), "--sam-checkpoint", str(missing)])
    assert str(missing) in msg


def test_missing_bundle_is_one_readable_line(tmp_path, capsys):
    assert "cannot read bundle metadata" in _error(
        capsys, ["predict", "--bundle", str(tmp_path / "none.pt"), "--images", str(tmp_path), "--out", str(tmp_path)]
    )


def test_console_script_lists_presets():
    exe = Path(sys.executable).with_name("alignsam")
    res = subprocess.run([str(exe), "presets"], capture_output=True, text=True, timeout=120, check=True)
    assert "vit_b" in res.stdout and "93,735,472" in res.stdout


def test_eval_without_data_or_with_an_unknown_task_is_one_readable_line(capsys):
    assert "eval needs --bundle, --images, --masks" in _error(capsys, ["eval"])
    assert "unknown task family 'nope'" in _error(capsys, ["eval", "--synthetic", "nope"])
    assert "needs a category" in _error(capsys, ["eval", "--synthetic", "semantic"])


def test_eval_synthetic_trains_and_prints_the_full_table(tmp_path, capsys):
    out = tmp_path / "q.json"
    code = main(["eval", "--synthetic", "saliency", "--train", "6", "--test", "3", "--episodes", "1",
                 "--sam-preset", "tiny", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    for row in ("AlignSAM", "w/o RL", "w/o SRM", "w/o multi-step", "PerSAM-style", "oracle clicker"):
        assert f"| {row} |" in printed
    report = json.loads(out.read_text())
    assert report["saliency"]["n_test"] == 3 and 0.0 <= report["saliency"]["table"]["AlignSAM"]["miou"] <= 1.0
