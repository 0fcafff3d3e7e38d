"""Set a trained model's image threshold from the line's own good parts, without retraining.

Training chooses the threshold on the images it holds out: 20 good ones (and 20 pasted copies) for a
200-image line. On new parts the good ones that score highest carry rare normal features (a turning
centre in view, a glint) that 20 images seldom contain, so a line can reject several times more good
parts than validation showed (bench/RESULTS.md, session 19: the F1 threshold passed every validation
good part and flagged 3-10 of 50 on each held-out line). A line that has run a shift has hundreds of good
parts: their scores set the threshold for the false-reject rate the line accepts. Labelled defect
images, if given, show what that costs in recall.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lineinspect.errors import LineInspectError
from lineinspect.images import read_image
from lineinspect.training.metrics import threshold_for_false_reject_rate
from lineinspect.vision.inspector import Inspector
from lineinspect.vision.model_io import CONFIG, read_model_config


@dataclass(frozen=True)
class Recalibration:
    n_good: int
    target_frr: float
    old_threshold: float
    new_threshold: float
    frr_at_old: float  # share of the given good parts the old threshold rejects
    frr_at_new: float
    n_defect: int = 0
    recall_at_old: float | None = None  # share of the given defects each threshold catches
    recall_at_new: float | None = None

    def to_dict(self) -> dict:
        return {k: round(v, 5) if isinstance(v, float) else v for k, v in asdict(self).items()}


def score_images(inspector: Inspector, paths: Sequence[Path], batch_size: int = 16) -> np.ndarray:
    """The model's image score for each file (what its threshold is compared with)."""
    scores: list[float] = []
    for first in range(0, len(paths), batch_size):
        images = [read_image(p) for p in paths[first : first + batch_size]]
        scores += [r.score for r in inspector.inspect_batch(images)]
    return np.array(scores)


def recalibrate(inspector: Inspector, good: Sequence[Path], target_frr: float,
                defects: Sequence[Path] = ()) -> Recalibration:
    """The threshold that rejects at most floor(target_frr * n) of the n good parts given."""
    if not good:
        raise LineInspectError("calibrate: no good images given; point --good at a folder of good parts")
    if not 0.0 <= target_frr < 1.0:
        raise LineInspectError(f"calibrate: --target-frr must be in [0, 1), got {target_frr}")
    good_scores = score_images(inspector, good)
    old = inspector.calibration.threshold
    new = threshold_for_false_reject_rate(good_scores, target_frr)
    defect_scores = score_images(inspector, defects) if defects else None
    return Recalibration(
        n_good=len(good_scores), target_frr=target_frr, old_threshold=old, new_threshold=new,
        frr_at_old=float((good_scores >= old).mean()), frr_at_new=float((good_scores >= new).mean()),
        n_defect=len(defects),
        recall_at_old=None if defect_scores is None else float((defect_scores >= old).mean()),
        recall_at_new=None if defect_scores is None else float((defect_scores >= new).mean()),
    )


def write_threshold(model_dir: str | Path, result: Recalibration) -> None:
    """Store the new threshold in the model directory's config.json (atomically), with the figures
    behind it under calibration.notes.recalibrated; the weights are untouched."""
    config = read_model_config(model_dir)
    config["calibration"]["threshold"] = result.new_threshold
    config["calibration"].setdefault("notes", {})["recalibrated"] = result.to_dict()
    path = Path(model_dir) / CONFIG
    fd, tmp = tempfile.mkstemp(prefix=f".{CONFIG}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(config, f, indent=2, default=str)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
