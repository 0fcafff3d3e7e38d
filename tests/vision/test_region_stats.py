"""Regional grey-level statistics: the training-free score fitted beside the memory bank."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from lineinspect.errors import LineInspectError
from lineinspect.vision.defect_model import DefectModel, DefectModelConfig
from lineinspect.vision.encoder import preset
from lineinspect.vision.heads import HeadConfig
from lineinspect.vision.inspector import (
    Calibration,
    calibrated_map,
    graph_fields,
    image_scores,
    squash_peak,
    uses_memory,
)
from lineinspect.vision.model_io import load_inspector, save_model_dir
from lineinspect.vision.region_stats import QUANTILES, SCALES, STATS, RegionStatsBank, region_stats


def textured(n: int, seed: int) -> torch.Tensor:
    """Grey parts with fine noise, as a line's good images."""
    g = torch.Generator().manual_seed(seed)
    return (0.5 + 0.05 * torch.randn(n, 1, 64, 64, generator=g)).clamp(0, 1).expand(n, 3, 64, 64).contiguous()


def test_region_stats_of_a_flat_image_and_the_region_grid() -> None:
    flat = torch.full((2, 3, 64, 64), 0.25)
    half, quarter = region_stats(flat, 0.5), region_stats(flat, 0.25)
    assert half.shape == (2, 9, STATS) and quarter.shape == (2, 49, STATS)  # stride half a region
    expected = torch.tensor([0.25, 0.0, 0.25, 0.25, 0.25, 0.25])
    torch.testing.assert_close(half[1, 4], expected, rtol=0, atol=0.5 / 255)  # quantiles to the nearest grey level
    ramp = torch.linspace(0, 1, 64 * 64).view(1, 1, 64, 64).expand(1, 3, 64, 64)
    mean, std, q01, q10, q90, q99 = region_stats(ramp, 1.0)[0, 0]
    assert q01 < q10 < mean < q90 < q99 and float(q99 - q01) == pytest.approx(0.98, abs=0.01) and std > 0.2
    # The histogram's quantiles are the sorted pixels' order statistics, to half a grey level.
    image = torch.randint(0, 256, (2, 3, 64, 64)).float() / 255
    pixels = image.mean(1).unfold(1, 16, 8).unfold(2, 16, 8).flatten(3).flatten(1, 2).sort(-1).values
    ordered = torch.stack([pixels[..., round(q * 255)] for q in QUANTILES], -1)
    torch.testing.assert_close(region_stats(image, 0.25)[..., 2:], ordered, rtol=0, atol=0.5 / 255)


def test_a_darker_region_scores_above_held_out_good_parts() -> None:
    bank = RegionStatsBank(4096)
    assert not bank.ready
    bank.fit(textured(40, seed=0))
    assert bank.ready and bool(bank.fitted)
    assert int((bank.bank[0] < 1e3).all(1).sum()) == 36 * 9  # 4 of every 40 held out as the reference
    good = textured(8, seed=1)
    patch = good.clone()
    patch[:, :, 8:28, 30:50] -= 0.15  # a faint dark patch, a tenth of the image
    dots = good.clone()
    dots[:, :, 40:44:2, 10:60:6] = 0.05  # a row of dark specks
    scores = [bank(x)[0] for x in (good, patch, dots)]
    assert float(scores[1].min()) > float(scores[0].max()) and float(scores[2].min()) > float(scores[0].max())
    assert abs(float(scores[0].mean())) < 2.0  # standardised by held-out goods: goods sit near 0


def test_the_region_map_marks_where_the_unusual_region_is() -> None:
    bank = RegionStatsBank(4096)
    bank.fit(textured(40, seed=0))
    patch = textured(4, seed=1)
    patch[:, :, 40:60, 4:24] -= 0.15  # bottom left
    score, heat = bank(patch)
    assert heat.shape == (4, 1, 64, 64)
    inside, far = heat[:, 0, 40:60, 4:24].mean((1, 2)), heat[:, 0, 0:20, 40:64].mean((1, 2))  # top right
    assert bool((inside > far + 3.0).all())  # several of the goods' spreads apart
    assert bool((heat.flatten(1).amax(1) <= score + 1e-4).all())  # smoothing never lifts it above the score


def fitted_model() -> tuple[DefectModel, torch.Tensor]:
    torch.manual_seed(0)
    model = DefectModel(DefectModelConfig(preset("tiny", img_size=64), HeadConfig(), memory_bank_size=64,
                                          region_bank_size=512)).eval()
    good = textured(12, seed=0)
    with torch.no_grad():
        desc, _ = model.descriptors(good)
        model.memory.fit(desc.flatten(0, 1))
        model.regions.fit(good)
    return model, good


