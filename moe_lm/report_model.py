"""The report model: resampler + MoE decoder + contrastive head, and its ``language/`` folder.

The decoder reads an image through gated cross-attention over resampled *evidence tokens*: one
token per encoder patch holding the frozen encoder's patch embedding, what the fast defect head
already concluded about that patch (anomaly map mean and peak inside the patch), image-level
evidence broadcast to every patch (defect probability, map peak, class probabilities, and a
summary of the anomaly region: the map's peak in each cell of a 3x3 grid, its area, its
map-weighted centroid and the map-weighted colour change against the whole image), and a fixed
sin/cos code of the patch position (the resampler has no positions of its own, and "where is
the defect" needs them). Broadcast summaries matter in short runs: the decoder reads a signal
present in every token long before the resampler learns to find the few defect patches.

With ``EvidenceConfig.decision`` (set for every language part trained now; older parts load without
it) the tokens also
carry the fast path's *decision*: its calibrated image score, the verdict at its threshold, the
centroid of the map's focus region (the mass above half the map's peak) and that centroid's 3x3
cell as a one-hot, and the named class as a one-hot. These are what the verdict, the class and
the location words of a report should follow, in a form that transfers from training images to
new ones: a raw probability's scale differs between the images the fast path trained on and new
ones (those goods score lower), while the verdict is made at a threshold calibrated on held-out
images.
``evidence_tokens`` builds them from plain tensors, so this module imports nothing from
``lineinspect.vision``.

A model directory keeps the language part in ``language/``: ``tokenizer.json`` (tokenizers
JSON), ``language.json`` (the configs plus a training summary) and ``language.safetensors``
(the weights). Never pickles. The folder is written under a temporary name and renamed into
place, so an interrupted save leaves the previous part intact.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from lineinspect.errors import LineInspectError
from lineinspect.fusion.contrastive import ContrastiveHead, masked_mean
from lineinspect.fusion.resampler import Resampler, ResamplerConfig
from lineinspect.fusion.resampler import preset as resampler_preset
from lineinspect.moe_lm.config import DecoderConfig
from lineinspect.moe_lm.config import preset as decoder_preset
from lineinspect.moe_lm.decoder import DecoderOutput, MoEDecoder
from lineinspect.moe_lm.tokenizer import TextTokenizer, load_tokenizer, save_tokenizer

LANGUAGE_DIR = "language"
CONFIG_FILE = "language.json"
WEIGHTS_FILE = "language.safetensors"
TOKENIZER_FILE = "tokenizer.json"
FORMAT = "lineinspect-language"
FORMAT_VERSION = 1

# The prompt every question (and the default report request) is wrapped in; the answer follows
# after one space and ends with <eos>. Serving and training share it from here.
REPORT_QUESTION = "Describe the inspection result."


def prompt_text(question: str) -> str:
    """The decoder prompt for a question; an empty question asks for the inspection report."""
    q = " ".join(question.split()) or REPORT_QUESTION
    return f"question: {q}\nanswer:"


# --------------------------------------------------------------------------- evidence tokens


@dataclass(frozen=True)
class EvidenceConfig:
    patch_dim: int  # encoder width C (EncoderOutput.patches[-1])
    grid: int  # patches per side of the (square) model input
    n_classes: int = 0  # classes of the fast defect head; 0 when it has none
    pos_freqs: int = 4  # sin/cos pairs per axis for the patch position code
    summary: bool = True  # broadcast the anomaly-region summary (needs the model's input images)
    decision: bool = False  # broadcast the fast path's decision (needs its calibrated score and threshold)

    N_MAP = 2  # anomaly map mean and max inside each patch
    N_IMAGE = 2  # image defect probability and anomaly map peak, broadcast to every patch
    N_SUMMARY = 15  # 3x3 cell peaks, area, centroid (y, x), weighted colour change (RGB)
    N_DECISION = 13  # score, verdict, focus centroid (y, x), its 3x3 cell one-hot; + the class one-hot

    def __post_init__(self) -> None:
        for name in ("patch_dim", "grid"):
            if getattr(self, name) <= 0:
                raise LineInspectError(f"evidence config: {name} must be positive, got {getattr(self, name)}")
        if self.n_classes < 0 or self.pos_freqs < 0:
            raise LineInspectError("evidence config: n_classes and pos_freqs must be >= 0")

    @property
    def dim(self) -> int:
        """Width of one evidence token (the resampler's vision_dim)."""
        summary = self.N_SUMMARY if self.summary else 0
        decision = self.N_DECISION + self.n_classes if self.decision else 0
        return self.patch_dim + self.N_MAP + self.N_IMAGE + summary + decision + self.n_classes + 4 * self.pos_freqs

    @property
    def verdict_index(self) -> int:
        """Column of the fast path's verdict (1 = defect) in every token; needs `decision`."""
        if not self.decision:
            raise LineInspectError("evidence config: no decision features, so no verdict column")
        summary = self.N_SUMMARY if self.summary else 0
        return self.patch_dim + self.N_MAP + self.N_IMAGE + summary + 1  # after the calibrated score

    @property
    def n_tokens(self) -> int:
        return self.grid * self.grid


def position_code(grid: int, pos_freqs: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Fixed (grid*grid, 4 * pos_freqs) sin/cos code of each patch centre, row-major."""
    centres = (torch.arange(grid, device=device, dtype=torch.float32) + 0.5) / grid  # (g,)
    freqs = math.pi * 2.0 ** torch.arange(pos_freqs, device=device, dtype=torch.float32)  # (F,)
    angles = centres[:, None] * freqs  # (g, F)
    code = torch.cat((angles.sin(), angles.cos()), dim=1)  # (g, 2F)
    rows = code[:, None, :].expand(grid, grid, -1)  # (g, g, 2F): depends on the row
    cols = code[None, :, :].expand(grid, grid, -1)  # depends on the column
    return torch.cat((rows, cols), dim=-1).reshape(grid * grid, -1)


def weighted_centroid(w: torch.Tensor) -> torch.Tensor:
    """(B, S, S) weights summing to 1 per image -> their centroid (B, 2): y, x in [0, 1] (pixel centres)."""
    S = w.shape[-1]
    coords = (torch.arange(S, device=w.device, dtype=torch.float32) + 0.5) / S
    return torch.stack(((w.sum(2) * coords).sum(1), (w.sum(1) * coords).sum(1)), dim=1)


def region_summary(anomaly_map: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """(B, 15): the anomaly map's peak per 3x3 cell (9), area above 0.5 (1), map-weighted centroid
    (y, x in [0, 1]) (2), map-weighted mean colour minus the image's mean colour (3).
    anomaly_map: (B, 1, S, S) in [0, 1]; images: (B, 3, H, W) in [0, 1]."""
    amap = anomaly_map.float()
    S = amap.shape[-1]
    x = F.interpolate(images.float(), size=(S, S), mode="bilinear") if images.shape[-1] != S else images.float()
    cells = F.adaptive_max_pool2d(amap, 3).flatten(1)  # (B, 9)
    area = (amap > 0.5).float().mean(dim=(1, 2, 3))[:, None]  # (B, 1)
    w = amap / amap.sum(dim=(2, 3), keepdim=True).clamp_min(1e-6)  # (B, 1, S, S), sums to 1
    centroid = weighted_centroid(w[:, 0])  # (B, 2)
    colour = (x * w).sum(dim=(2, 3)) - x.mean(dim=(2, 3))  # (B, 3)
    return torch.cat((cells, area, centroid, colour), dim=1)


def decision_summary(anomaly_map: torch.Tensor, score: torch.Tensor, threshold: float,
                     class_logits: torch.Tensor | None) -> torch.Tensor:
    """(B, 13 [+ K]): calibrated score, verdict (score >= threshold), the focus region's centroid
    (y, x in [0, 1]; the region is the map above half its peak, so faint background does not pull
    it to the centre), that centroid's 3x3 cell as a one-hot (row-major), and the argmax class
    as a one-hot when class_logits (B, K) are given. anomaly_map: (B, 1, S, S) in [0, 1]."""
    amap = anomaly_map.float()[:, 0]  # (B, S, S)
    peak = amap.flatten(1).amax(1)[:, None, None]
    w = (amap - 0.5 * peak).clamp_min(0)
    focus = weighted_centroid(w / w.sum(dim=(1, 2), keepdim=True).clamp_min(1e-6))  # (B, 2)
    row_col = (focus * 3).long().clamp(0, 2)
    cell = F.one_hot(row_col[:, 0] * 3 + row_col[:, 1], 9).float()
    verdict = (score.float() >= threshold).float()
    parts = [score.float()[:, None], verdict[:, None], focus, cell]
    if class_logits is not None:
        parts.append(F.one_hot(class_logits.float().argmax(1), class_logits.shape[-1]).float())
    return torch.cat(parts, dim=1)


def evidence_tokens(
    patches: torch.Tensor,
    anomaly_map: torch.Tensor,
    image_prob: torch.Tensor,
    class_logits: torch.Tensor | None,
    config: EvidenceConfig,
    images: torch.Tensor | None = None,
    decision: tuple[torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """Per-patch evidence for the language path (float32).

    patches: (B, N, C) encoder patch tokens, N = grid * grid, row-major;
    anomaly_map: (B, 1, S, S) defect probability per pixel; image_prob: (B,);
    class_logits: (B, K) or None; images: (B, 3, S, S) in [0, 1], the defect model's input
    (needed when config.summary); decision: the calibrated image score (B,) and the threshold
    the verdict is made at (needed when config.decision). Returns (B, N, config.dim).
    """
    B, N, C = patches.shape
    g = config.grid
    if N != g * g or C != config.patch_dim:
        raise LineInspectError(
            f"evidence tokens: expected patches (B, {g * g}, {config.patch_dim}) for a {g}x{g} grid, "
            f"got {tuple(patches.shape)}; was the language part trained with another defect model?"
        )
    amap = anomaly_map.float()
    pooled_mean = F.adaptive_avg_pool2d(amap, g).flatten(1)[..., None]  # (B, N, 1)
    pooled_max = F.adaptive_max_pool2d(amap, g).flatten(1)[..., None]  # (B, N, 1)
    image = torch.stack((image_prob.float(), amap.flatten(1).amax(1)), dim=1)  # (B, 2)
    parts = [patches.float(), pooled_mean, pooled_max, image[:, None, :].expand(B, N, -1)]
    if config.summary:
        if images is None:
            raise LineInspectError("evidence tokens: the region summary needs the defect model's input images")
        parts.append(region_summary(amap, images)[:, None, :].expand(B, N, -1))
    if config.decision:
        if decision is None:
            raise LineInspectError("evidence tokens: the decision features need the calibrated score and threshold")
        score, threshold = decision
        named = class_logits if config.n_classes else None
        parts.append(decision_summary(amap, score, threshold, named)[:, None, :].expand(B, N, -1))
    if config.n_classes:
        if class_logits is None or class_logits.shape[-1] != config.n_classes:
            got = None if class_logits is None else class_logits.shape[-1]
            raise LineInspectError(
                f"evidence tokens: the language part expects {config.n_classes} defect classes, the defect "
                f"model gives {got}; retrain the language stages for this defect model"
            )
        probs = class_logits.float().softmax(dim=-1)  # (B, K)
        parts.append(probs[:, None, :].expand(B, N, -1))
    if config.pos_freqs:
        pos = position_code(g, config.pos_freqs, patches.device)  # (N, 4F)
        parts.append(pos[None].expand(B, N, -1))
    return torch.cat(parts, dim=-1)  # (B, N, D)


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class LanguageConfig:
    decoder: DecoderConfig
    resampler: ResamplerConfig
    evidence: EvidenceConfig
    embed_dim: int = 64  # shared image-text space of the contrastive head

    def __post_init__(self) -> None:
        if self.resampler.vision_dim != self.evidence.dim:
            raise LineInspectError(
                f"language config: resampler vision_dim {self.resampler.vision_dim} != evidence width "
                f"{self.evidence.dim}"
            )
        if self.resampler.dim != self.decoder.context_dim:
            raise LineInspectError(
                f"language config: resampler dim {self.resampler.dim} != decoder image_dim "
                f"{self.decoder.context_dim}"
            )
        if not self.decoder.cross_attn_layers:
            raise LineInspectError("language config: the decoder has no cross-attention (cross_attn_every=0)")

    def to_dict(self) -> dict:
        return {"decoder": self.decoder.to_dict(), "resampler": self.resampler.to_dict(),
                "evidence": asdict(self.evidence), "embed_dim": self.embed_dim}

    @classmethod
    def from_dict(cls, data: dict) -> LanguageConfig:
        known = {f.name for f in fields(EvidenceConfig)}
        return cls(
            decoder=DecoderConfig.from_dict(data["decoder"]),
            resampler=ResamplerConfig.from_dict(data["resampler"]),
            evidence=EvidenceConfig(**{k: v for k, v in data["evidence"].items() if k in known}),
            embed_dim=int(data["embed_dim"]),
        )


def language_config(preset: str, vocab_size: int, evidence: EvidenceConfig, **decoder_overrides) -> LanguageConfig:
    """The named preset ("tiny" or "l14") of decoder and resampler, sized for `evidence` and a tokenizer."""
    decoder = decoder_preset(preset, vocab_size=vocab_size, **decoder_overrides)
    resampler = resampler_preset(preset, vision_dim=evidence.dim, dim=decoder.context_dim)
    return LanguageConfig(decoder, resampler, evidence, embed_dim=min(256, decoder.width))


class ReportModel(nn.Module):
    """Evidence tokens (B, N, D_ev) -> resampler -> image tokens (B, L, D) read by the MoE decoder."""

    def __init__(self, config: LanguageConfig) -> None:
        super().__init__()
        self.config = config
        self.resampler = Resampler(config.resampler)
        self.decoder = MoEDecoder(config.decoder)
        self.contrastive = ContrastiveHead(config.resampler.dim, config.decoder.width, config.embed_dim)
        # Per-feature standardisation of the evidence, fitted once on the training images: the few
        # scalar evidence features (map values, summary) would otherwise be drowned by the patch
        # embedding's larger spread inside the resampler's LayerNorm. Saved with the weights.
        self.register_buffer("evidence_mean", torch.zeros(config.evidence.dim))
        self.register_buffer("evidence_std", torch.ones(config.evidence.dim))

    @torch.no_grad()
    def fit_evidence_scale(self, evidence: torch.Tensor) -> None:
        """Set the standardisation from training evidence (n, N, D_ev)."""
        flat = evidence.reshape(-1, evidence.shape[-1]).float()
        self.evidence_mean.copy_(flat.mean(0))
        self.evidence_std.copy_(flat.std(0).clamp_min(1e-3))

    def image_tokens(self, evidence: torch.Tensor) -> torch.Tensor:
        """evidence: (B, N, D_ev) -> (B, L, D) image tokens for cross-attention."""
        # clamped: a feature nearly constant on the training images (a one-hot cell no training
        # defect fell in) must not explode when a new image sets it
        x = ((evidence.float() - self.evidence_mean) / self.evidence_std).clamp(-8.0, 8.0)
        return self.resampler(x.to(self.resampler.latents.dtype))

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        evidence: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> DecoderOutput:
        """idx, targets: (B, T); evidence: (B, N, D_ev) or None (text only); attention_mask: (B, T) bool."""
        image = self.image_tokens(evidence) if evidence is not None else None
        return self.decoder(idx, targets, image_tokens=image, attention_mask=attention_mask)

    def alignment_loss(self, evidence: torch.Tensor, text_idx: torch.Tensor, text_mask: torch.Tensor
                       ) -> torch.Tensor:
        """Symmetric InfoNCE between pooled image tokens and pooled decoder states of the matching
        texts. evidence: (B, N, D_ev); text_idx, text_mask: (B, T) (padding False)."""
        image = masked_mean(self.image_tokens(evidence), None)  # (B, D)
        hidden = self.decoder(text_idx, attention_mask=text_mask).hidden  # (B, T, C), text only
        text = masked_mean(hidden, text_mask)  # (B, C)
        return self.contrastive(image, text)

    def gate_openness(self, evidence: torch.Tensor, idx: torch.Tensor, attention_mask: torch.Tensor | None = None
                      ) -> dict[int, float]:
        """Mean gate openness per cross-attention block on a batch (for logs)."""
        with torch.no_grad():
            out = self(idx, evidence=evidence, attention_mask=attention_mask)
        return {block: round(float(v), 5) for block, v in out.gate_stats.items()}


# --------------------------------------------------------------------------- language/ folder


class LanguagePart(NamedTuple):
    model: ReportModel
    tokenizer: TextTokenizer
    meta: dict  # the whole language.json (configs, training summary, data, defect-model digest)


def file_digest(path: str | Path) -> str:
    """sha256 of a file (hex), read in chunks: ties a language part to the defect weights it read."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def has_language(model_dir: str | Path) -> bool:
    return (Path(model_dir) / LANGUAGE_DIR / CONFIG_FILE).is_file()


def save_language(model_dir: str | Path, model: ReportModel, tokenizer: TextTokenizer, extra: dict | None = None
                  ) -> Path:
    """Write `model_dir`/language/ atomically; `extra` (training summary, ...) goes in language.json."""
    model_dir = Path(model_dir)
    if model.config.decoder.vocab_size != tokenizer.vocab_size:
        raise LineInspectError(
            f"save language: decoder vocab {model.config.decoder.vocab_size} != tokenizer vocab {tokenizer.vocab_size}"
        )
    model_dir.mkdir(parents=True, exist_ok=True)
    target = model_dir / LANGUAGE_DIR
    tmp = Path(tempfile.mkdtemp(prefix=f".{LANGUAGE_DIR}.", dir=model_dir))
    old = model_dir / f".{LANGUAGE_DIR}.old"
    try:
        save_tokenizer(tokenizer, tmp / TOKENIZER_FILE)
        save_model(model, str(tmp / WEIGHTS_FILE))  # tied embedding / LM head stored once
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": model.config.to_dict(),
                **(extra or {})}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        if old.exists():
            shutil.rmtree(old)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_language(model_dir: str | Path, device: torch.device | str = "cpu") -> LanguagePart:
    """Read `model_dir`/language/ -> (model in eval mode on `device`, tokenizer, language.json)."""
    folder = Path(model_dir) / LANGUAGE_DIR
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise LineInspectError(
            f"{folder}: no language part in this model directory; train it with "
            f"`lineinspect train --data DATA --out {model_dir} --stages 1,2,3`"
        )
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LineInspectError(f"{path}: not valid JSON ({exc}); retrain the language stages") from exc
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise LineInspectError(
            f"{path}: not a language part this version reads (format {meta.get('format')!r} version "
            f"{meta.get('format_version')}); retrain the language stages"
        )
    try:
        config = LanguageConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise LineInspectError(f"{path}: incomplete or from another version ({exc}); retrain") from exc
    tokenizer = load_tokenizer(folder / TOKENIZER_FILE)
    if tokenizer.vocab_size != config.decoder.vocab_size:
        raise LineInspectError(f"{folder}: tokenizer and decoder disagree on the vocabulary size; retrain")
    model = ReportModel(config)
    weights = folder / WEIGHTS_FILE
    try:
        missing, unexpected = load_model(model, str(weights), strict=False, device=str(device))
    except (SafetensorError, OSError, FileNotFoundError) as exc:
        raise LineInspectError(f"{weights}: unreadable or missing weights ({exc}); retrain or restore") from exc
    if missing or unexpected:
        raise LineInspectError(
            f"{weights}: weights do not match language.json (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    return LanguagePart(model.to(device).eval(), tokenizer, meta)
