"""Load a user's pretrained ViT (timm, OpenAI CLIP or OpenCLIP key layout) into a VisionEncoder.

Everything but the two file readers at the bottom is a pure function over state dicts:
``detect_layout`` names the key layout, ``infer_encoder_config`` reads the architecture off the
tensor shapes, ``convert_state_dict`` renames keys into VisionEncoder's own (``vit.`` + timm
names). ``load_pretrained_encoder`` reads a local file (safetensors, or a torch pickle opened with
``weights_only=True`` so that it can never run code) and returns a loaded encoder.

Two things cannot be read from the weights and are guessed from the layout: the MLP activation
(``quick_gelu`` for OpenAI CLIP, ``gelu`` otherwise; pass ``act=`` to override) and the
LayerNorm epsilon (1e-5 for CLIP towers and timm's CLIP-derived pre-norm ViTs, 1e-6 otherwise).
"""

from __future__ import annotations

import logging
import math
import pickle
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed

from lineinspect.errors import LineInspectError
from lineinspect.vision.encoder import EncoderConfig, VisionEncoder

_log = logging.getLogger(__name__)

LAYOUTS = ("timm", "openai_clip", "open_clip", "lineinspect")
CLIP_LAYOUTS = ("openai_clip", "open_clip")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

# Training checkpoints nest the weights under one of these keys (timm, OpenCLIP, DeiT, ...).
_WRAPPER_KEYS = ("state_dict", "model")
# Prefixes that wrappers add to every key: DataParallel/DDP, torch.compile, Lightning-style.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
# A bare VisionEncoder, or the encoder inside a lineinspect DefectModel (model.safetensors).
_LINEINSPECT_PREFIXES = ("vit.", "encoder.vit.")
# timm keys of heads the encoder does not have (classifier, attention-pool head).
_TIMM_HEADS = ("head.", "attn_pool.")

# CLIP visual tower (OpenAI and OpenCLIP share it) -> timm VisionTransformer names.
_CLIP_TOP = {
    "conv1.weight": "patch_embed.proj.weight",
    "conv1.bias": "patch_embed.proj.bias",
    "class_embedding": "cls_token",
    "positional_embedding": "pos_embed",
    "ln_pre.weight": "norm_pre.weight",
    "ln_pre.bias": "norm_pre.bias",
    "ln_post.weight": "norm.weight",
    "ln_post.bias": "norm.bias",
}
_CLIP_BLOCK = {
    "ln_1.weight": "norm1.weight",
    "ln_1.bias": "norm1.bias",
    "attn.in_proj_weight": "attn.qkv.weight",  # (3C, C), rows q|k|v as in timm's qkv
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.weight": "attn.proj.weight",
    "attn.out_proj.bias": "attn.proj.bias",
    "ls_1.gamma": "ls1.gamma",  # OpenCLIP layer scale
    "ln_2.weight": "norm2.weight",
    "ln_2.bias": "norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
    "ls_2.gamma": "ls2.gamma",
}
_CLIP_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_CLIP_UNUSED = ("proj",)  # the image-to-joint-space projection; the encoder keeps its own width
_BLOCK_INDEX = re.compile(r"blocks\.(\d+)\.")

_SHOW = 5  # how many keys an error message lists per kind


class ConvertedCheckpoint(NamedTuple):
    state_dict: dict[str, torch.Tensor]  # VisionEncoder names (`vit.` + timm names)
    layout: str  # one of LAYOUTS
    dropped: list[str]  # source keys the encoder does not use (text tower, heads, non-tensors)


class _Parsed(NamedTuple):
    layout: str
    tensors: dict[str, torch.Tensor]  # timm VisionTransformer names, no `vit.` prefix
    dropped: list[str]


# --------------------------------------------------------------------------- layout detection