def test_the_bank_is_saved_with_the_model_and_older_model_dirs_load_without_it(tmp_path) -> None:
    model, good = fitted_model()
    save_model_dir(tmp_path / "m", model, Calibration(score_source="fused"))
    loaded = load_inspector(tmp_path / "m", cuda_graphs=False)
    assert loaded.model.regions.ready and loaded.model.config.region_bank_size == 512
    torch.testing.assert_close(loaded.model.regions.bank, model.regions.bank)
    with torch.no_grad():
        scores = image_scores(loaded.model(good[:2]), loaded.calibration)
    assert "regions" in scores and scores["fused"].shape == (2,)

    # A directory written before the region statistics existed: no regions.* tensors, no config entry.
    weights = tmp_path / "m" / "model.safetensors"
    save_file({k: v for k, v in load_file(str(weights)).items() if not k.startswith("regions.")}, str(weights))
    config = tmp_path / "m" / "config.json"
    written = json.loads(config.read_text())
    del written["model"]["region_bank_size"]
    config.write_text(json.dumps(written))
    older = load_inspector(tmp_path / "m", cuda_graphs=False)
    assert not older.model.regions.ready
    with torch.no_grad():
        out = older.model(good[:2])
    assert out.region_score is None and out.memory_map is not None
    assert set(image_scores(out, older.calibration)) == {"image", "map", "head", "memory", "novelty", "fused"}


def test_both_scales_are_fitted() -> None:
    bank = RegionStatsBank(256)
    bank.fit(textured(20, seed=2))
    assert bank.bank.shape == (len(SCALES), 256, STATS)
    assert (bank.ref_std > 0).all() and (bank.spread > 0).all()


def test_fitting_uint8_images_matches_fitting_them_as_floats() -> None:
    images = (textured(25, seed=3) * 255).round().to(torch.uint8)
    from_bytes, from_floats = RegionStatsBank(1024), RegionStatsBank(1024)
    from_bytes.fit(images)
    from_floats.fit(images.float() / 255)
    for name, tensor in from_bytes.state_dict().items():
        torch.testing.assert_close(tensor, from_floats.state_dict()[name])


def test_the_fused_map_is_the_geometric_mean_of_the_heads_and_the_banks_weighted_squashed_maps() -> None:
    model, good = fitted_model()
    image = good[:2].clone()
    image[:, :, 40:60, 4:24] -= 0.15
    with torch.no_grad():
        out = model(image)
    cal = Calibration(score_source="fused", map_source="fused", memory_mean=0.3, memory_std=0.1, region_mean=1.0,
                      region_std=2.0)
    assert torch.equal(calibrated_map(out, replace(cal, map_source="head")), out.anomaly_map)
    memory, regions = squash_peak((out.memory_map - 0.3) / 0.1), squash_peak((out.region_map - 1.0) / 2.0)
    expected = (out.anomaly_map * (memory + 2 * regions) / 3).sqrt()  # the statistics weighted as in the score
    torch.testing.assert_close(calibrated_map(out, cal), expected)
    older = (out.anomaly_map * (memory + regions) / 2).sqrt()  # calibrations written before the weight
    torch.testing.assert_close(calibrated_map(out, replace(cal, region_weight=1.0)), older)
    assert uses_memory(replace(cal, score_source="head"))  # a fused map needs the bank whatever the score


def test_calibrations_written_before_the_map_source_serve_the_heads_map() -> None:
    written = Calibration(score_source="fused").to_dict()
    del written["map_source"]
    assert Calibration.from_dict(written).map_source == "head"
    with pytest.raises(LineInspectError, match="unknown map source 'regions'"):
        Calibration.from_dict({**written, "map_source": "regions"})
    assert Calibration.from_dict({**written, "score_source": "regions"}).score_source == "regions"
    with pytest.raises(LineInspectError, match="unknown score source 'region'"):
        Calibration.from_dict({**written, "score_source": "region"})


def test_the_fused_score_counts_the_region_statistics_twice_and_older_calibrations_once() -> None:
    model, good = fitted_model()
    with torch.no_grad():
        out = model(good[:3])
    cal = Calibration(score_source="fused")
    scores = image_scores(out, cal)
    parts = scores["head"] + scores["memory"] + scores["novelty"]
    torch.testing.assert_close(scores["fused"], (parts + 2 * scores["regions"]) / 5)
    written = cal.to_dict()
    del written["region_weight"]  # written before the field existed
    older = Calibration.from_dict(written)
    assert older.region_weight == 1.0
    torch.testing.assert_close(image_scores(out, older)["fused"], (parts + scores["regions"]) / 4)
    assert graph_fields(older) != graph_fields(cal)  # graphs compute the fused score: a new weight recaptures
