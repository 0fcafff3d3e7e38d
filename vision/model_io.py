"""Model directories: `model.safetensors` + `config.json`, self-contained, never pickles.

A model with int8 linear layers (`vision.int8`, written by `lineinspect quantize`) stores their int8
weights and per-channel scales as tensors and lists the layers in config.json under "quantization";
loading rebuilds those layers before reading the weights.

A model directory is written to a temporary sibling and renamed into place, so an interrupted
save never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lineinspect import __version__
from lineinspect.errors import LineInspectError
from lineinspect.vision.defect_model import DefectModel, DefectModelConfig
from lineinspect.vision.encoder import EncoderConfig, preset
from lineinspect.vision.heads import HeadConfig
from lineinspect.vision.inspector import Calibration, Inspector
from lineinspect.vision.int8 import SCHEME, int8_layout, quantized_layers

FORMAT = "lineinspect-defect-model"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
# Buffers added after models were first saved: a model directory without them loads with them unfitted.
LATER_BUFFERS = ("regions.",)
CONFIG = "config.json"


def model_config_to_dict(config: DefectModelConfig) -> dict:
    return {"encoder": config.encoder.to_dict(), "head": config.head.to_dict(),
            "memory_bank_size": config.memory_bank_size, "region_bank_size": config.region_bank_size,
            "map_smoothing": config.map_smoothing}


def model_config_from_dict(data: dict) -> DefectModelConfig:
    return DefectModelConfig(
        encoder=EncoderConfig.from_dict(data["encoder"]), head=HeadConfig.from_dict(data["head"]),
        memory_bank_size=data["memory_bank_size"], map_smoothing=data["map_smoothing"],
        **({"region_bank_size": data["region_bank_size"]} if "region_bank_size" in data else {}),
    )


def save_model_dir(out: str | Path, model: DefectModel, calibration: Calibration, extra: dict | None = None) -> Path:
    """Write the model directory atomically; `extra` (training summary, data info) goes in config.json."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        config = {"format": FORMAT, "format_version": FORMAT_VERSION, "lineinspect_version": __version__,
                  "model": model_config_to_dict(model.config), "calibration": calibration.to_dict(),
                  **(extra or {})}
        layers = quantized_layers(model)
        if layers:
            config["quantization"] = {"scheme": SCHEME, "layers": layers}
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, default=str))
        if out.exists():
            keep = [p for p in out.iterdir() if p.name not in (WEIGHTS, CONFIG)]
            for p in keep:  # e.g. training checkpoints stay with the model
                os.replace(p, tmp / p.name)
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_model_config(model_dir: str | Path) -> dict:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise LineInspectError(f"{model_dir}: model directory not found; train one with `lineinspect train`")
    path = model_dir / CONFIG
    if not path.is_file():
        raise LineInspectError(f"{path}: missing; {model_dir} is not a complete lineinspect model directory")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LineInspectError(f"{path}: not valid JSON ({exc}); retrain or restore the model") from exc
    if config.get("format") != FORMAT:
        raise LineInspectError(f"{path}: not a lineinspect defect model (format={config.get('format')!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise LineInspectError(
            f"{path}: model format version {config.get('format_version')} but this lineinspect "
            f"({__version__}) reads version {FORMAT_VERSION}; retrain the model with this version"
        )
    return config


def load_model_dir(model_dir: str | Path) -> tuple[DefectModel, Calibration, dict]:
    """-> (model on CPU in eval mode, calibration, full config dict)."""
    model_dir = Path(model_dir)
    config = read_model_config(model_dir)
    try:
        model = DefectModel(model_config_from_dict(config["model"]))
        calibration = Calibration.from_dict(config["calibration"])
    except (KeyError, TypeError, ValueError) as exc:
        raise LineInspectError(f"{model_dir / CONFIG}: incomplete or from another version ({exc}); retrain") from exc
    if "quantization" in config:
        rebuild_quantized(model, config["quantization"], model_dir / CONFIG)
    weights = model_dir / WEIGHTS
    if not weights.is_file():
        raise LineInspectError(f"{weights}: missing; {model_dir} is not a complete model directory")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise LineInspectError(f"{weights}: unreadable or truncated weights ({exc}); retrain or restore") from exc
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(LATER_BUFFERS)]
    except RuntimeError as exc:  # a tensor's shape differs from what config.json builds
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
        raise LineInspectError(f"{weights}: weights do not match config.json ({detail}); the directory was "
                               "written by another lineinspect version or edited; retrain") from None
    if missing or unexpected:
        raise LineInspectError(
            f"{weights}: weights do not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.eval(), calibration, config


def rebuild_quantized(model: DefectModel, quantization: object, path: Path) -> None:
    """Give `model` the int8 layers that config.json's "quantization" entry lists (before its weights load)."""
    scheme = quantization.get("scheme") if isinstance(quantization, dict) else None
    layers = quantization.get("layers") if isinstance(quantization, dict) else None
    if scheme != SCHEME or not isinstance(layers, list) or not all(isinstance(n, str) for n in layers):
        raise LineInspectError(f"{path}: unknown quantization {quantization!r}; this lineinspect ({__version__}) "
                               f'reads {{"scheme": "{SCHEME}", "layers": [layer names]}}')
    try:
        int8_layout(model, layers)
    except LineInspectError as exc:
        raise LineInspectError(f"{path}: quantization does not match the model ({exc})") from exc


def resolve_device(device: str) -> torch.device:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LineInspectError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
    return torch.device(device)


def load_inspector(model_dir: str | Path, device: str = "cpu", cuda_graphs: bool = True,
                   precision: str = "auto") -> Inspector:
    """The model directory's Inspector; on CUDA it runs from CUDA graphs unless `cuda_graphs` is off.
    `precision` as in `vision.precision` (auto: bf16 where the device computes it natively)."""
    model, calibration, config = load_model_dir(model_dir)
    device = resolve_device(device)
    if "quantization" not in config:
        return Inspector(model, calibration, device, preset=config["model"]["encoder"]["preset"],
                         cuda_graphs=cuda_graphs, precision=precision)
    # int8 (vision.int8) is a CPU format. Its kernels take fp32, and bf16 autocast around them added
    # casts and was slower (s14 b1: 284 vs 179 ms, contended 2-core CPU), so the other layers stay fp32;
    # on GPUs it runs dequantised and eager (the CUDA graph path rebuilds a float model).
    return Inspector(model, calibration, device, preset=config["model"]["encoder"]["preset"],
                     precision="fp32" if device.type == "cpu" else "auto", cuda_graphs=False)


def untrained_inspector(preset_name: str = "tiny", device: str = "cpu", seed: int = 0,
                        num_classes: int = 0, cuda_graphs: bool = True) -> Inspector:
    """Random weights: for contract tests and speed benchmarks, never for verdicts."""
    torch.manual_seed(seed)
    config = DefectModelConfig(preset(preset_name), HeadConfig(num_classes=num_classes))
    names = tuple(f"class_{i}" for i in range(num_classes))
    return Inspector(DefectModel(config), Calibration(class_names=names), resolve_device(device),
                     cuda_graphs=cuda_graphs)


__all__ = ["save_model_dir", "load_model_dir", "load_inspector", "untrained_inspector", "read_model_config"]
