from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from lineinspect.errors import LineInspectError
from lineinspect.images import encode_jpeg, encode_png
from lineinspect.training.datasets import Sample, open_dataset
from lineinspect.training.synth import DEFECT_TYPES, write_synthetic_dataset

NEU_DET = Path("/work/shared/datasets/neu-det")


def _png(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(image))
    return path


def _grey(h: int = 40, w: int = 50, value: int = 100) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


# --------------------------------------------------------------------------- MVTec


def test_synthetic_dataset_reads_back(tmp_path: Path) -> None:
    root = tmp_path / "line"
    write_synthetic_dataset(root, n=8, seed=2, size=64)
    ds = open_dataset(root)
    assert ds.layout == "mvtec" and ds.root == root
    assert len(ds.train) == 8 and all(s.label == "good" and not s.is_defect for s in ds.train)
    assert Counter(s.label for s in ds.test) == Counter({"good": 2, **{t: 1 for t in DEFECT_TYPES}})
    assert ds.class_names == sorted(DEFECT_TYPES)
    for s in ds.test:
        image = s.load_image()
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        mask = s.load_mask(image.shape[:2])
        assert mask is not None and mask.shape == (64, 64) and mask.dtype == bool
        if s.is_defect:
            assert s.mask_path == root / "ground_truth" / s.label / f"{s.path.stem}_mask.png"
            assert mask.any()
        else:
            assert s.mask_path is None and not mask.any()


def test_mvtec_with_only_training_images(tmp_path: Path) -> None:
    for i in range(3):
        _png(tmp_path / "train" / "good" / f"{i:03d}.png", _grey())
    (tmp_path / "train" / "good" / ".000.png.tmp").write_bytes(b"interrupted")  # hidden: ignored
    ds = open_dataset(tmp_path)
    assert ds.layout == "mvtec" and len(ds.train) == 3 and ds.test == [] and ds.class_names == []


def test_mvtec_defect_without_mask_is_allowed(tmp_path: Path) -> None:
    _png(tmp_path / "train" / "good" / "a.png", _grey())
    _png(tmp_path / "test" / "dent" / "b.png", _grey())
    _png(tmp_path / "test" / "scratch" / "c.png", _grey())
    _png(tmp_path / "ground_truth" / "scratch" / "c_mask.png", np.eye(50, dtype=np.uint8)[:40] * 255)
    ds = open_dataset(tmp_path)
    dent, scratch = ds.test
    assert dent.label == "dent" and dent.mask_path is None and dent.load_mask((40, 50)) is None
    assert scratch.load_mask((40, 50)).sum() == 40
    assert ds.class_names == ["dent", "scratch"]
    with pytest.raises(LineInspectError, match="c_mask.png: mask is 50x40 but its image is 60x40"):
        scratch.load_mask((40, 60))


def test_mvtec_mask_without_image_is_named(tmp_path: Path) -> None:
    _png(tmp_path / "train" / "good" / "a.png", _grey())
    _png(tmp_path / "test" / "hole" / "b.png", _grey())
    orphan = _png(tmp_path / "ground_truth" / "hole" / "zz_mask.png", _grey(value=255)[:, :, 0])
    with pytest.raises(LineInspectError, match=f"{orphan}: mask without an image"):
        open_dataset(tmp_path)


def test_mvtec_defects_in_train_are_refused(tmp_path: Path) -> None:
    _png(tmp_path / "train" / "good" / "a.png", _grey())
    _png(tmp_path / "train" / "crack" / "b.png", _grey())
    with pytest.raises(LineInspectError, match="must all be good; move defective images to .*test/crack"):
        open_dataset(tmp_path)


def test_mvtec_empty_train_good(tmp_path: Path) -> None:
    (tmp_path / "train" / "good").mkdir(parents=True)
    with pytest.raises(LineInspectError, match=f"{tmp_path / 'train' / 'good'}: no images"):
        open_dataset(tmp_path)


def test_mvtec_root_of_categories_points_at_one(tmp_path: Path) -> None:
    for cat in ("bottle", "cable"):
        _png(tmp_path / cat / "train" / "good" / "000.png", _grey())
    with pytest.raises(LineInspectError, match=f"point --data at one category, e.g. {tmp_path / 'bottle'}"):
        open_dataset(tmp_path)


