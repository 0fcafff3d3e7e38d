"""Decoder model directory: ``decoder.json`` (the config) + ``decoder.safetensors`` (the weights).

Separate functions, so the modules themselves never touch files. safetensors, never pickles.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from lineinspect.errors import LineInspectError
from lineinspect.moe_lm.config import DecoderConfig
from lineinspect.moe_lm.decoder import MoEDecoder

CONFIG_FILE = "decoder.json"
WEIGHTS_FILE = "decoder.safetensors"


def save_decoder(model: MoEDecoder, directory: str | Path) -> None:
    """Write the config and weights into `directory` (created if missing)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    save_model(model, str(directory / WEIGHTS_FILE))  # handles the tied embedding / LM head


def load_decoder(directory: str | Path, device: torch.device | str = "cpu") -> MoEDecoder:
    """Build the decoder from `directory`'s config and load its weights (strict)."""
    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise LineInspectError(f"decoder: {directory / name} is missing; is {directory} a decoder directory?")
    try:
        config = DecoderConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise LineInspectError(f"decoder: {directory / CONFIG_FILE} is not a valid decoder config ({exc})") from exc
    model = MoEDecoder(config)
    missing, unexpected = load_model(model, str(directory / WEIGHTS_FILE), strict=False, device=str(device))
    if missing or unexpected:
        raise LineInspectError(
            f"decoder: {directory / WEIGHTS_FILE} does not match its config "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    return model.to(device)