def _unwrap(checkpoint: Any, source: str) -> tuple[Mapping[str, Any], bool]:
    """The flat state dict inside ``{"state_dict": ...}`` / ``{"model": ...}``; and whether it was wrapped."""
    wrapped = False
    while isinstance(checkpoint, Mapping):
        inner = next((checkpoint[k] for k in _WRAPPER_KEYS if isinstance(checkpoint.get(k), Mapping)), None)
        if inner is None:
            break
        checkpoint, wrapped = inner, True
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        held = "an empty dict" if isinstance(checkpoint, Mapping) else f"a {type(checkpoint).__name__}"
        raise LineInspectError(
            f"{source}: holds {held}, not a state dict of tensors; save the model's state_dict() "
            "(safetensors preferred)"
        )
    return checkpoint, wrapped


def _strip_prefixes(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Remove wrapper prefixes shared by every key (``module.``, ``_orig_mod.``, ``model.``)."""
    sd = {str(k): v for k, v in state_dict.items()}
    stripped: list[str] = []
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
                stripped.append(prefix)
                changed = True
    return sd, stripped


def _classify(keys: set[str], wrapped: bool, stripped: list[str]) -> str | None:
    if any(f"{p}patch_embed.proj.weight" in keys for p in _LINEINSPECT_PREFIXES):
        return "lineinspect"
    if "visual.conv1.weight" in keys or "conv1.weight" in keys:
        # The tower is the same for both; only OpenCLIP wraps, prefixes, layer-scales or adds a logit bias.
        open_clip_signs = (
            wrapped
            or "module." in stripped
            or "logit_bias" in keys
            or any(k.endswith((".ls_1.gamma", ".ls_2.gamma")) for k in keys)
        )
        return "open_clip" if open_clip_signs else "openai_clip"
    if "patch_embed.proj.weight" in keys and any(k.startswith("blocks.") for k in keys):
        return "timm"
    return None


def _detect(checkpoint: Any, source: str) -> tuple[str, dict[str, Any]]:
    flat, wrapped = _unwrap(checkpoint, source)
    sd, stripped = _strip_prefixes(flat)
    layout = _classify(set(sd), wrapped, stripped)
    if layout is None:
        first = ", ".join(list(sd)[:_SHOW])
        raise LineInspectError(
            f"{source}: unknown checkpoint layout (first keys: {first}); expected a timm ViT "
            "(patch_embed.proj.weight, blocks.N...), an OpenAI CLIP or OpenCLIP model "
            "(visual.conv1.weight, visual.transformer.resblocks.N...) or a lineinspect encoder "
            "(vit.*, encoder.vit.*)"
        )
    return layout, sd


def detect_layout(state_dict: Mapping[str, Any], source: str = "checkpoint") -> str:
    """One of ``LAYOUTS`` for a state dict (optionally wrapped in ``{"state_dict": ...}`` or
    ``{"model": ...}``, keys optionally prefixed ``module.``/``model.``). ``source`` names the
    file in error messages. Raises LineInspectError for a layout it does not know.
    """
    return _detect(state_dict, source)[0]


# --------------------------------------------------------------------------- renaming


def _clip_to_timm(sd: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """CLIP visual-tower names -> timm names. Keys outside the tower are dropped; unknown tower
    keys keep their names so that the shape check reports them as unexpected."""
    prefix = "visual." if any(k.startswith("visual.") for k in sd) else ""  # full model or bare tower
    tower = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    dropped = [k for k in sd if not k.startswith(prefix)]  # text tower, logit scale, ...
    out: dict[str, Any] = {}
    for key, value in tower.items():
        if key in _CLIP_UNUSED:
            dropped.append(prefix + key)
            continue
        block = _CLIP_RESBLOCK.fullmatch(key)
        if block and block.group(2) in _CLIP_BLOCK:
            out[f"blocks.{block.group(1)}.{_CLIP_BLOCK[block.group(2)]}"] = value
        elif key in _CLIP_TOP:
            out[_CLIP_TOP[key]] = value
        else:
            out[key] = value
    if isinstance(out.get("cls_token"), torch.Tensor) and out["cls_token"].ndim == 1:
        out["cls_token"] = out["cls_token"].reshape(1, 1, -1)  # (C,) -> (1, 1, C)
    if isinstance(out.get("pos_embed"), torch.Tensor) and out["pos_embed"].ndim == 2:
        out["pos_embed"] = out["pos_embed"].unsqueeze(0)  # (1 + N, C) -> (1, 1 + N, C)
    return out, dropped


def _parse(checkpoint: Any, source: str, layout: str | None = None) -> _Parsed:
    """Detect, strip prefixes and rename to timm names; non-tensor entries are dropped."""
    detected, sd = _detect(checkpoint, source)
    if layout is not None:
        if layout not in LAYOUTS:
            raise LineInspectError(f"{source}: unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
        # OpenAI CLIP and OpenCLIP share their keys, so the caller may know better than the detector.
        if layout != detected and not (layout in CLIP_LAYOUTS and detected in CLIP_LAYOUTS):
            raise LineInspectError(
                f"{source}: layout {layout!r} was asked for but the keys are a {detected} checkpoint; "
                "leave the layout out to use the detected one"
            )
    layout = layout or detected
    if layout == "lineinspect":
        vit = next(p for p in _LINEINSPECT_PREFIXES if f"{p}patch_embed.proj.weight" in sd)
        tensors = {k[len(vit) :]: v for k, v in sd.items() if k.startswith(vit)}
        dropped = [k for k in sd if not k.startswith(vit)]  # defect heads, memory bank, ...
    elif layout == "timm":
        tensors = {k: v for k, v in sd.items() if not k.startswith(_TIMM_HEADS)}
        dropped = [k for k in sd if k.startswith(_TIMM_HEADS)]
    else:
        tensors, dropped = _clip_to_timm(sd)
    dropped += [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    tensors = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    return _Parsed(layout, tensors, dropped)


def _require(tensors: dict[str, torch.Tensor], key: str, layout: str, source: str) -> torch.Tensor:
    if key not in tensors:
        raise LineInspectError(
            f"{source}: {layout} checkpoint has no {key} (timm name); it is not a complete ViT image tower"
        )
    return tensors[key]


def _pos_grid(pos_embed: torch.Tensor, layout: str, source: str) -> int:
    """Side of the square patch grid behind a (1, 1 + N, C) position embedding."""
    tokens = pos_embed.shape[1] - 1
    side = math.isqrt(max(tokens, 0))
    if pos_embed.ndim != 3 or side * side != tokens or side == 0:
        raise LineInspectError(
            f"{source}: {layout} position embedding of shape {tuple(pos_embed.shape)} is not one class "
            "token plus a square patch grid; only such ViTs load into the encoder"
        )
    return side


# --------------------------------------------------------------------------- config


def _spread(depth: int) -> tuple[int, ...]:
    """Feature layers at 1/3, 2/3 and the end of the stack, as the presets pick them."""
    return tuple(sorted({max(0, round(depth * k / 3) - 1) for k in (1, 2, 3)}))


def _mlp_ratio(hidden: int, width: int) -> float:
    ratio = hidden / width
    if int(width * ratio) != hidden:  # timm builds int(width * ratio); guard against float round-down
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def infer_encoder_config(
    state_dict: Mapping[str, Any],
    layout: str | None = None,
    base: EncoderConfig | None = None,
    *,
    act: str | None = None,
    source: str = "checkpoint",
) -> EncoderConfig:
    """The EncoderConfig that ``state_dict`` fits.

    Width, depth, patch size, MLP ratio, ``ln_pre`` and layer scale come from the tensors; the
    image size from the position-embedding grid. ``base`` (e.g. a preset) supplies the rest:
    ``num_heads`` (else width // 64), ``img_size`` (a different one resamples the position
    embedding), ``feature_layers`` (else spread over depth), ``preset`` and ``drop_path_rate``;
    its width, depth and patch size must agree with the checkpoint. ``act`` overrides the
    activation guessed from the layout. ``layout`` None means detect it.
    """
    parsed = _parse(state_dict, source, layout)
    layout, tensors = parsed.layout, parsed.tensors
    patch_w = _require(tensors, "patch_embed.proj.weight", layout, source)  # (C, 3, p, p)
    pos = _require(tensors, "pos_embed", layout, source)
    width, patch = patch_w.shape[0], patch_w.shape[-1]
    depth = 1 + max((int(m.group(1)) for k in tensors if (m := _BLOCK_INDEX.match(k))), default=-1)
    if depth == 0:
        raise LineInspectError(f"{source}: {layout} checkpoint has no transformer blocks")
    fc1 = _require(tensors, "blocks.0.mlp.fc1.weight", layout, source)  # (hidden, C)
    grid = _pos_grid(pos, layout, source)
    pre_norm = "norm_pre.weight" in tensors
    layer_scale = "blocks.0.ls1.gamma" in tensors

    if base is not None:
        clash = [
            f"{name} {ours} (base {theirs})"
            for name, ours, theirs in (
                ("width", width, base.embed_dim),
                ("depth", depth, base.depth),
                ("patch size", patch, base.patch_size),
            )
            if ours != theirs
        ]
        if clash:
            raise LineInspectError(
                f"{source}: {layout} checkpoint has {', '.join(clash)}; pick a base config of the same "
                "architecture, or pass base=None to take the architecture from the checkpoint"
            )
    num_heads = base.num_heads if base is not None else width // 64
    if num_heads < 1 or width % num_heads:
        raise LineInspectError(
            f"{source}: width {width} does not split into {num_heads} attention heads; pass a base "
            "config with the checkpoint's num_heads"
        )
    if base is not None and base.depth == depth:
        feature_layers = base.feature_layers
    else:
        feature_layers = _spread(depth)

    config = EncoderConfig(
        preset=base.preset if base is not None else f"pretrained-{layout}",
        img_size=base.img_size if base is not None else grid * patch,
        patch_size=patch,
        embed_dim=width,
        depth=depth,
        num_heads=num_heads,
        feature_layers=feature_layers,
        mlp_ratio=_mlp_ratio(fc1.shape[0], width),
        pre_norm=pre_norm,
        act=act or ("quick_gelu" if layout == "openai_clip" else "gelu"),
        norm_eps=1e-5 if layout in CLIP_LAYOUTS or pre_norm else 1e-6,
        init_values=((base.init_values if base is not None else None) or 1e-5) if layer_scale else None,
    )
    if base is not None:
        config = replace(config, drop_path_rate=base.drop_path_rate)
    return config


# --------------------------------------------------------------------------- conversion


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def _listing(items: list[str]) -> str:
    more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return ", ".join(items[:_SHOW]) + more


def convert_checkpoint(
    state_dict: Mapping[str, Any], model: VisionEncoder, *, source: str = "checkpoint"
) -> ConvertedCheckpoint:
    """``state_dict`` renamed into ``model``'s keys, with the detected layout and the dropped keys.

    Pure: the input is not modified and no tensor data is copied except a resampled position
    embedding (bicubic, class token kept) when the checkpoint's patch grid differs from the
    model's. Raises LineInspectError naming the layout and the missing, unexpected and
    mis-shaped keys when the checkpoint does not fit the model.
    """
    parsed = _parse(state_dict, source)
    layout, tensors = parsed.layout, dict(parsed.tensors)
    grid = list(model.vit.patch_embed.grid_size)
    pos = tensors.get("pos_embed")
    if pos is not None and pos.ndim == 3 and pos.shape[1] != 1 + grid[0] * grid[1]:
        side = _pos_grid(pos, layout, source)
        tensors["pos_embed"] = resample_abs_pos_embed(
            pos, new_size=grid, old_size=[side, side], num_prefix_tokens=1
        )
        _log.info("%s: position embedding resampled from %dx%d to %dx%d patches", source, side, side, *grid)
    converted = {f"vit.{k}": v for k, v in tensors.items()}

    expected = model.state_dict()
    missing = [k for k in expected if k not in converted]
    unexpected = [k for k in converted if k not in expected]
    mismatched = [
        f"{k} checkpoint {_shape(v)} vs encoder {_shape(expected[k])}"
        for k, v in converted.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        c = model.config
        parts = [
            f"{label}: {_listing(items)}"
            for label, items in (
                ("shape mismatch", mismatched),
                ("missing", missing),
                ("unexpected", unexpected),
            )
            if items
        ]
        raise LineInspectError(
            f"{source}: detected a {layout} checkpoint that does not fit the encoder (width {c.embed_dim}, "
            f"depth {c.depth}, patch {c.patch_size}, mlp ratio {c.mlp_ratio:g}, pre_norm {c.pre_norm}, "
            f"layer scale {c.init_values is not None}): {'; '.join(parts)}. Build the encoder from the "
            "checkpoint with load_pretrained_encoder(path), or use a config of the checkpoint's architecture"
        )
    return ConvertedCheckpoint(converted, layout, parsed.dropped)


def convert_state_dict(
    state_dict: Mapping[str, Any], model: VisionEncoder, *, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """``state_dict`` (timm, OpenAI CLIP, OpenCLIP or lineinspect layout) in ``model``'s own key
    names, ready for ``model.load_state_dict(..., strict=True)``; see ``convert_checkpoint``."""
    return convert_checkpoint(state_dict, model, source=source).state_dict


def _summarise(keys: list[str]) -> str:
    """``transformer (148), token_embedding (1)``: dropped keys grouped by their first name part."""
    groups = Counter(k.split(".", 1)[0] if not k.startswith("visual.") else k for k in keys)
    return ", ".join(f"{name} ({n})" for name, n in groups.most_common())


# --------------------------------------------------------------------------- files


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Tensors from a local ``.safetensors`` file or a torch file read with ``weights_only=True``
    (a pickle holding anything but tensors and plain containers is refused, never executed)."""
    path = Path(path)
    if not path.is_file():
        raise LineInspectError(
            f"{path}: no such checkpoint file; check the path (weights are never downloaded)"
        )
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise LineInspectError(
                f"{path}: unreadable or truncated safetensors file ({exc}); copy or export it again"
            ) from exc
    if suffix not in TORCH_SUFFIXES:
        raise LineInspectError(
            f"{path}: unknown checkpoint suffix {suffix!r}; use .safetensors or one of "
            f"{', '.join(TORCH_SUFFIXES)}"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise LineInspectError(
            f"{path}: refused to load: the pickle holds Python objects other than tensors, and unpickling "
            f"them could run code ({str(exc).splitlines()[-1][:200]}). Re-save only the weights, e.g. "
            "safetensors.torch.save_file(model.state_dict(), 'weights.safetensors') in a trusted environment"
        ) from exc
    except RuntimeError as exc:
        if "TorchScript" in str(exc):
            raise LineInspectError(
                f"{path}: is a TorchScript archive (like OpenAI's original CLIP .pt), which is not loaded "
                "here; in a trusted environment load it and save its state_dict() as safetensors"
            ) from exc
        raise LineInspectError(
            f"{path}: unreadable or truncated torch file ({exc}); copy or export it again"
        ) from exc
    except (OSError, EOFError, ValueError) as exc:
        raise LineInspectError(
            f"{path}: unreadable or truncated torch file ({exc}); copy or export it again"
        ) from exc
    return checkpoint


def load_pretrained_encoder(
    path: str | Path, base: EncoderConfig | None = None, act: str | None = None
) -> VisionEncoder:
    """A VisionEncoder built from, and strictly loaded with, the ViT checkpoint at ``path``
    (timm, OpenAI CLIP, OpenCLIP or lineinspect layout), in eval mode, on the CPU.

    ``base`` supplies what the weights do not say (heads, image size, feature layers; see
    ``infer_encoder_config``); ``act`` overrides the activation guessed from the layout.
    """
    source = str(path)
    checkpoint = read_checkpoint(path)
    config = infer_encoder_config(checkpoint, None, base, act=act, source=source)
    layout = detect_layout(checkpoint, source)
    if act is None and layout in CLIP_LAYOUTS:
        _log.warning(
            "%s: CLIP weights do not record their activation; using %s as for %s. Pass act='gelu' for "
            "OpenCLIP towers trained with GELU (e.g. LAION) or act='quick_gelu' for OpenAI-trained ones",
            source,
            config.act,
            layout,
        )
    encoder = VisionEncoder(config)
    converted = convert_checkpoint(checkpoint, encoder, source=source)
    encoder.load_state_dict(converted.state_dict, strict=True)
    if converted.dropped:
        _log.info(
            "%s: %s layout; dropped %d unused keys: %s",
            source,
            layout,
            len(converted.dropped),
            _summarise(converted.dropped),
        )
    return encoder.eval()
