"""`lineinspect calibrate`: the threshold for a false-reject rate on a folder of good parts."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from lineinspect.service.cli import main
from lineinspect.training.recalibrate import best_source, compare_sources, score_images, score_sources
from lineinspect.vision.inspector import Calibration
from lineinspect.vision.model_io import load_inspector, read_model_config, save_model_dir, untrained_inspector


def write_images(folder: Path, n: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    (folder / "sub").mkdir(parents=True)
    paths = []
    for i in range(n):
        image = cv2.GaussianBlur(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), (5, 5), rng.uniform(0.5, 3))
        path = folder / ("sub" if i % 2 else "") / f"{i:03d}.png"
        cv2.imwrite(str(path), image)
        paths.append(path)
    return paths


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    return save_model_dir(tmp_path / "model", untrained_inspector("tiny").model, Calibration(threshold=0.5))


def test_calibrate_sets_the_threshold_for_the_false_reject_rate(model_dir: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    good = write_images(tmp_path / "good", 20, seed=0)
    write_images(tmp_path / "defects", 4, seed=1)
    assert main(["calibrate", "--model", str(model_dir), "--good", str(tmp_path / "good"),
                 "--defects", str(tmp_path / "defects"), "--target-frr", "0.1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    calibration = load_inspector(model_dir).calibration
    assert calibration.score_source == result["new_source"] and result["old_source"] == "head"
    assert set(result["sources"]) == {"image", "map", "head", "novelty", "fused"}  # no memory bank fitted: no memory
    scores = np.sort(score_images(load_inspector(model_dir), good))  # as served with the new source; subfolders too
    threshold = calibration.threshold
    assert threshold == pytest.approx(result["new_threshold"], abs=1e-5) and result["written"]
    assert (scores >= threshold).sum() == 2 and scores[-3] < threshold  # floor(0.1 * 20) rejected
    assert result["n_good"] == 20 and result["n_defect"] == 4 and result["frr_at_new"] == pytest.approx(0.1)
    assert result["old_threshold"] == 0.5 and result["recall_at_new"] is not None
    notes = read_model_config(model_dir)["calibration"]["notes"]["recalibrated"]
    assert notes["new_threshold"] == result["new_threshold"] and notes["target_frr"] == 0.1


def test_a_dry_run_writes_nothing(model_dir: Path, tmp_path: Path) -> None:
    write_images(tmp_path / "good", 6, seed=0)
    before = (model_dir / "config.json").read_bytes()
    assert main(["calibrate", "--model", str(model_dir), "--good", str(tmp_path / "good"), "--dry-run"]) == 0
    assert (model_dir / "config.json").read_bytes() == before


def test_bad_inputs_are_named(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["calibrate", "--model", str(model_dir), "--good", str(tmp_path / "empty")]) == 2
    assert "no images" in capsys.readouterr().err
    write_images(tmp_path / "good", 3, seed=0)
    (tmp_path / "good" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["calibrate", "--model", str(model_dir), "--good", str(tmp_path / "good")]) == 2
    assert "broken.png" in capsys.readouterr().err
    (tmp_path / "good" / "broken.png").unlink()
    assert main(["calibrate", "--model", str(model_dir), "--good", str(tmp_path / "good"), "--target-frr", "1.5"]) == 2
    assert "--target-frr" in capsys.readouterr().err


def test_labelled_defects_choose_the_source_that_catches_them() -> None:
    rng = np.random.default_rng(0)
    good = {"head": rng.uniform(0.0, 1.0, 200), "fused": rng.uniform(0.0, 0.5, 200)}
    defects = {"head": rng.uniform(0.0, 1.0, 8), "fused": rng.uniform(0.6, 1.0, 8)}  # head: chance
    figures = compare_sources(good, defects, target_frr=0.04)
    assert figures["fused"] == {"recall": 1.0, "auroc": 1.0} and figures["head"]["recall"] < 0.5
    assert best_source(figures, current="head") == "fused"
    tie = {"head": {"recall": 1.0, "auroc": 1.0}, "fused": {"recall": 1.0, "auroc": 1.0}}
    assert best_source(tie, current="head") == "head"  # nothing to gain: the source in use stays
    noisy = {**tie, "head": {"recall": 0.6, "auroc": 0.9}, "novelty": {"recall": 1.0, "auroc": 1.0}}
    assert best_source(noisy, current="head") == "fused"  # components alone are not candidates
    assert best_source(noisy, current="novelty") == "novelty"  # but the source in use is
    statistics = {"head": {"recall": 0.2, "auroc": 0.7}, "fused": {"recall": 0.4, "auroc": 0.9},
                  "regions": {"recall": 0.9, "auroc": 0.97}}
    assert best_source(statistics, current="fused") == "regions"  # the region statistics alone are a candidate


def test_keep_source_sets_only_the_threshold(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_images(tmp_path / "good", 10, seed=0)
    write_images(tmp_path / "defects", 3, seed=1)
    assert main(["calibrate", "--model", str(model_dir), "--good", str(tmp_path / "good"),
                 "--defects", str(tmp_path / "defects"), "--keep-source"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["new_source"] == result["old_source"] == "head" and result["sources"]
    assert load_inspector(model_dir).calibration.score_source == "head"


def test_too_few_defects_leave_the_source_and_say_so(model_dir: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    write_images(tmp_path / "good", 10, seed=0)
    write_images(tmp_path / "defects", 2, seed=1)
    assert main(["calibrate", "--model", str(model_dir), "--good", str(tmp_path / "good"),
                 "--defects", str(tmp_path / "defects"), "--dry-run"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["new_source"] == "head" and result["sources"] and "too few" in captured.err


def test_good_parts_the_model_trained_on_are_pointed_out(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    line = tmp_path / "line"
    model_dir = save_model_dir(tmp_path / "m", untrained_inspector("tiny").model, Calibration(),
                               extra={"data": {"root": str(line), "layout": "mvtec"}})
    write_images(line / "train" / "good", 6, seed=0)
    assert main(["calibrate", "--model", str(model_dir), "--good", str(line / "train" / "good"), "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["n_good_from_training"] == 6
    assert "training data" in captured.err
    write_images(tmp_path / "new", 4, seed=1)
    assert main(["calibrate", "--model", str(model_dir), "--good", str(tmp_path / "new"), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n_good_from_training"] == 0


def test_sources_are_scored_alike_from_files_and_decoded_images(model_dir: Path, tmp_path: Path) -> None:
    paths = write_images(tmp_path / "good", 5, seed=2)
    inspector = load_inspector(model_dir)
    from_files = score_sources(inspector, paths, batch_size=2)
    from_images = score_sources(inspector, [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths])
    assert from_files.keys() == from_images.keys() and len(from_files["head"]) == 5
    assert all(np.allclose(from_files[k], from_images[k], atol=1e-5) for k in from_files)
