"""`lineinspect distill`: the student moves towards its teacher and is saved as a normal model directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lineinspect.service.cli import main
from lineinspect.training.datasets import open_dataset
from lineinspect.training.defects import DEFECT_TYPES
from lineinspect.training.distill import distill_terms, teacher_logits
from lineinspect.training.synth import write_synthetic_dataset
from lineinspect.training.train_defect import TrainConfig, Trainer
from lineinspect.vision.defect_model import DefectModel, DefectModelConfig
from lineinspect.vision.encoder import preset
from lineinspect.vision.heads import HeadConfig
from lineinspect.vision.inspector import Calibration
from lineinspect.vision.model_io import load_inspector, load_model_dir, save_model_dir
from lineinspect.vision.preprocess import to_batch


@pytest.fixture(scope="module")
def line(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("line") / "metal"
    write_synthetic_dataset(root, n=16, seed=1, surface="metal", size=64)
    return root


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A teacher (at another input size than the student) whose opinion the labels do not share: every image
    good (p = 0.05), every pixel defect (p = 0.88). Only distillation pulls a student towards it; with
    --distill-weight 0 the test's student ended further from it than at init (summed KL 0.75 -> 1.29)."""
    torch.manual_seed(1)
    model = DefectModel(DefectModelConfig(preset("tiny", img_size=96), HeadConfig(num_classes=len(DEFECT_TYPES)),
                                          memory_bank_size=64))
    with torch.no_grad():
        model.head.image_out[-1].bias.fill_(-3.0)
        model.head.mask_out.bias.fill_(2.0)
    return save_model_dir(tmp_path_factory.mktemp("models") / "teacher", model, Calibration(class_names=DEFECT_TYPES))


@torch.no_grad()
def disagreement(student: DefectModel, teacher: DefectModel, images: torch.Tensor) -> float:
    """Summed distillation terms (mask, image, class KL) of the student from the teacher."""
    student.eval()
    terms = distill_terms(student.logits(images), teacher_logits(teacher.eval(), images), classes=True)
    return float(sum(terms.values()))


def test_distilled_student_agrees_with_teacher_more_than_at_init(line, teacher, tmp_path) -> None:
    dataset = open_dataset(line)
    images = to_batch([s.load_image() for s in dataset.test], 64, torch.device("cpu"))
    teacher_model = load_model_dir(teacher)[0]
    # The student `distill` starts from: same preset, input size and seed.
    init = Trainer(TrainConfig(preset="tiny", img_size=64, seed=0), dataset, tmp_path / "unused").model
    before = disagreement(init, teacher_model, images)

    out = tmp_path / "student"
    assert main(["distill", "--teacher", str(teacher), "--data", str(line), "--preset", "tiny", "--img-size", "64",
                 "--steps", "8", "--batch-size", "4", "--distill-weight", "3", "--out", str(out)]) == 0
    after = disagreement(load_model_dir(out)[0], teacher_model, images)
    assert after < 0.8 * before, (before, after)

    config = json.loads((out / "config.json").read_text())
    assert config["distillation"]["teacher"] == str(teacher) and config["distillation"]["weight"] == 3.0
    frames = [np.random.default_rng(i).integers(0, 256, (64, 80, 3), dtype=np.uint8) for i in range(2)]
    assert len(load_inspector(out).inspect_batch(frames, heatmaps=True)) == 2


def test_distill_with_a_missing_teacher_fails_clearly(line, tmp_path, capsys) -> None:
    out = tmp_path / "student"
    assert main(["distill", "--teacher", str(tmp_path / "nowhere"), "--data", str(line), "--preset", "tiny",
                 "--out", str(out)]) == 2
    assert "nowhere: model directory not found" in capsys.readouterr().err
    assert not out.exists()
