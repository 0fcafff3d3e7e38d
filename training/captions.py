"""Captions and question-answer pairs from labels, and the labelled images they describe.

Labels come from every data source the project reads:

* synthetic sets (``defects.jsonl``: type, location, size, severity per test image);
* Pascal VOC / NEU-DET (classes and boxes: the location words are the 3x3-grid cells of the box
  centres, the count is the number of boxes, "two regions");
* MVTec layout (the folder name is the type; location and size come from the mask geometry);
* good images ("no defect", "the surface is clean", ...);
* an optional user captions file (JSON lines ``{"image": path, "text": ...}``), used as reports.

Training images for the language stages come from the TRAIN split. Synthetic sets and other
good-only training folders have no labelled defects there (the defect model learns from good
images only), so ``rendered_pool`` paints named defects with ``training.synth.render_defect``
onto the train/good images at load time, from a fixed seed per (image, variant), and records
type, location, size and severity from the painted mask. We chose this over writing a second
synthetic set: it needs no extra files, works for a user's own good images, and the pool is a
pure function of (images, seed).

Phrasing: every question intent and the reports have template lists split once, by hand, into
TRAIN phrasings and HELD-OUT phrasings. Training only ever draws TRAIN phrasings; evaluation
asks with both and reports them separately.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from lineinspect.errors import LineInspectError
from lineinspect.moe_lm.report_model import REPORT_QUESTION
from lineinspect.training.datasets import Dataset, Sample
from lineinspect.training.synth import (
    DEFECT_TYPES,
    describe_defect,
    location_word,
    mask_boxes,
    render_defect,
    size_word,
)

SPLITS = ("train", "heldout")
INTENTS = ("report", "type", "where", "acceptable")
GRID_WORDS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
SPREAD = "across the surface"  # defects covering most of the image, or scattered over many cells
LOCATION_WORDS = (*GRID_WORDS, SPREAD)
GOOD = "good"

# --------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class DefectLabel:
    """What a caption may say about one image."""

    type: str  # "good" or the defect type / class name as the data names it
    locations: tuple[str, ...] = ()  # LOCATION_WORDS in reading order; () for good
    count: int = 0  # defect regions
    size: str | None = None  # small / medium / large, when known
    severity: str | None = None  # low / medium / high, when known

    @property
    def is_good(self) -> bool:
        return self.type == GOOD


GOOD_LABEL = DefectLabel(GOOD)


def _cell(x: float, y: float, width: int, height: int) -> str:
    row = min(2, max(0, int(3 * y / height)))
    col = min(2, max(0, int(3 * x / width)))
    return GRID_WORDS[3 * row + col]


def _ordered(words: set[str]) -> tuple[str, ...]:
    return tuple(w for w in LOCATION_WORDS if w in words)


def label_from_record(record: dict) -> DefectLabel:
    """A synthetic set's defects.jsonl record -> label."""
    kind = record.get("type") or GOOD
    if kind == GOOD:
        return GOOD_LABEL
    # one painted defect per image (mask_boxes may split it into parts: still one region)
    return DefectLabel(kind, (record["location"],), 1, record.get("size"), record.get("severity"))


def label_from_boxes(kind: str, boxes: Sequence[tuple[int, int, int, int]], width: int, height: int) -> DefectLabel:
    """VOC / NEU-DET: type plus boxes (x0, y0, x1, y1, exclusive) in a width x height image.

    Locations are the distinct cells of the box centres; when the boxes cover more than half of
    the image, or more than three cells, the location is "across the surface". Size comes from
    the area the boxes cover; severity is unknown.
    """
    if kind == GOOD or not boxes:
        return GOOD_LABEL
    cover = np.zeros((height, width), bool)
    cells = set()
    for x0, y0, x1, y1 in boxes:
        cover[max(0, y0):y1, max(0, x0):x1] = True
        cells.add(_cell((x0 + x1) / 2, (y0 + y1) / 2, width, height))
    area = float(cover.mean())
    locations = (SPREAD,) if area > 0.5 or len(cells) > 3 else _ordered(cells)
    return DefectLabel(kind, locations, len(boxes), size_word(area), None)


def label_from_mask(kind: str, mask: np.ndarray) -> DefectLabel:
    """MVTec layout: the folder name is the type; location (mask centroid cell, or "across the
    surface" above half the image), region count and size come from the bool (H, W) mask."""
    if kind == GOOD or not mask.any():
        return GOOD_LABEL if kind == GOOD else DefectLabel(kind, (), 1)
    area = float(mask.mean())
    location = SPREAD if area > 0.5 else location_word(mask)
    return DefectLabel(kind, (location,), len(mask_boxes(mask)), size_word(area), None)


