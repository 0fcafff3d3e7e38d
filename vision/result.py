"""What the fast defect path returns for one image, in input-image pixels."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Box:
    x0: int  # inclusive pixel bounds in the input image
    y0: int
    x1: int  # exclusive
    y1: int
    score: float  # peak anomaly value inside the region, [0, 1]
    label: str = ""  # defect class of the region ("" when unknown)

    def to_dict(self) -> dict:
        return {"x0": self.x0, "y0": self.y0, "x1": self.x1, "y1": self.y1, "score": round(self.score, 4),
                "label": self.label}


@dataclass
class Inspection:
    score: float  # image anomaly score, calibrated so that `threshold` separates good from defect
    is_defect: bool
    threshold: float
    defect_class: str  # "" when the model has no classes or the image is good
    class_prob: float
    boxes: list[Box] = field(default_factory=list)
    heatmap: np.ndarray | None = None  # (H, W) float32 in [0, 1], input resolution
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "score": round(self.score, 5),
            "verdict": "defect" if self.is_defect else "good",
            "threshold": round(self.threshold, 5),
            "defect_class": self.defect_class,
            "class_prob": round(self.class_prob, 4),
            "boxes": [b.to_dict() for b in self.boxes],
        }
