from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lineinspect.errors import LineInspectError
from lineinspect.images import read_image, read_mask
from lineinspect.training.synth import (
    DEFECT_TYPES,
    SURFACES,
    describe_defect,
    location_word,
    make_surface,
    mask_boxes,
    render_defect,
    severity_word,
    size_word,
    write_synthetic_dataset,
)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


# --------------------------------------------------------------------------- surfaces


@pytest.mark.parametrize("kind", SURFACES)
def test_surface_is_seeded_textured_and_varies_between_parts(kind: str) -> None:
    a = make_surface(kind, 96, _rng(1))
    assert a.shape == (96, 96, 3) and a.dtype == np.uint8
    assert np.array_equal(a, make_surface(kind, 96, _rng(1)))
    b = make_surface(kind, 96, _rng(2))
    assert np.abs(a.astype(int) - b).mean() > 2  # two good parts are not the same picture
    assert a.std() > 2  # a texture, not a flat colour
    assert (a == 255).mean() < 0.2 and (a == 0).mean() < 0.2  # not blown out or crushed


def test_surface_rejects_unknown_kind_and_silly_size() -> None:
    with pytest.raises(LineInspectError, match="unknown surface 'wood'"):
        make_surface("wood", 64, _rng(0))
    with pytest.raises(LineInspectError, match="out of range"):
        make_surface("metal", 8, _rng(0))


# --------------------------------------------------------------------------- defects


def _check_defect(before: np.ndarray, out: np.ndarray, mask: np.ndarray) -> None:
    assert out.shape == before.shape and out.dtype == np.uint8
    assert mask.shape == before.shape[:2] and mask.dtype == bool
    changed = (out != before).any(axis=2)
    assert mask.sum() >= 4
    assert not (changed & ~mask).any(), "pixels changed outside the mask"
    assert changed[mask].mean() > 0.5, "the mask claims pixels that did not change"
    assert mask.mean() < 0.6


@pytest.mark.parametrize("kind", DEFECT_TYPES)
def test_every_defect_type_changes_exactly_its_mask(kind: str) -> None:
    for i, surface in enumerate(SURFACES * 2):
        image = make_surface(surface, 96, _rng(5, i))
        before = image.copy()
        out, mask = render_defect(image, kind, _rng(6, i))
        assert np.array_equal(image, before), "the input must not be modified"
        _check_defect(image, out, mask)


@pytest.mark.parametrize("kind", DEFECT_TYPES)
def test_defects_paint_on_any_user_image(kind: str) -> None:
    noise = _rng(9).integers(0, 256, (40, 300, 3), dtype=np.uint8)  # wide, noisy, not square
    images = [noise, np.zeros((16, 16, 3), np.uint8), np.full((70, 50, 3), 255, np.uint8),
              np.full((64, 64, 3), 128, np.uint8)]
    for j, image in enumerate(images):
        out, mask = render_defect(image, kind, _rng(3, j))
        _check_defect(image, out, mask)


def test_render_defect_is_deterministic_and_varied() -> None:
    image = make_surface("tile", 96, _rng(0))
    a = render_defect(image, "crack", _rng(4))
    b = render_defect(image, "crack", _rng(4))
    c = render_defect(image, "crack", _rng(5))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_defect_sizes_and_contrasts_vary() -> None:
    areas, contrasts = [], []
    for i in range(24):
        image = make_surface(SURFACES[i % 4], 96, _rng(7, i))
        out, mask = render_defect(image, DEFECT_TYPES[i % len(DEFECT_TYPES)], _rng(8, i))
        info = describe_defect("x", image, out, mask)
        areas.append(info.area_fraction)
        contrasts.append(info.contrast)
    assert max(areas) > 8 * min(areas)
    assert max(contrasts) > 3 * min(contrasts)
    assert min(contrasts) < 0.1  # some defects are subtle


def test_render_defect_rejects_bad_input() -> None:
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(LineInspectError, match="unknown defect type 'smudge'"):
        render_defect(image, "smudge", _rng(0))
    with pytest.raises(LineInspectError, match="RGB uint8"):
        render_defect(image.astype(np.float32), "hole", _rng(0))
    with pytest.raises(LineInspectError, match="RGB uint8"):
        render_defect(image[:, :, 0], "hole", _rng(0))
    with pytest.raises(LineInspectError, match=">= 16"):
        render_defect(image[:8], "hole", _rng(0))


# --------------------------------------------------------------------------- metadata


def test_boxes_are_tight_and_merge_near_parts() -> None:
    mask = np.zeros((100, 100), bool)
    mask[10:20, 5:15] = True  # far apart: two boxes
    mask[70:72, 60:90] = True
    mask[70:72, 91:95] = True  # 1 px gap: the same defect
    assert mask_boxes(mask) == [(5, 10, 15, 20), (60, 70, 95, 72)]
    assert mask_boxes(mask, merge_px=0) == [(5, 10, 15, 20), (60, 70, 90, 72), (91, 70, 95, 72)]