# --------------------------------------------------------------------------- words

_NAMES = {"missing": "missing material", "pitted_surface": "pitted surface", "rolled-in_scale": "rolled-in scale"}
# Names that read as nouns on their own; others ("bent", "color", "broken_large") become "<name> defect".
_NOUNS = {"scratch", "crack", "hole", "stain", "dent", "inclusion", "pitted surface"}
_MASS = {"missing material", "contamination", "crazing", "patches", "rolled-in scale", "scratches"}
_NUMBERS = ("no", "one", "two", "three", "four", "five")


def type_phrase(kind: str) -> str:
    """The words for a type: "pitted_surface" -> "pitted surface", "missing" -> "missing material"."""
    return _NAMES.get(kind, kind.replace("_", " ").strip())


def _with_article(kind: str) -> str:
    phrase = type_phrase(kind)
    if phrase in _MASS:
        return phrase
    if phrase not in _NOUNS:
        phrase = f"{phrase} defect"
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def where_phrase(locations: Sequence[str]) -> str:
    """("top left", "bottom") -> "in the top left corner and at the bottom"."""

    def one(word: str) -> str:
        if word == SPREAD:
            return SPREAD
        if word == "center":
            return "in the center"
        if word in ("top", "bottom"):
            return f"at the {word}"
        if word in ("left", "right"):
            return f"on the {word}"
        return f"in the {word} corner"

    parts = [one(w) for w in locations]
    if not parts:
        return "somewhere on the part"
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def regions_phrase(count: int) -> str:
    return _NUMBERS[count] + " regions" if 1 < count < len(_NUMBERS) else "several regions" if count > 1 else ""


def _fields(label: DefectLabel) -> dict[str, str]:
    a = _with_article(label.type)
    where = where_phrase(label.locations)
    if label.count > 1:
        where = f"in {regions_phrase(label.count)}, {where}" if SPREAD not in label.locations else \
            f"in {regions_phrase(label.count)} {where}"
    details = []
    if label.size:
        details.append(f"{label.size} size")
    if label.severity:
        details.append(f"{label.severity} severity")
    d = (" " + ", ".join(details).capitalize() + ".") if details else ""
    return {"t": type_phrase(label.type), "a": a, "A": a[0].upper() + a[1:], "w": where,
            "W": where[0].upper() + where[1:], "d": d}


# --------------------------------------------------------------------------- templates
# Each list holds (train phrasings, held-out phrasings). Answers vary too; the held-out answer
# templates are never trained on and serve the held-out text loss of stage 1.

QUESTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "report": ((REPORT_QUESTION, "Write an inspection report.", "Describe this part.", "Report on this image.",
                "What does the inspection show?", "Describe the surface.", "Please write the inspection result.",
                "Give the inspection report for this part."),
               ("Summarize what you see on this surface.", "Give a short inspection summary.")),
    "type": (("What defect is visible?", "What kind of defect does this part have?", "Which defect do you see?",
              "Name the defect on this surface.", "What is wrong with this part?", "Which kind of flaw is it?",
              "What defect does the image show?", "Tell me the defect type."),
             ("What type of flaw is present?", "Identify the defect in this image.")),
    "where": (("Where is the defect?", "Where is the defect located?", "In which part of the image is the defect?",
               "Point out where the flaw is.", "Where can the defect be found?", "Which area has the defect?",
               "Show me where the flaw is located.", "Where on the surface is it?"),
              ("Which region shows the problem?", "Where on the part is the damage?")),
    "acceptable": (("Is this part acceptable?", "Does this part pass inspection?", "Can this part be shipped?",
                    "Is the part OK?", "Does the part pass?", "Is this part good?", "Can we accept this part?",
                    "Is the surface acceptable?"),
                   ("Should this part be accepted?", "Is this piece good enough to pass?")),
}

