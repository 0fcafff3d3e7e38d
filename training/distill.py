"""Distillation: train a student DefectModel on a line while it matches a trained teacher.

The student trains as `lineinspect train` trains a model (`Trainer`: synthetic defects pasted on
the line's good images, then the memory bank and calibration, so the result is a normal model
directory). In the defect phase the frozen teacher sees the same pasted batch (resized to its own
input size) and the loss adds how far the student's outputs are from the teacher's:

* mask: binary KL of the per-pixel defect probabilities, the teacher's logits resized to the student's;
* image: binary KL of the image-level defect probability;
* class: KL of the class distributions, when both models name the same classes.

Feature matching of patch tokens is left out: student and teacher widths differ, so it needs a
trained projection outside the model, and the head's logits do not expose the encoder's tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lineinspect.training.datasets import Dataset
from lineinspect.training.train_defect import TrainConfig, Trainer
from lineinspect.vision.defect_model import DefectModel
from lineinspect.vision.heads import HeadOutput
from lineinspect.vision.model_io import load_model_dir


def binary_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) of Bernoulli outputs given as logits (0 when they agree)."""
    s, t = student_logits.float(), teacher_logits.float()
    p = torch.sigmoid(t)
    return F.binary_cross_entropy_with_logits(s, p) - F.binary_cross_entropy_with_logits(t, p)


@torch.no_grad()
def teacher_logits(teacher: DefectModel, images: torch.Tensor) -> HeadOutput:
    """The teacher's logits for images (B,3,S,S) in [0,1] of any size (resized to the teacher's input)."""
    size = teacher.config.encoder.img_size
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return teacher.logits(images)


def distill_terms(student: HeadOutput, teacher: HeadOutput, classes: bool) -> dict[str, torch.Tensor]:
    """The distillation losses of `student` against `teacher` (see the module docstring)."""
    t_mask = F.interpolate(teacher.mask_logits.float(), size=student.mask_logits.shape[-2:], mode="bilinear")
    terms = {"kd_mask": binary_kl(student.mask_logits, t_mask),
             "kd_img": binary_kl(student.image_logit, teacher.image_logit)}
    if classes and student.class_logits is not None and teacher.class_logits is not None:
        terms["kd_cls"] = F.kl_div(F.log_softmax(student.class_logits.float(), 1),
                                   F.log_softmax(teacher.class_logits.float(), 1), log_target=True,
                                   reduction="batchmean")
    return terms


class DistillTrainer(Trainer):
    """Trainer whose defect phase adds `weight` x the distillation terms against the teacher in `teacher_dir`."""

    def __init__(self, config: TrainConfig, dataset: Dataset, out: Path, teacher_dir: Path,
                 weight: float = 1.0) -> None:
        super().__init__(config, dataset, out)
        teacher, _, teacher_config = load_model_dir(teacher_dir)
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.teacher_dir = Path(teacher_dir)
        self.weight = weight
        self.same_classes = bool(self.class_names) and teacher_config["calibration"]["class_names"] == self.class_names

    def defect_loss(self) -> tuple[torch.Tensor, dict]:
        b = self.defect_batch()
        out = self.model.logits(b.images)
        loss, parts = self.supervised_loss(out, b.masks, b.defect, b.classes)
        terms = distill_terms(out, teacher_logits(self.teacher, b.images), self.same_classes)
        parts.update({k: float(v.detach()) for k, v in terms.items()})
        return loss + self.weight * sum(terms.values()), parts

    def summary(self) -> dict:
        return {**super().summary(),
                "distillation": {"teacher": str(self.teacher_dir), "teacher_preset": self.teacher.config.encoder.preset,
                                 "weight": self.weight, "class_terms": self.same_classes}}