def test_location_size_and_severity_words() -> None:
    mask = np.zeros((90, 90), bool)
    mask[0:10, 0:10] = True
    assert location_word(mask) == "top left"
    mask[:] = False
    mask[40:50, 40:50] = True
    assert location_word(mask) == "center"
    mask[:] = False
    mask[80:90, 40:50] = True
    assert location_word(mask) == "bottom"
    assert [size_word(a) for a in (0.001, 0.01, 0.2)] == ["small", "medium", "large"]
    assert [severity_word(c, 0.01) for c in (0.01, 0.1, 0.5)] == ["low", "medium", "high"]


def test_description_matches_mask() -> None:
    image = make_surface("pcb", 128, _rng(2))
    out, mask = render_defect(image, "missing", _rng(3))
    info = describe_defect("missing", image, out, mask)
    assert info.area_fraction == pytest.approx(mask.mean())
    covered = np.zeros_like(mask)
    for x0, y0, x1, y1 in info.boxes:
        assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
        part = mask[y0:y1, x0:x1]
        # tight: every edge row and column of the box holds mask pixels
        assert part[0].any() and part[-1].any() and part[:, 0].any() and part[:, -1].any()
        covered[y0:y1, x0:x1] = True
    assert not (mask & ~covered).any()


# --------------------------------------------------------------------------- data set writer


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_dataset_layout_metadata_and_masks(tmp_path: Path) -> None:
    out = tmp_path / "line"
    summary = write_synthetic_dataset(out, n=8, seed=1, size=64)
    assert summary["counts"]["train/good"] == 8 and summary["counts"]["test/good"] == 2
    assert len(list((out / "train" / "good").glob("*.png"))) == 8
    assert len(list((out / "test" / "good").glob("*.png"))) == 2
    records = [json.loads(line) for line in (out / "defects.jsonl").read_text().splitlines()]
    assert len(records) == 2 + len(DEFECT_TYPES)
    assert {r["type"] for r in records} == {"good", *DEFECT_TYPES}
    assert {r["surface"] for r in records} <= set(SURFACES)
    assert (out / "README.txt").read_text().startswith("lineinspect synthetic defect data set")
    for r in records:
        image = read_image(out / r["path"])
        assert image.shape == (64, 64, 3)
        if r["type"] == "good":
            assert r["boxes"] == [] and r["mask"] is None
            continue
        assert r["path"] == f"test/{r['type']}/0000.png"
        assert r["mask"] == f"ground_truth/{r['type']}/0000_mask.png"
        raw = read_image(out / r["mask"])[:, :, 0]
        assert set(np.unique(raw)) <= {0, 255}
        mask = read_mask(out / r["mask"], (64, 64))
        assert mask.any()
        assert [tuple(b) for b in r["boxes"]] == mask_boxes(mask)
        assert r["area_fraction"] == pytest.approx(mask.mean(), abs=1e-6)
        assert r["location"] == location_word(mask) and r["size"] in ("small", "medium", "large")
        assert r["severity"] in ("low", "medium", "high")


def test_dataset_is_byte_identical_by_seed_and_independent_of_n(tmp_path: Path) -> None:
    write_synthetic_dataset(tmp_path / "a", n=8, seed=4, surface="textile", size=64)
    write_synthetic_dataset(tmp_path / "b", n=8, seed=4, surface="textile", size=64)
    write_synthetic_dataset(tmp_path / "c", n=3, seed=4, surface="textile", size=64)
    write_synthetic_dataset(tmp_path / "d", n=8, seed=5, surface="textile", size=64)
    a = _files(tmp_path / "a")
    assert a == _files(tmp_path / "b")
    c = _files(tmp_path / "c")
    for name in ("train/good/0000.png", "train/good/0002.png", "test/scratch/0000.png"):
        assert c[name] == a[name]
    d = _files(tmp_path / "d")
    assert d["train/good/0000.png"] != a["train/good/0000.png"]


def test_rewrites_own_dataset_and_removes_stale_files(tmp_path: Path) -> None:
    out = tmp_path / "line"
    write_synthetic_dataset(out, n=16, seed=0, surface="metal", size=48)
    (out / "train" / "good" / ".0003.png.tmp").write_bytes(b"half an image")  # an interrupted run
    write_synthetic_dataset(out, n=4, seed=0, surface="metal", size=48)
    assert sorted(p.name for p in (out / "train" / "good").iterdir()) == [f"{i:04d}.png" for i in range(4)]
    assert len(list((out / "test" / "good").iterdir())) == 1
    assert not list(out.rglob("*.tmp"))


def test_refuses_a_folder_that_is_not_a_synthetic_dataset(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(LineInspectError, match=str(out)):
        write_synthetic_dataset(out, n=2, seed=0, size=32)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    with pytest.raises(LineInspectError, match="unknown surface"):
        write_synthetic_dataset(tmp_path / "x", n=2, seed=0, surface="wood")
    with pytest.raises(LineInspectError, match="seed"):
        write_synthetic_dataset(tmp_path / "x", n=2, seed=-1)