_DEFECT_ANSWERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "report": (("{A} {w}.{d} The part is rejected.", "Defect found: {t} {w}.{d}", "The surface shows {a} {w}.{d}",
                "Inspection failed: {a} {w}.{d}"),
               ("There is {a} {w}.{d} Reject the part.",)),
    "type": (("{A}.", "It is {a}.", "{A}, {w}."), ("The defect is {a}.",)),
    "where": (("{W}.", "The {t} is {w}.", "It is {w}."), ("You can see it {w}.",)),
    "acceptable": (("No, it has {a} {w}.", "No: reject it, there is {a} {w}."), ("No, because of {a} {w}.",)),
}
_GOOD_ANSWERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "report": (("No defect found. The surface is clean.", "The part looks good: no defect visible.",
                "Clean surface, no defect. The part is acceptable."),
               ("Nothing wrong here: no defect on this part.",)),
    "type": (("No defect is visible.", "None: the surface is clean."), ("There is no defect.",)),
    "where": (("Nowhere: there is no defect.", "There is no defect to locate."), ("No defect anywhere.",)),
    "acceptable": (("Yes, no defect found.", "Yes. The surface is clean."), ("Yes, it passes: no defect.",)),
}


def _split_index(split: str) -> int:
    if split not in SPLITS:
        raise LineInspectError(f"captions: phrasing split {split!r} is not one of {SPLITS}")
    return SPLITS.index(split)


def questions(intent: str, split: str = "train") -> tuple[str, ...]:
    return QUESTIONS[intent][_split_index(split)]


def answers(label: DefectLabel, intent: str, split: str = "train") -> list[str]:
    """Every answer phrasing of `split` for this label and intent."""
    table = _GOOD_ANSWERS if label.is_good else _DEFECT_ANSWERS
    f = {} if label.is_good else _fields(label)
    return [" ".join(t.format(**f).split()) for t in table[intent][_split_index(split)]]


def canonical_report(label: DefectLabel) -> str:
    """One fixed report per label (the first train template): the text side of stage 2."""
    return answers(label, "report")[0]


def example(label: DefectLabel, rng: np.random.Generator, intents: Sequence[str] = INTENTS,
            weights: Sequence[float] | None = None, split: str = "train") -> tuple[str, str]:
    """A random (question, answer) for the label, phrasings drawn from `split`."""
    intent = intents[int(rng.choice(len(intents), p=weights))]
    qs = questions(intent, split)
    ans = answers(label, intent, split)
    return qs[int(rng.integers(len(qs)))], ans[int(rng.integers(len(ans)))]


def corpus(labels: Sequence[DefectLabel], split: str = "train") -> Iterator[str]:
    """Every question and answer text of `split` for these labels (deduplicated): tokenizer training."""
    seen: set[str] = set()
    for label in labels:
        for intent in INTENTS:
            for text in (*questions(intent, split), *answers(label, intent, split)):
                if text not in seen:
                    seen.add(text)
                    yield text


# --------------------------------------------------------------------------- parsing answers

_WORD_RE = {w: re.compile(rf"\b{re.escape(w)}\b") for w in LOCATION_WORDS}
_GOOD_RE = re.compile(r"\bno (visible )?defects?\b|\bclean\b|\bnowhere\b|\bnothing wrong\b")


@dataclass(frozen=True)
class Reading:
    """What a generated text claims."""

    type: str | None  # a defect type, "good", or None when it names neither
    locations: frozenset[str]
    verdict: str | None  # "accept" / "reject" from a yes/no answer, else None


def read_answer(text: str, type_names: Sequence[str]) -> Reading:
    """Parse a generated answer against the known type names (longest phrase first)."""
    low = " " + " ".join(text.lower().split()) + " "
    kind = None
    best = len(low) + 1
    for name in sorted(type_names, key=lambda n: -len(type_phrase(n))):
        m = re.search(rf"\b{re.escape(type_phrase(name).lower())}\b", low)
        if m and m.start() < best:  # the first type named wins
            kind, best = name, m.start()
    if kind is None and _GOOD_RE.search(low):
        kind = GOOD
    rest = low
    found = set()
    for word in sorted(LOCATION_WORDS, key=len, reverse=True):  # "top left" before "top"
        if _WORD_RE[word].search(rest):
            found.add(word)
            rest = _WORD_RE[word].sub(" ", rest)
    first = low.strip().split(" ", 1)[0]
    # "Yes, ..." accepts; "No, ..." / "No: ..." rejects ("No defect is visible." is neither)
    verdict = "accept" if first.strip(",.:;!") == "yes" else "reject" if first in ("no,", "no:", "no.") else None
    return Reading(kind, frozenset(found), verdict)


# --------------------------------------------------------------------------- labelled images


