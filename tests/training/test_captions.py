"""Captions and QA from labels: deterministic, varied, held-out phrasings kept apart, and every
phrasing read back correctly by the evaluation's parser."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lineinspect.errors import LineInspectError
from lineinspect.images import encode_png
from lineinspect.training import captions as cap
from lineinspect.training.datasets import Sample, open_dataset
from lineinspect.training.synth import DEFECT_TYPES, write_synthetic_dataset

NEU = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")


def test_examples_are_deterministic_and_varied() -> None:
    label = cap.DefectLabel("scratch", ("top left",), 1, "small", "low")
    first = [cap.example(label, np.random.default_rng(3)) for _ in range(3)]
    assert first[0] == first[1] == first[2]
    rng = np.random.default_rng(0)
    drawn = [cap.example(label, rng) for _ in range(300)]
    assert len({q for q, _ in drawn}) >= 12  # 4 intents x several phrasings
    assert len({a for _, a in drawn}) >= 8
    assert all("scratch" in a and "top left" in a for q, a in drawn if q in cap.questions("report"))


def test_held_out_phrasings_never_reach_training() -> None:
    labels = [cap.DefectLabel(t, ("center",), 1, "large", "high") for t in DEFECT_TYPES] + [cap.GOOD_LABEL]
    train_text = set(cap.corpus(labels, "train"))
    for intent in cap.INTENTS:
        held = set(cap.questions(intent, "heldout"))
        assert held and not held & set(cap.questions(intent, "train"))
        assert not held & train_text
    rng = np.random.default_rng(1)
    for _ in range(200):  # training draws only train phrasings
        q, _ = cap.example(labels[int(rng.integers(len(labels)))], rng)
        assert any(q in cap.questions(i, "train") for i in cap.INTENTS)


@pytest.mark.parametrize("split", cap.SPLITS)
def test_every_answer_phrasing_reads_back(split: str) -> None:
    labels = [cap.DefectLabel(t, (w,), 1, "medium", "low") for t, w in zip(DEFECT_TYPES, cap.GRID_WORDS)]
    labels.append(cap.label_from_boxes("pitted_surface", [(5, 5, 40, 40), (150, 150, 195, 195)], 200, 200))
    labels.append(cap.label_from_boxes("crazing", [(1, 1, 199, 199)], 200, 200))
    for label in [*labels, cap.GOOD_LABEL]:
        names = NEU if label.type in NEU else DEFECT_TYPES
        for intent in cap.INTENTS:
            for text in cap.answers(label, intent, split):
                reading = cap.read_answer(text, names)
                if intent != "where" or label.is_good:
                    assert reading.type == label.type, (text, reading)
                if intent in ("where", "report") and not label.is_good:
                    assert reading.locations == frozenset(label.locations), (text, reading)
                if intent == "acceptable":
                    assert reading.verdict == ("accept" if label.is_good else "reject"), text


def test_voc_boxes_give_cells_counts_and_spread() -> None:
    two = cap.label_from_boxes("inclusion", [(10, 10, 50, 50), (150, 80, 190, 120)], 200, 200)
    assert two.locations == ("top left", "right") and two.count == 2 and two.size == "large"
    assert "two regions" in cap.answers(two, "report")[0]
    whole = cap.label_from_boxes("crazing", [(0, 0, 200, 190)], 200, 200)
    assert whole.locations == (cap.SPREAD,)
    assert cap.label_from_boxes("good", [], 200, 200).is_good


def test_mask_geometry_and_synthetic_records() -> None:
    mask = np.zeros((90, 90), bool)
    mask[5:15, 70:85] = True  # top right, 150 px of 8100 = 1.9 % -> large
    label = cap.label_from_mask("glue", mask)
    assert label == cap.DefectLabel("glue", ("top right",), 1, "large", None)
    assert cap.answers(label, "type")[0] == "A glue defect."
    record = {"type": "stain", "location": "bottom", "size": "small", "severity": "high", "boxes": [[1, 2, 3, 4]]}
    assert cap.label_from_record(record) == cap.DefectLabel("stain", ("bottom",), 1, "small", "high")
    assert cap.label_from_record({"type": "good"}).is_good


def test_rendered_pool_is_a_pure_function_of_seed(tmp_path: Path) -> None:
    root = tmp_path / "line"
    write_synthetic_dataset(root, n=4, seed=3, surface="metal", size=64)
    dataset = open_dataset(root)
    a = cap.train_images(dataset, seed=5, variants=4, size=48)
    b = cap.train_images(dataset, seed=5, variants=4, size=48)
    assert [x.label for x in a] == [x.label for x in b]
    assert all(np.array_equal(x.pixels, y.pixels) for x, y in zip(a, b))
    assert all(x.pixels.shape == (48, 48, 3) for x in a)
    kinds = {x.label.type for x in a}
    assert len(kinds) >= 5 and cap.GOOD in kinds  # every variant index shifts the type
    assert all(x.label.locations[0] in cap.GRID_WORDS for x in a if not x.label.is_good)
    c = cap.train_images(dataset, seed=6, variants=4, size=48)
    assert [x.label for x in a] != [x.label for x in c]
    test = cap.test_images(dataset)  # from defects.jsonl
    assert len(test) == len(dataset.test) and {x.label.type for x in test} == {cap.GOOD, *DEFECT_TYPES}


def test_user_captions_file(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(encode_png(np.zeros((8, 8, 3), np.uint8)))
    good = tmp_path / "caps.jsonl"
    good.write_text(json.dumps({"image": "a.png", "text": "A burr on the left edge."}) + "\n\n")
    rows = cap.user_captions(good)
    assert len(rows) == 1 and rows[0].caption == "A burr on the left edge." and rows[0].path == tmp_path / "a.png"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "missing.png", "text": "x"}) + "\n")
    with pytest.raises(LineInspectError, match="missing.png"):
        cap.user_captions(bad)
    bad.write_text('{"text": "no image"}\n')
    with pytest.raises(LineInspectError, match="bad.jsonl:1"):
        cap.user_captions(bad)


def test_sample_labels_from_voc_boxes(tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(encode_png(np.zeros((100, 200, 3), np.uint8)))
    sample = Sample(image, "scratches", None, [(150, 60, 190, 90)], ["scratches"])
    label = cap.sample_label(sample)
    assert label.locations == ("bottom right",) and label.count == 1
    assert cap.chance_level([label, label, cap.DefectLabel("patches", ("top",), 1)]) == pytest.approx(2 / 3)
