"""The fast defect path end to end: RGB frames in, Inspection verdicts out.

An Inspector owns a DefectModel on one device plus the calibration chosen on validation data
(which score to trust, its threshold, the pixel threshold for boxes). It is the one object the
CLI, the batch audit and the gRPC engine call; it holds no per-request state.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from lineinspect import __version__
from lineinspect.vision.defect_model import DefectModel, DefectOutput
from lineinspect.vision.postprocess import boxes_from_map, scale_boxes, upsample_map
from lineinspect.vision.preprocess import to_batch
from lineinspect.vision.result import Box, Inspection

SCORE_SOURCES = ("image", "map", "head", "memory", "novelty", "fused")


@dataclass(frozen=True)
class Calibration:
    score_source: str = "head"  # which image score decides (chosen on validation)
    threshold: float = 0.5  # image score >= threshold -> defect
    pixel_threshold: float = 0.5  # anomaly map >= this -> defect region (boxes)
    memory_mean: float = 0.0  # good-image statistics of the memory bank's peak distance
    memory_std: float = 1.0
    novelty_mean: float = 1.0  # good-image statistics of the peak self-similarity novelty
    novelty_std: float = 1.0
    min_box_area: float = 0.0005  # fraction of the image; smaller regions are not boxed
    seed_fraction: float = 0.45  # defect cores: pixel threshold + this share of the way to 1
    class_names: tuple[str, ...] = ()
    notes: dict = field(default_factory=dict)  # validation figures behind the choice

    def to_dict(self) -> dict:
        d = asdict(self)
        d["class_names"] = list(self.class_names)
        return d

    @property
    def seed_threshold(self) -> float:
        """Map level of a defect's core: regions holding several cores get a box per core."""
        return self.pixel_threshold + self.seed_fraction * (1.0 - self.pixel_threshold)

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        data = dict(data)
        data["class_names"] = tuple(data.get("class_names", ()))
        return cls(**data)


def image_scores(out: DefectOutput, cal: Calibration) -> dict[str, torch.Tensor]:
    """Every candidate image score (B,) for this output; all in [0, 1]."""
    head = 0.5 * (out.map_score + out.image_prob)
    scores = {"image": out.image_prob, "map": out.map_score, "head": head}
    # Unbounded peaks become probabilities by their good-image statistics: 2 sigma above the
    # good images' mean is even odds.
    if out.memory_map is not None:
        peak = out.memory_map.flatten(1).amax(1)
        scores["memory"] = torch.sigmoid((peak - cal.memory_mean) / max(cal.memory_std, 1e-6) - 2.0)
    if out.novelty_score is not None:
        scores["novelty"] = torch.sigmoid((out.novelty_score - cal.novelty_mean) / max(cal.novelty_std, 1e-6) - 2.0)
    extra = [scores[k] for k in ("memory", "novelty") if k in scores]
    if extra:
        scores["fused"] = (head + sum(extra)) / (1 + len(extra))
    return scores


class Inspector:
    def __init__(self, model: DefectModel, calibration: Calibration, device: torch.device | str = "cpu",
                 preset: str | None = None) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.calibration = calibration
        self.preset = preset or model.config.encoder.preset
        self.input_size = model.config.encoder.img_size
        # bf16 on GPUs: the encoder's matmuls dominate and bf16 halves their cost.
        self.autocast_dtype = torch.bfloat16 if self.device.type == "cuda" else None

    @property
    def threshold(self) -> float:
        return self.calibration.threshold

    @property
    def class_names(self) -> list[str]:
        return list(self.calibration.class_names)

    def info(self) -> dict:
        return {
            "preset": self.preset,
            "version": __version__,
            "threshold": self.threshold,
            "score_source": self.calibration.score_source,
            "device": str(self.device),
            "class_names": self.class_names,
            "input_size": self.input_size,
            "params": sum(p.numel() for p in self.model.parameters()),
        }

    def boxes(self, small_map: np.ndarray, label: str, width: int, height: int) -> list[Box]:
        """Boxes found on the model-resolution map, in input pixels (cheaper than at full size)."""
        cal = self.calibration
        size = small_map.shape[0]
        found = boxes_from_map(small_map, cal.pixel_threshold, min_area=max(4, int(cal.min_box_area * size * size)),
                               label=label, seed_threshold=cal.seed_threshold)
        return scale_boxes(found, width / small_map.shape[1], height / size, width, height)

    @torch.inference_mode()
    def run_model(self, batch: torch.Tensor) -> DefectOutput:
        """batch (B,3,S,S) float [0,1] on the device -> raw model output."""
        use_memory = self.calibration.score_source in ("memory", "fused")
        if self.autocast_dtype is not None:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                return self.model(batch, use_memory=use_memory)
        return self.model(batch, use_memory=use_memory)

    def inspect_batch(self, images: list[np.ndarray], heatmaps: list[bool] | bool = False) -> list[Inspection]:
        """RGB uint8 (H,W,3) images of any size -> one Inspection each (boxes in input pixels)."""
        if not images:
            return []
        want = heatmaps if isinstance(heatmaps, list) else [heatmaps] * len(images)
        t0 = time.perf_counter()
        batch = to_batch(images, self.input_size, self.device)
        out = self.run_model(batch)
        cal = self.calibration
        score = image_scores(out, cal)[cal.score_source].float().cpu().numpy()
        maps = out.anomaly_map[:, 0].float().cpu().numpy()  # (B, S, S)
        probs = (torch.softmax(out.class_logits.float(), 1).cpu().numpy()
                 if out.class_logits is not None and cal.class_names else None)
        t1 = time.perf_counter()
        results = []
        for i, image in enumerate(images):
            h, w = image.shape[:2]
            is_defect = bool(score[i] >= cal.threshold)
            cls_name, cls_prob = "", 0.0
            if probs is not None:
                k = int(probs[i].argmax())
                cls_name, cls_prob = cal.class_names[k], float(probs[i, k])
            heat = upsample_map(maps[i], h, w) if want[i] else None
            boxes = self.boxes(maps[i], cls_name, w, h) if is_defect else []
            results.append(Inspection(
                score=float(score[i]), is_defect=is_defect, threshold=cal.threshold,
                defect_class=cls_name if is_defect else "", class_prob=cls_prob if is_defect else 0.0,
                boxes=boxes, heatmap=heat if want[i] else None,
            ))
        t2 = time.perf_counter()
        per_image_model = (t1 - t0) * 1000 / len(images)
        for r in results:
            r.timings_ms.update(model=per_image_model, post=(t2 - t1) * 1000 / len(images))
        return results
