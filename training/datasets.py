"""Open a user's data set: MVTec AD folders, Pascal VOC boxes, or a plain folder of good images.

Layouts (detected in this order):

* ``mvtec``: ROOT/train/good/*.png (required), ROOT/test/<type>/*.png (optional, "good" for
  defect-free), ROOT/ground_truth/<type>/<stem>_mask.png (optional per image).
* ``voc``: ROOT/images/*.jpg|png and ROOT/annotations/<stem>.xml with ``<object><name>`` and
  ``<bndbox>`` (1-based inclusive corners, as Pascal VOC and NEU-DET write them). An image's
  label is the class covering the most box area; an image without objects is good.
  Train/test split: test iff sha1(file name)[0] % 5 == 0 (about 20 %), fixed by the name so
  it never changes when images are added.
* ``folder``: image files directly in ROOT, all taken as unlabeled good training images.

Only file names and XML are read here; pixels are decoded when a sample is loaded, and a
corrupt image is reported then, by ``read_image``, with its path.
"""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lineinspect.errors import LineInspectError
from lineinspect.images import header_size, read_image, read_mask

IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
LAYOUTS = ("mvtec", "voc", "folder")
_EXPECTED = (
    "expected one of: MVTec AD (train/good/ with images, optional test/<type>/ and "
    "ground_truth/<type>/<stem>_mask.png), Pascal VOC (images/ and annotations/*.xml), "
    "or a folder holding the images themselves"
)
_HEADER_BYTES = 1 << 18  # image size is read from the file header, not by decoding

Box = tuple[int, int, int, int]


@dataclass
class Sample:
    """One image and what is known about it. Boxes are (x0, y0, x1, y1) pixels, x1/y1 exclusive."""

    path: Path
    label: str  # "good", or the defect type / class name
    mask_path: Path | None = None
    boxes: list[Box] = field(default_factory=list)
    box_labels: list[str] = field(default_factory=list)

    @property
    def is_defect(self) -> bool:
        return self.label != "good"

    def load_image(self) -> np.ndarray:
        """RGB uint8 (H, W, 3), whatever the file's channels and depth."""
        return read_image(self.path)

    def load_mask(self, shape: tuple[int, int]) -> np.ndarray | None:
        """bool (H, W) defect mask for an image of `shape` (H, W): the mask file if there is one,
        else the filled boxes, else all False for a good sample; None when a defect sample has
        neither (its pixels are unknown)."""
        if self.mask_path is not None:
            return read_mask(self.mask_path, tuple(shape[:2]))
        mask = np.zeros(shape[:2], bool)
        if self.boxes:
            for x0, y0, x1, y1 in self.boxes:
                mask[max(y0, 0):y1, max(x0, 0):x1] = True
            return mask
        return None if self.is_defect else mask


@dataclass
class Dataset:
    root: Path
    layout: str  # one of LAYOUTS
    train: list[Sample]
    test: list[Sample]
    class_names: list[str]  # sorted defect types / classes, "good" excluded


def open_dataset(root: str | Path) -> Dataset:
    """Detect the layout of `root` and list its samples; LineInspectError says what is wrong."""
    root = Path(root)
    if not root.exists():
        raise LineInspectError(f"{root}: folder does not exist; check the --data path")
    if not root.is_dir():
        raise LineInspectError(f"{root}: is a file, not a folder; point --data at the data set folder")
    if (root / "train" / "good").is_dir():
        return _open_mvtec(root)
    if (root / "images").is_dir() or (root / "annotations").is_dir():
        return _open_voc(root)
    categories = [d.name for d in _subdirs(root) if (d / "train" / "good").is_dir()]
    if categories:
        raise LineInspectError(
            f"{root}: holds {len(categories)} MVTec categories ({', '.join(categories[:5])}"
            f"{', ...' if len(categories) > 5 else ''}); point --data at one category, "
            f"e.g. {root / categories[0]}"
        )
    images = _images(root)
    if images:
        return Dataset(root, "folder", [Sample(p, "good") for p in images], [], [])
    raise _layout_error(root)


