"""Set a trained model's image threshold from the line's own good parts, without retraining.

Training chooses the threshold on the images it holds out: 20 good ones (and 20 pasted copies) for a
200-image line. On new parts the good ones that score highest carry rare normal features (a turning
centre in view, a glint) that 20 images seldom contain, so a line can reject several times more good
parts than validation showed (bench/RESULTS.md, session 19: the F1 threshold passed every validation
good part and flagged 3-10 of 50 on each held-out line). A line that has run a shift has hundreds of good
parts: their scores set the threshold for the false-reject rate the line accepts. Labelled defect
images, if given, show what that costs in recall, and choose the score source: training validates
on synthetic defects, which on real steel could not tell the learned head (image AUROC 0.79 over
four lines) from head and memory bank fused (0.86) (bench/RESULTS.md, session 23), so it serves the
fused score on such lines by default (session 25); a line's own few real defects can tell. Of the
head, the fused score and the region statistics (`CANDIDATE_SOURCES`) and the source in use, the one
catching the most of them at the line's false-reject rate wins, then the higher AUROC, then the one in use.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from lineinspect.errors import LineInspectError
from lineinspect.images import read_image
from lineinspect.training.metrics import image_auroc, threshold_for_false_reject_rate
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
    old_source: str = ""
    new_source: str = ""
    # with labelled defects: each source's recall at the false-reject rate and its AUROC
    sources: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        def rounded(v: object) -> object:
            if isinstance(v, float):
                return round(v, 5)
            return {k: rounded(x) for k, x in v.items()} if isinstance(v, dict) else v
        return {k: rounded(v) for k, v in asdict(self).items()}


def score_images(inspector: Inspector, paths: Sequence[Path], batch_size: int = 16) -> np.ndarray:
    """The model's image score for each file, as served (what its threshold is compared with)."""
    scores: list[float] = []
    for first in range(0, len(paths), batch_size):
        images = [read_image(p) for p in paths[first : first + batch_size]]
        scores += [r.score for r in inspector.inspect_batch(images)]
    return np.array(scores)


def score_sources(inspector: Inspector, paths: Sequence[Path | np.ndarray], batch_size: int = 16
                  ) -> dict[str, np.ndarray]:
    """Every candidate image score (`Inspector.source_scores`) for each file (or decoded RGB image)."""
    scores: dict[str, list[np.ndarray]] = {}
    for first in range(0, len(paths), batch_size):
        images = [p if isinstance(p, np.ndarray) else read_image(p) for p in paths[first : first + batch_size]]
        for name, values in inspector.source_scores(images).items():
            scores.setdefault(name, []).append(values)
    return {name: np.concatenate(v) for name, v in scores.items()}


def compare_sources(good: dict[str, np.ndarray], defects: dict[str, np.ndarray], target_frr: float
                    ) -> dict[str, dict[str, float]]:
    """For each score source: the share of `defects` caught at the threshold that rejects
    `target_frr` of `good`, and the image AUROC of the two sets."""
    figures = {}
    for name, g in good.items():
        d = defects[name]
        labels = np.r_[np.zeros(len(g), bool), np.ones(len(d), bool)]
        figures[name] = {"recall": float((d >= threshold_for_false_reject_rate(g, target_frr)).mean()),
                         "auroc": image_auroc(np.r_[g, d], labels)}
    return figures


# The sources `calibrate` chooses among (besides the one in use): the learned head, the fused score, and
# the region statistics alone. Choosing among all six from 5 labelled defects was noisier: on four
# real-steel lines mean image AUROC 0.845, against 0.865 from head and fused (the head alone 0.793;
# bench/source_choice.py, bench/RESULTS.md session 23). The region statistics joined in session 27: on
# eight real-steel models (four lines, two seeds) defects caught at a 4 % false-reject rate rose from
# 0.36-0.38 to 0.49-0.52 with 3-8 labelled defects (patches and scratches pick them), turned metal unchanged.
CANDIDATE_SOURCES = ("head", "fused", "regions")
# Fewer labelled defects than this show their figures but leave the source as it is: one or two
# defects would switch it on a coin toss (bench/source_choice.py measured K = 3, 5, 8).
MIN_DEFECTS_TO_CHOOSE = 3


def best_source(figures: dict[str, dict[str, float]], current: str) -> str:
    """Of `current` and the CANDIDATE_SOURCES in `figures`, the one that catches the most defects,
    then has the higher AUROC, then is `current`."""
    candidates = [n for n in figures if n in CANDIDATE_SOURCES or n == current]
    return max(candidates, key=lambda n: (figures[n]["recall"], figures[n]["auroc"], n == current))


def recalibrate(inspector: Inspector, good: Sequence[Path], target_frr: float,
                defects: Sequence[Path] = (), choose_source: bool = True) -> Recalibration:
    """The threshold that rejects at most floor(target_frr * n) of the n good parts given; with at
    least MIN_DEFECTS_TO_CHOOSE labelled defects (and `choose_source`), of the score source that
    catches the most of them."""
    if not good:
        raise LineInspectError("calibrate: no good images given; point --good at a folder of good parts")
    if not 0.0 <= target_frr < 1.0:
        raise LineInspectError(f"calibrate: --target-frr must be in [0, 1), got {target_frr}")
    old, old_source = inspector.calibration.threshold, inspector.calibration.score_source
    good_old = score_images(inspector, good)
    defect_old = score_images(inspector, defects) if defects else None
    # every source only where defects can show which to use
    figures = (compare_sources(score_sources(inspector, good), score_sources(inspector, defects), target_frr)
               if defects else {})
    choose = choose_source and len(defects) >= MIN_DEFECTS_TO_CHOOSE
    source = best_source(figures, old_source) if figures and choose else old_source
    good_new, defect_new = good_old, defect_old
    if source != old_source:  # the threshold is set on the scores as served with the new source
        inspector.calibration = replace(inspector.calibration, score_source=source)
        good_new, defect_new = score_images(inspector, good), score_images(inspector, defects)
    new = threshold_for_false_reject_rate(good_new, target_frr)
    return Recalibration(
        n_good=len(good_new), target_frr=target_frr, old_threshold=old, new_threshold=new,
        frr_at_old=float((good_old >= old).mean()), frr_at_new=float((good_new >= new).mean()),
        n_defect=len(defects),
        recall_at_old=None if defect_old is None else float((defect_old >= old).mean()),
        recall_at_new=None if defect_new is None else float((defect_new >= new).mean()),
        old_source=old_source, new_source=source, sources=figures,
    )


def write_threshold(model_dir: str | Path, result: Recalibration) -> None:
    """Store the new threshold and score source in the model directory's config.json (atomically), with the figures
    behind it under calibration.notes.recalibrated; the weights are untouched."""
    config = read_model_config(model_dir)
    config["calibration"]["threshold"] = result.new_threshold
    if result.new_source:
        config["calibration"]["score_source"] = result.new_source
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