@dataclass
class LabelledImage:
    """An image (a file, or pixels made at load time) and its label."""

    label: DefectLabel
    path: Path | None = None
    pixels: np.ndarray | None = None  # RGB uint8 (H, W, 3), for rendered images
    caption: str | None = None  # a user caption (used as a report), if any

    def load(self) -> np.ndarray:
        if self.pixels is not None:
            return self.pixels
        from lineinspect.images import read_image

        assert self.path is not None
        return read_image(self.path)


def is_synthetic(root: Path) -> bool:
    return (Path(root) / "defects.jsonl").is_file()


def test_images(dataset: Dataset) -> list[LabelledImage]:
    """The TEST split with labels: synthetic records, VOC boxes or MVTec masks."""
    root = Path(dataset.root)
    if is_synthetic(root):
        records = [json.loads(line) for line in (root / "defects.jsonl").read_text().splitlines() if line.strip()]
        return [LabelledImage(label_from_record(r), root / r["path"]) for r in records]
    return [LabelledImage(sample_label(s), s.path) for s in dataset.test]


def sample_label(sample: Sample) -> DefectLabel:
    """A real sample's label: boxes (VOC), a mask (MVTec), or the folder name alone."""
    if not sample.is_defect:
        return GOOD_LABEL
    if sample.boxes:
        from lineinspect.images import header_size

        size = header_size(sample.path.read_bytes()[: 1 << 18])
        if size is None:
            h, w = sample.load_image().shape[:2]
        else:
            w, h = size
        return label_from_boxes(sample.label, sample.boxes, w, h)
    if sample.mask_path is not None:
        from lineinspect.images import read_mask

        return label_from_mask(sample.label, read_mask(sample.mask_path))
    return DefectLabel(sample.label, (), 1)


def train_images(dataset: Dataset, seed: int, variants: int, size: int | None = None,
                 types: Sequence[str] = DEFECT_TYPES) -> list[LabelledImage]:
    """The TRAIN split with labels. Labelled defects (VOC) are used as they are; a good-only
    training split (synthetic or MVTec sets, plain folders) becomes ``rendered_pool``."""
    if any(s.is_defect for s in dataset.train):
        return [LabelledImage(sample_label(s), s.path) for s in dataset.train]
    return rendered_pool(dataset.train, seed, variants, size, types)


def rendered_pool(samples: Sequence[Sample], seed: int, variants: int, size: int | None = None,
                  types: Sequence[str] = DEFECT_TYPES) -> list[LabelledImage]:
    """`variants` labelled copies of each good image: a named defect painted with its own fixed
    generator (seed, image index, variant), or the image left good (one share in len(types) + 1).
    Labels come from the painted mask at full resolution; pixels are then resized to `size`."""
    if variants < 1:
        raise LineInspectError(f"rendered pool: variants must be >= 1, got {variants}")
    kinds = (GOOD, *types)
    pool = []
    for i, sample in enumerate(samples):
        image = sample.load_image()
        for v in range(variants):
            rng = np.random.default_rng([seed, i, v])
            kind = kinds[(i * variants + v + int(rng.integers(len(kinds)))) % len(kinds)]
            label, pixels = GOOD_LABEL, image
            if kind != GOOD:
                pixels, mask = render_defect(image, kind, rng)
                info = describe_defect(kind, image, pixels, mask)
                label = DefectLabel(kind, (info.location,), 1, info.size, info.severity)
            if size is not None and pixels.shape[:2] != (size, size):
                shrink = pixels.shape[0] > size
                pixels = cv2.resize(pixels, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
            pool.append(LabelledImage(label, sample.path, np.ascontiguousarray(pixels)))
    return pool


def user_captions(path: Path) -> list[LabelledImage]:
    """A JSON-lines file of {"image": path, "text": caption}; image paths relative to the file."""
    path = Path(path)
    if not path.is_file():
        raise LineInspectError(f"--captions {path}: file not found")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image, text = Path(row["image"]), str(row["text"]).strip()
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise LineInspectError(f"{path}:{n}: expected {{\"image\": path, \"text\": caption}} ({exc})") from exc
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise LineInspectError(f"{path}:{n}: image {image} not found")
        if not text:
            raise LineInspectError(f"{path}:{n}: empty caption text")
        out.append(LabelledImage(DefectLabel("caption"), image, caption=text))
    return out


def chance_level(labels: Sequence[DefectLabel]) -> float:
    """Accuracy of always naming the most common defect type (the ablation's reference)."""
    kinds = [lb.type for lb in labels if not lb.is_good]
    if not kinds:
        return math.nan
    return max(kinds.count(k) for k in set(kinds)) / len(kinds)