# --------------------------------------------------------------------------- helpers


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")  # hidden files, including interrupted writes (.x.tmp)


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p))


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and _visible(p) and p.suffix.lower() in IMAGE_EXTS)


def _layout_error(root: Path) -> LineInspectError:
    entries = [p for p in root.iterdir() if _visible(p)]
    if not entries:
        return LineInspectError(f"{root}: folder is empty (no images); {_EXPECTED}")
    dirs = [p.name + "/" for p in entries if p.is_dir()]
    files = [p for p in entries if p.is_file()]
    found = ", ".join(sorted(dirs)[:8]) or "no subfolders"
    hint = " (train/ has no good/ subfolder)" if (root / "train").is_dir() else ""
    return LineInspectError(
        f"{root}: no recognised data set layout{hint}; {_EXPECTED}. Found: {found}; "
        f"{len(files)} file(s) and none of them an image"
    )


# --------------------------------------------------------------------------- MVTec AD


def _open_mvtec(root: Path) -> Dataset:
    train_dir = root / "train" / "good"
    train = [Sample(p, "good") for p in _images(train_dir)]
    if not train:
        raise LineInspectError(
            f"{train_dir}: no images; the MVTec layout needs defect-free training images here"
        )
    for d in _subdirs(root / "train"):
        if d.name != "good" and _images(d):
            raise LineInspectError(
                f"{d}: MVTec training images must all be good; move defective images to "
                f"{root / 'test' / d.name} (masks in {root / 'ground_truth' / d.name})"
            )
    test: list[Sample] = []
    if (root / "test").is_dir():
        stray = _images(root / "test")
        if stray:
            raise LineInspectError(
                f"{stray[0]}: test images go in test/<type>/ subfolders (test/good/ for defect-free)"
            )
        for d in _subdirs(root / "test"):
            test += [_mvtec_sample(root, d.name, p) for p in _images(d)]
    _check_orphan_masks(root, test)
    names = sorted({s.label for s in test if s.is_defect})
    return Dataset(root, "mvtec", train, test, names)


def _mvtec_sample(root: Path, label: str, path: Path) -> Sample:
    if label == "good":
        return Sample(path, label)
    gt = root / "ground_truth" / label
    for name in (f"{path.stem}_mask.png", f"{path.stem}.png"):  # MVTec's name, then a bare one
        if (gt / name).is_file():
            return Sample(path, label, mask_path=gt / name)
    return Sample(path, label)  # allowed: a defect known by its folder, pixels unknown


def _check_orphan_masks(root: Path, test: list[Sample]) -> None:
    """A mask whose image is missing usually means a renamed or deleted file: say so."""
    gt_root = root / "ground_truth"
    if not gt_root.is_dir():
        return
    used = {s.mask_path for s in test if s.mask_path is not None}
    for d in _subdirs(gt_root):
        for mask in _images(d):
            if mask not in used:
                stem = mask.stem.removesuffix("_mask")
                raise LineInspectError(
                    f"{mask}: mask without an image (expected {root / 'test' / d.name / stem}.png or "
                    f".jpg); add the image or remove the mask"
                )


# --------------------------------------------------------------------------- Pascal VOC


