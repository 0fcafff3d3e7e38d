"""The defect model, the Inspector and model directories."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from lineinspect.errors import LineInspectError
from lineinspect.vision.defect_model import DefectModel, DefectModelConfig
from lineinspect.vision.encoder import preset
from lineinspect.vision.heads import HeadConfig
from lineinspect.vision.inspector import Calibration, Inspector
from lineinspect.vision.memory_bank import greedy_coreset, nearest_distance
from lineinspect.vision.model_io import load_inspector, save_model_dir, untrained_inspector
from lineinspect.vision.precision import autocast


def small_model(num_classes: int = 3) -> DefectModel:
    torch.manual_seed(0)
    return DefectModel(DefectModelConfig(preset("tiny", img_size=64), HeadConfig(num_classes=num_classes),
                                         memory_bank_size=32))


def test_forward_shapes_and_ranges() -> None:
    model = small_model().eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 64))
    assert out.anomaly_map.shape == (2, 1, 64, 64)
    assert out.map_score.shape == out.image_prob.shape == (2,)
    assert out.class_logits.shape == (2, 3)
    assert out.memory_map is None  # not fitted yet
    assert 0 <= float(out.anomaly_map.min()) and float(out.anomaly_map.max()) <= 1


def test_masked_reconstruction_loss_trains() -> None:
    model = small_model()
    images = torch.rand(4, 3, 64, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        torch.manual_seed(1)  # same hidden patches each step: the loss must fall
        loss = model.masked_reconstruction_loss(images)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first * 0.9


def test_memory_bank_nearest_distance_matches_cdist() -> None:
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(50, 8, generator=g), torch.randn(30, 8, generator=g)
    expected = torch.cdist(queries, bank).min(1).values
    assert torch.allclose(nearest_distance(queries, bank, chunk=7), expected, atol=1e-4)
    idx = greedy_coreset(bank, 10)
    assert len(set(idx.tolist())) == 10


def test_memory_bank_distances_stay_float32_under_bf16_autocast() -> None:
    """Unit descriptors 0.005-0.02 apart, as a from-scratch encoder's patches are: bf16 products
    would round all of these distances to 0 (the expanded form subtracts numbers near 2)."""
    g = torch.Generator().manual_seed(0)
    centre = torch.nn.functional.normalize(torch.randn(1, 64, generator=g), dim=1)
    bank = torch.nn.functional.normalize(centre + 0.002 * torch.randn(200, 64, generator=g), dim=1)
    queries = torch.nn.functional.normalize(centre + 0.002 * torch.randn(40, 64, generator=g), dim=1)
    expected = torch.cdist(queries.double(), bank.double()).min(1).values.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = nearest_distance(queries, bank)
        kept = greedy_coreset(bank, 20)
    assert got.dtype == torch.float32 and float(expected.min()) > 0.005
    torch.testing.assert_close(got, expected, rtol=0.02, atol=5e-4)
    assert len(set(kept.tolist())) == 20


def test_fitted_memory_bank_scores_outlier_patches_higher() -> None:
    model = small_model().eval()
    good = torch.full((4, 3, 64, 64), 0.5) + 0.02 * torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        desc, _ = model.descriptors(good)
        model.memory.fit(desc.flatten(0, 1))
        odd = good[:1].clone()
        odd[..., 20:40, 20:40] = torch.rand(1, 3, 20, 20)
        out = model(torch.cat([good[:1], odd]))
    peaks = out.memory_map.flatten(1).amax(1)
    assert peaks[1] > peaks[0]


def test_model_dir_round_trip(tmp_path) -> None:
    model = small_model()
    cal = Calibration(threshold=0.3, class_names=("a", "b", "c"))
    save_model_dir(tmp_path / "m", model, cal, {"training": {"note": "test"}})
    inspector = load_inspector(tmp_path / "m")
    assert inspector.threshold == 0.3 and inspector.class_names == ["a", "b", "c"]
    image = (np.random.default_rng(0).random((90, 120, 3)) * 255).astype(np.uint8)
    resized = cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA)
    model.encoder.use_fused_attention(inspector.device.type != "cpu")  # the attention form it serves with
    with torch.no_grad(), autocast(inspector.device, inspector.autocast_dtype):  # and the precision
        expected = model.eval()(torch.from_numpy(resized).permute(2, 0, 1)[None].float() / 255)
    result = inspector.inspect_batch([image], heatmaps=True)[0]
    assert result.heatmap.shape == (90, 120)
    head = 0.5 * (expected.map_score + expected.image_prob)
    assert result.score == pytest.approx(float(head[0]), abs=1e-5)
    assert result.is_defect == (result.score >= 0.3)


def test_incomplete_or_foreign_model_dirs_are_refused(tmp_path) -> None:
    with pytest.raises(LineInspectError, match="not found"):
        load_inspector(tmp_path / "nothing")
    save_model_dir(tmp_path / "m", small_model(), Calibration())
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(LineInspectError, match="model.safetensors"):
        load_inspector(tmp_path / "m")
    save_model_dir(tmp_path / "v", small_model(), Calibration())
    cfg = json.loads((tmp_path / "v" / "config.json").read_text())
    cfg["format_version"] = 99
    (tmp_path / "v" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LineInspectError, match="version 99"):
        load_inspector(tmp_path / "v")
    (tmp_path / "v" / "config.json").unlink()
    with pytest.raises(LineInspectError, match="config.json"):
        load_inspector(tmp_path / "v")
    # Weights whose shapes differ from what config.json builds (another version, or an edited config).
    save_model_dir(tmp_path / "s", small_model(), Calibration())
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    cfg["model"]["head"]["decoder_channels"] *= 2
    (tmp_path / "s" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LineInspectError, match="weights do not match config.json .*size mismatch.*retrain"):
        load_inspector(tmp_path / "s")


def test_untrained_inspector_any_image_size() -> None:
    inspector = untrained_inspector("tiny")
    images = [np.zeros((480, 640, 3), np.uint8), np.full((31, 17, 3), 200, np.uint8)]
    results = inspector.inspect_batch(images, heatmaps=[True, False])
    assert results[0].heatmap.shape == (480, 640) and results[1].heatmap is None
    assert all(0 <= r.score <= 1 for r in results)


def test_class_head_looks_at_the_defect_not_the_faint_background() -> None:
    """Named from the focus region, a small defect on a map with faint background probability is
    not described as the whole image: the region is the defect's own pixels."""
    from lineinspect.vision.heads import focus_region, region_stats

    prob = torch.full((1, 1, 64, 64), 0.15)
    prob[..., 30:34, 10:40] = 0.9  # a thin horizontal defect
    region = focus_region(prob)
    assert set(region.unique().tolist()) == {0.0, 1.0} and int(region.sum()) == 4 * 30
    images = torch.rand(1, 3, 64, 64)
    area_focus, area_soft = region_stats(region, images)[0, 0], region_stats(prob, images)[0, 0]
    assert float(area_focus) < float(area_soft) - 1.0  # log area: the soft map looks far larger



