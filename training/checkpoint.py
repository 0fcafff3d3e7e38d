"""Resumable training state: weights, optimiser moments and progress, in safetensors + JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lineinspect.errors import LineInspectError

STATE = "state.safetensors"
META = "state.json"


def save_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict) -> None:
    """Write atomically: files go to temporary names, then replace the previous checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"opt.{idx}.{key}"] = torch.as_tensor(value).detach().contiguous().cpu()
    meta = {**meta, "param_groups": opt["param_groups"]}
    save_file(tensors, str(folder / (STATE + ".tmp")))
    (folder / (META + ".tmp")).write_text(json.dumps(meta))
    os.replace(folder / (STATE + ".tmp"), folder / STATE)
    os.replace(folder / (META + ".tmp"), folder / META)


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model and optimiser in place; returns the saved progress dict."""
    try:
        meta = json.loads((folder / META).read_text())
        tensors = load_file(str(folder / STATE))
    except (OSError, json.JSONDecodeError, Exception) as exc:  # safetensors raises its own error types
        raise LineInspectError(f"{folder}: training checkpoint unreadable ({exc}); delete it to start over") from exc
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
    return meta


def has_checkpoint(folder: Path) -> bool:
    return (folder / STATE).is_file() and (folder / META).is_file()