def _open_voc(root: Path) -> Dataset:
    images_dir, ann_dir = root / "images", root / "annotations"
    for need in (images_dir, ann_dir):
        if not need.is_dir():
            raise LineInspectError(
                f"{root}: looks like Pascal VOC but {need.name}/ is missing; {_EXPECTED}"
            )
    images: dict[str, Path] = {}
    for p in _images(images_dir):
        if p.stem in images:
            raise LineInspectError(f"{p}: two images share the name {p.stem!r} ({images[p.stem].name}); rename one")
        images[p.stem] = p
    notes = {p.stem: p for p in sorted(ann_dir.iterdir())
             if p.is_file() and _visible(p) and p.suffix.lower() == ".xml"}
    if not images and not notes:
        raise LineInspectError(f"{root}: images/ and annotations/ are empty (no images)")
    for stem in sorted(images):
        if stem not in notes:
            raise LineInspectError(f"{images[stem]}: image without annotation (expected {ann_dir / stem}.xml)")
    for stem in sorted(notes):
        if stem not in images:
            raise LineInspectError(
                f"{notes[stem]}: annotation without image (expected {images_dir / stem}.jpg or .png)"
            )
    train: list[Sample] = []
    test: list[Sample] = []
    names: set[str] = set()
    for stem in sorted(images):
        sample = _voc_sample(images[stem], notes[stem])
        names.update(sample.box_labels)
        (test if _is_test(images[stem].name) else train).append(sample)
    return Dataset(root, "voc", train, test, sorted(names))


def _is_test(file_name: str) -> bool:
    return hashlib.sha1(file_name.encode()).digest()[0] % 5 == 0


def _voc_sample(image: Path, xml: Path) -> Sample:
    objects = _parse_voc(xml)
    width, height = _image_size(image, xml)
    boxes, labels = [], []
    for i, (name, (xmin, ymin, xmax, ymax)) in enumerate(objects, 1):
        # VOC corners are 1-based and inclusive: pixel columns xmin..xmax are x0 = xmin - 1 .. x1 = xmax
        x0, y0 = max(round(xmin) - 1, 0), max(round(ymin) - 1, 0)
        x1, y1 = min(round(xmax), width), min(round(ymax), height)
        if x1 <= x0 or y1 <= y0:
            raise LineInspectError(
                f"{xml}: object {i} ({name}) box xmin={xmin:g} ymin={ymin:g} xmax={xmax:g} ymax={ymax:g} "
                f"is empty or outside the {width}x{height} image; fix or delete the object"
            )
        boxes.append((x0, y0, x1, y1))
        labels.append(name)
    # the image's class is the dominant defect: the label covering the most box area
    area: Counter[str] = Counter()
    for name, (x0, y0, x1, y1) in zip(labels, boxes):
        area[name] += (x1 - x0) * (y1 - y0)
    label = area.most_common(1)[0][0] if area else "good"
    return Sample(image, label, None, boxes, labels)


def _parse_voc(xml: Path) -> list[tuple[str, tuple[float, float, float, float]]]:
    """[(name, (xmin, ymin, xmax, ymax))] of a Pascal VOC annotation file."""
    try:
        tree = ET.parse(xml)
    except (ET.ParseError, OSError) as exc:
        raise LineInspectError(f"{xml}: not a readable XML annotation ({exc}); fix or re-export it") from exc
    objects = []
    for i, obj in enumerate(tree.getroot().iter("object"), 1):
        name = (obj.findtext("name") or "").strip()
        box = obj.find("bndbox")
        if not name or box is None:
            raise LineInspectError(f"{xml}: object {i} lacks <name> or <bndbox>; every object needs both")
        try:
            coords = tuple(float(box.findtext(k, "")) for k in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError as exc:
            raise LineInspectError(
                f"{xml}: object {i} ({name}) needs numeric <xmin>, <ymin>, <xmax>, <ymax> in <bndbox>"
            ) from exc
        objects.append((name, coords))
    return objects


def _image_size(image: Path, xml: Path) -> tuple[int, int]:
    """(width, height) from the image header; the XML <size> or a full decode as fallbacks."""
    try:
        with image.open("rb") as f:
            size = header_size(f.read(_HEADER_BYTES))
    except OSError as exc:
        raise LineInspectError(f"{image}: cannot read image ({exc.strerror or exc})") from exc
    if size is not None:
        return size
    root = ET.parse(xml).getroot()
    try:
        width, height = int(root.findtext("size/width", "")), int(root.findtext("size/height", ""))
        if width > 0 and height > 0:
            return width, height
    except ValueError:
        pass
    h, w = read_image(image).shape[:2]  # BMP/TIFF/WebP without a usable <size>: decode once
    return w, h