def test_focus_region_keeps_the_spot_that_holds_the_peak() -> None:
    """A weaker second spot above half the peak stays out of the region (it would stretch the
    namer's crop around both); a long defect joined to the peak stays whole, gaps under 4 px too."""
    from lineinspect.vision.heads import focus_region

    prob = torch.full((2, 1, 96, 96), 0.05)
    prob[0, :, 10:14, 8:90] = 0.9  # a long scratch across the image...
    prob[0, :, 10:14, 40:42] = 0.2  # ... broken by a 2 px gap below half the peak
    prob[0, :, 60:70, 60:70] = 0.7  # and a separate, weaker spot
    prob[1, :, 50:53, 20:25] = 0.8  # one small spot
    region = focus_region(prob)
    assert int(region[0, :, 60:70, 60:70].sum()) == 0
    assert int(region[0].sum()) == 4 * 80 and int(region[1].sum()) == 3 * 5
    assert set(region.unique().tolist()) == {0.0, 1.0}


def test_explicit_attention_computes_what_the_fused_kernel_does_and_serves_on_cpus() -> None:
    model = small_model().eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        fused = model.encoder(x).patches
        model.encoder.use_fused_attention(False)
        explicit = model.encoder(x).patches
    torch.testing.assert_close(explicit, fused, rtol=1e-4, atol=1e-5)
    model.encoder.use_fused_attention(True)
    Inspector(model, Calibration(), "cpu")  # the faster form on a CPU
    flags = [m.fused_attn for m in model.encoder.modules() if hasattr(m, "fused_attn")]
    assert flags and not any(flags)


def test_every_defect_verdict_says_where_to_look() -> None:
    """A defect verdict whose map stays under the box levels still gets a box: around the map's peak."""
    insp = Inspector(small_model(), Calibration(threshold=0.0, pixel_threshold=0.999), "cpu")  # all defect, no level
    image = np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    result = insp.inspect_batch([image], heatmaps=True)[0]
    assert result.is_defect and len(result.boxes) == 1
    box = result.boxes[0]
    assert box.score < 0.999 and 0 <= box.x0 < box.x1 <= 120 and 0 <= box.y0 < box.y1 <= 90
    y, x = np.unravel_index(int(result.heatmap.argmax()), result.heatmap.shape)
    assert box.x0 - 4 <= x < box.x1 + 4 and box.y0 - 4 <= y < box.y1 + 4  # the peak (at model resolution) is inside
    insp.calibration = Calibration(threshold=1.1, pixel_threshold=0.999)  # good verdicts get no boxes
    assert insp.inspect_batch([image])[0].boxes == []
