"""Symmetric int8 linears: the arithmetic, the model directory round trip, serving, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lineinspect.errors import LineInspectError
from lineinspect.service.cli import main
from lineinspect.training.synth import write_synthetic_dataset
from lineinspect.vision import int8
from lineinspect.vision.defect_model import DefectModel, DefectModelConfig
from lineinspect.vision.encoder import preset
from lineinspect.vision.heads import HeadConfig
from lineinspect.vision.inspector import Calibration
from lineinspect.vision.int8 import SCHEME, Int8Linear, cpu_engine, quantize_weight
from lineinspect.vision.model_io import load_inspector, load_model_dir, save_model_dir

# Head scores are means of sigmoids (slope <= 1/4), so they move by at most a quarter of the logits'
# change. Per layer, int8 weights (half a step: 1/254 of a row's largest weight) and 7-bit activations
# change outputs by about 1%; through the tiny encoder's 4 blocks logits move by a few hundredths at
# most. Measured on random tiny models: |score change| <= 0.0013, map correlation > 0.99999.
SCORE_TOLERANCE = 0.01


@pytest.fixture(scope="module")
def float_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = DefectModel(DefectModelConfig(preset("tiny", img_size=64), HeadConfig(), memory_bank_size=64))
    return save_model_dir(tmp_path_factory.mktemp("models") / "fp32", model, Calibration())


@pytest.fixture(scope="module")
def line(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("line") / "metal"
    write_synthetic_dataset(root, n=16, seed=1, surface="metal", size=64)
    return root


@pytest.fixture(scope="module")
def quantized(float_model, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("models") / "int8"
    assert main(["quantize", "--model", str(float_model), "--out", str(out)]) == 0
    return out, json.loads((out / "config.json").read_text())


def test_weights_are_symmetric_per_output_channel() -> None:
    w = torch.randn(8, 40) * torch.logspace(-3, 1, 8)[:, None]  # rows of very different ranges
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (8,)
    assert int(q.abs().amax(1).min()) == 127 and int(q.min()) >= -127  # each row's largest |w| -> 127, zero at 0
    assert torch.all((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7)


def test_int8_linear_matches_float_on_every_path(monkeypatch) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 48)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(2, 7, 96)
    with torch.no_grad():
        ref = linear(x)

    def rel(y: torch.Tensor) -> float:
        return float((y.float() - ref).abs().max() / ref.abs().max())

    assert cpu_engine() is not None, "torch's int8 dynamic linear kernel is missing: no CPU speed-up here"
    assert rel(layer(x)) < 0.02
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and rel(y) < 0.03
    monkeypatch.setattr(int8, "cpu_engine", lambda: None)  # a torch without the kernels: dequantised float
    assert rel(layer(x)) < 0.01


def test_quantize_round_trip_keeps_outputs(float_model, quantized) -> None:
    out, config = quantized
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # no pickles
    layers = config["quantization"]["layers"]
    assert config["quantization"]["scheme"] == SCHEME
    assert len(layers) == 4 * 4 and all(n.startswith("encoder.vit.blocks.") for n in layers)  # qkv/proj/fc1/fc2
    state = load_file(str(out / "model.safetensors"))
    assert all(state[f"{n}.weight_int8"].dtype == torch.int8 and f"{n}.weight" not in state for n in layers)

    ref_model, _, _ = load_model_dir(float_model)
    q_model, _, _ = load_model_dir(out)
    assert all(isinstance(q_model.get_submodule(n), Int8Linear) for n in layers)
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a, b = ref_model(x), q_model(x)
    for i in range(3):
        corr = np.corrcoef(a.anomaly_map[i].flatten().numpy(), b.anomaly_map[i].flatten().numpy())[0, 1]
        assert corr > 0.99
    assert torch.allclose(a.image_prob, b.image_prob, atol=SCORE_TOLERANCE)


def test_quantize_reports_the_change_on_held_out_images(float_model, line, tmp_path, capsys) -> None:
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(float_model), "--out", str(out), "--calibration-data", str(line)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    check = report["check"]
    assert report["layers"] == 16 and report["weights_mb"]["after"] < report["weights_mb"]["before"]
    assert check["n_images"] == 18 and check["map_correlation_min"] > 0.99
    assert check["score_abs_diff_max"] < SCORE_TOLERANCE and "image_auroc" in check


def test_quantized_model_serves_in_inspector(quantized) -> None:
    inspector = load_inspector(quantized[0])
    assert inspector.autocast_dtype is None  # int8 kernels take fp32: the rest stays fp32 on CPUs
    frames = [np.random.default_rng(i).integers(0, 256, (48 + 16 * i, 80, 3), dtype=np.uint8) for i in range(3)]
    results = inspector.inspect_batch(frames, heatmaps=True)
    assert len(results) == 3
    for frame, r in zip(frames, results):
        assert 0.0 <= r.score <= 1.0 and r.heatmap.shape == frame.shape[:2]


def test_bad_quantized_model_dirs_fail_clearly(quantized, float_model, tmp_path, capsys) -> None:
    out, config = quantized

    def variant(name: str, **changes) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
        (d / "config.json").write_text(json.dumps({**config, **changes}))
        return d

    bad_scheme = variant("scheme", quantization={"scheme": "int4-asymmetric", "layers": []})
    with pytest.raises(LineInspectError, match="config.json: unknown quantization .*int4-asymmetric"):
        load_model_dir(bad_scheme)
    bad_layer = variant("layer", quantization={"scheme": SCHEME, "layers": ["head.stem"]})
    with pytest.raises(LineInspectError, match="'head.stem' is not a linear layer of this model"):
        load_model_dir(bad_layer)
    no_flag = variant("noflag")
    json.dump({k: v for k, v in config.items() if k != "quantization"}, (no_flag / "config.json").open("w"))
    with pytest.raises(LineInspectError, match="weights do not match config.json"):
        load_model_dir(no_flag)

    for args, message in ((["--model", str(out), "--out", str(tmp_path / "x")], "is already quantised"),
                          (["--model", str(float_model), "--out", str(float_model)], "is the input model"),
                          (["--model", str(tmp_path / "none"), "--out", str(tmp_path / "y")], "not found")):
        assert main(["quantize", *args]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