# --------------------------------------------------------------------------- folder and bad layouts


def test_plain_folder_of_grey_and_colour_images(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", _grey()[:, :, 0])  # 1 channel
    (tmp_path / "b.jpg").write_bytes(encode_jpeg(_grey(30, 20)))
    (tmp_path / "notes.txt").write_text("not an image")
    ds = open_dataset(tmp_path)
    assert ds.layout == "folder" and [s.path.name for s in ds.train] == ["a.png", "b.jpg"]
    assert ds.test == [] and ds.class_names == [] and not any(s.is_defect for s in ds.train)
    assert ds.train[0].load_image().shape == (40, 50, 3)
    assert not ds.train[1].load_mask((30, 20)).any()


def test_corrupt_image_is_reported_when_loaded(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    ds = open_dataset(tmp_path)
    with pytest.raises(LineInspectError, match=str(bad)):
        ds.train[0].load_image()


def test_missing_file_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(LineInspectError, match=f"{tmp_path / 'nope'}: folder does not exist"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "f.png").write_bytes(b"")
    with pytest.raises(LineInspectError, match="is a file, not a folder"):
        open_dataset(tmp_path / "f.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LineInspectError, match=f"{tmp_path / 'empty'}: folder is empty"):
        open_dataset(tmp_path / "empty")


def test_wrong_layout_says_what_was_expected_and_found(tmp_path: Path) -> None:
    _png(tmp_path / "ok" / "a.png", _grey())
    _png(tmp_path / "bad" / "b.png", _grey())
    with pytest.raises(LineInspectError) as info:
        open_dataset(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "MVTec" in message and "Pascal VOC" in message
    assert "Found: bad/, ok/" in message


# --------------------------------------------------------------------------- Pascal VOC


def _voc_xml(objects: list[tuple[str, tuple]], width: int = 50, height: int = 40) -> str:
    body = "".join(
        f"<object><name>{n}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b in objects
    )
    return f"<annotation><size><width>{width}</width><height>{height}</height></size>{body}</annotation>"


def _voc(root: Path, items: dict[str, list[tuple[str, tuple]]]) -> None:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for stem, objects in items.items():
        _png(root / "images" / f"{stem}.png", _grey())
        (root / "annotations" / f"{stem}.xml").write_text(_voc_xml(objects))


def test_voc_boxes_labels_and_split(tmp_path: Path) -> None:
    items = {f"img{i:02d}": [("pit", (1, 1, 10, 5))] for i in range(20)}
    items["img00"] = [("pit", (1, 1, 10, 5)), ("pit", (1, 11, 10, 15)), ("rust", (41, 31, 60, 45)),
                      ("rust", (20.6, 21, 22, 22))]
    items["img01"] = []  # no objects: a good image
    _voc(tmp_path, items)
    ds = open_dataset(tmp_path)
    assert ds.layout == "voc" and ds.class_names == ["pit", "rust"]
    samples = {s.path.stem: s for s in ds.train + ds.test}
    assert len(samples) == 20
    first = samples["img00"]
    # 1-based inclusive -> 0-based exclusive, clamped to the 50x40 image
    assert first.boxes == [(0, 0, 10, 5), (0, 10, 10, 15), (40, 30, 50, 40), (20, 20, 22, 22)]
    assert first.box_labels == ["pit", "pit", "rust", "rust"]
    assert first.label == "rust"  # 104 px of rust beat 100 px of pit: the label follows area
    assert first.mask_path is None and first.load_mask((40, 50)).sum() == 50 + 50 + 100 + 4
    assert samples["img01"].label == "good" and not samples["img01"].load_mask((40, 50)).any()
    for s in ds.test:
        assert hashlib.sha1(s.path.name.encode()).digest()[0] % 5 == 0
    for s in ds.train:
        assert hashlib.sha1(s.path.name.encode()).digest()[0] % 5 != 0


@pytest.mark.parametrize(("xml", "message"), [
    ("<annotation><object>", "not a readable XML annotation"),
    ("<annotation><object><name>pit</name></object></annotation>", "object 1 lacks <name> or <bndbox>"),
    ("<annotation><object><name>pit</name><bndbox><xmin>a</xmin></bndbox></object></annotation>",
     r"object 1 \(pit\) needs numeric"),
    (_voc_xml([("pit", (60, 1, 70, 5))]), r"object 1 \(pit\) box .* outside the 50x40 image"),
])
def test_voc_bad_annotation_names_the_file(tmp_path: Path, xml: str, message: str) -> None:
    _voc(tmp_path, {"a": [("pit", (1, 1, 5, 5))]})
    bad = tmp_path / "annotations" / "a.xml"
    bad.write_text(xml)
    with pytest.raises(LineInspectError, match=f"{bad}: {message}"):
        open_dataset(tmp_path)


def test_voc_unpaired_files_are_named(tmp_path: Path) -> None:
    _voc(tmp_path, {"a": [("pit", (1, 1, 5, 5))]})
    lonely = _png(tmp_path / "images" / "b.png", _grey())
    with pytest.raises(LineInspectError, match=f"{lonely}: image without annotation"):
        open_dataset(tmp_path)
    lonely.unlink()
    note = tmp_path / "annotations" / "c.xml"
    note.write_text(_voc_xml([]))
    with pytest.raises(LineInspectError, match=f"{note}: annotation without image"):
        open_dataset(tmp_path)


def test_voc_without_annotations_folder(tmp_path: Path) -> None:
    _png(tmp_path / "images" / "a.png", _grey())
    with pytest.raises(LineInspectError, match="annotations/ is missing"):
        open_dataset(tmp_path)


def test_neu_det_loads_with_stable_split() -> None:
    ds = open_dataset(NEU_DET)
    assert ds.layout == "voc"
    assert ds.class_names == ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale",
                              "scratches"]
    samples = ds.train + ds.test
    assert len(samples) == 1800 and all(s.is_defect for s in samples)
    # an image's label is its dominant defect; a few NEU images mostly show another class
    assert sum(s.path.name.startswith(s.label) for s in samples) >= 1790
    assert (len(ds.train), len(ds.test)) == (1447, 353)  # pinned: the split must never move
    assert [s.path for s in open_dataset(NEU_DET).test] == [s.path for s in ds.test]
    for s in samples:
        assert s.boxes and len(s.boxes) == len(s.box_labels)
        for x0, y0, x1, y1 in s.boxes:
            assert 0 <= x0 < x1 <= 200 and 0 <= y0 < y1 <= 200
    # NEU-DET writes 1-based corners: xmin=1 is the first column
    assert min(b[0] for s in samples for b in s.boxes) == 0
    assert max(b[2] for s in samples for b in s.boxes) == 200
    sample: Sample = ds.test[0]
    image = sample.load_image()
    assert image.shape == (200, 200, 3)
    assert sample.load_mask(image.shape[:2]).any()


def test_jpeg_decodes_shrunk_only_down_to_the_size_asked_for() -> None:
    from lineinspect.images import decode_image, jpeg_reduction

    image = np.zeros((480, 640, 3), np.uint8)
    image[100:200, 300:500] = 200
    jpeg = cv2.imencode(".jpg", image)[1].tobytes()
    png = cv2.imencode(".png", image)[1].tobytes()
    assert decode_image(jpeg).shape == (480, 640, 3)
    assert decode_image(jpeg, min_side=224).shape == (240, 320, 3)  # 480 / 4 = 120 would be below 224
    assert decode_image(jpeg, min_side=100).shape == (120, 160, 3)
    assert decode_image(jpeg, min_side=481).shape == (480, 640, 3)
    assert decode_image(png, min_side=100).shape == (480, 640, 3)  # only JPEG shrinks while decoding
    assert jpeg_reduction((640, 480), jpeg, 60) == 8 and jpeg_reduction(None, jpeg, 60) == 1
    shrunk = decode_image(jpeg, min_side=224).astype(int)
    assert shrunk[75, 200].tolist() == [200, 200, 200] and shrunk[10, 10].tolist() == [0, 0, 0]
