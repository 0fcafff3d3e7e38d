"""Train the fast defect model from scratch on a line's images.

Phases, each ending cleanly at its share of the time budget:
  1. ssl     - masked patch reconstruction on the line's images (the encoder learns the surface);
  2. defect  - segmentation + image + class objectives on generic synthetic defects pasted on
               good images, and on real masks/boxes/classes where the data has them;
  3. fit     - patch memory bank from good images, then calibration on held-out validation
               images (score source, image threshold, pixel threshold).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lineinspect.errors import LineInspectError
from lineinspect.training.anomaly_synthesis import synthesize_defects
from lineinspect.training.box_calibration import choose_box_levels
from lineinspect.training.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from lineinspect.training.data_cache import load_cache, paste_resolution, validation_split
from lineinspect.training.datasets import Dataset
from lineinspect.training.defects import DEFECT_TYPES
from lineinspect.training.metrics import (
    auroc_standard_error,
    f1_optimal_threshold,
    image_auroc,
    threshold_for_false_reject_rate,
)
from lineinspect.training.named_pasting import (
    NamedPaintings,
    RenderPool,
    finish_named_defects,
    paste_named_defects,
    start_named_defects,
)
from lineinspect.training.namer_phase import train_namer
from lineinspect.training.schedule import lr_at
from lineinspect.vision.checkpoints import load_pretrained_encoder
from lineinspect.vision.defect_model import DefectModel, DefectModelConfig
from lineinspect.vision.encoder import preset
from lineinspect.vision.heads import HeadConfig, HeadOutput, focus_region
from lineinspect.vision.inspector import Calibration, calibrated_map, image_scores
from lineinspect.vision.model_io import resolve_device, save_model_dir
from lineinspect.vision.precision import autocast, autocast_dtype

# Per-preset defaults: (total steps, CPU batch, GPU batch, memory-bank size, learning rate,
# share of steps for masked reconstruction). A 3-minute CPU run of `tiny` does better spending
# every step on the defect objective (image AUROC 0.951 vs 0.902 with 15% SSL, bench/RESULTS.md).
# `s14`'s bank of 1024 rows scored as well as 2048 and 4096 (fused AUROC on real steel and the synthetic
# line, session 25) and costs a 168 px CPU frame ~7 ms less than 2048 (session 26, beside the region statistics).
PRESET_DEFAULTS = {
    "tiny": (1500, 16, 64, 2048, 1e-3, 0.0),
    "s14": (3000, 16, 64, 1024, 5e-4, 0.1),
    "l14": (4000, 16, 64, 8192, 2e-4, 0.15),
}
# On a CPU the few hundred steps a budget allows are worth more on the defect objective: `s14`, 20
# minutes on a 2-core CPU, held-out image AUROC 0.985 / 0.984 with 10 % SSL, 0.989 / 0.986 without.
CPU_SSL_FRACTION = 0.0


# Standard errors of the default source's validation AUROC another source must lead it by to be chosen
# (0.06 on 20 + 20 images at 0.965, less with more images): leads of 0.025 and 0.035 on 40 images were noise
# (bench/RESULTS.md, session 18).
SOURCE_MARGIN_SE = 2.0
SCORE_SOURCES = ("auto", "head", "fused")  # what --score-source accepts
MAP_CHOICES = ("auto", "head", "fused")  # what --map-source accepts
# Naming the pasted kinds on a line without class labels (--name-pasted-kinds): after the defect
# training, the crop namer trains alone on a pool of pasted kinds (training.namer_phase).
NAMER_SHARE = 0.25  # of the time budget


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "tiny"
    img_size: int | None = None  # override the preset's input size (multiple of its patch)
    patch_size: int | None = None  # override the preset's patch size
    stem_channels: tuple[int, int, int] | None = None  # override the head's pixel-branch widths
    decoder_channels: int | None = None  # override the head's decoder width
    bandpass: bool = True  # the head also sees the image's Laplacian-pyramid bands (vision.bandpass)
    ridges: bool = True  # ... and oriented thin-line filter responses (vision.ridges)
    chroma: str = "auto"  # ... and each cell's colour deviation from the part's own: see head_chroma
    device: str = "cpu"
    seed: int = 0
    time_budget: float | None = None  # seconds for the whole command; phases end cleanly inside it
    steps: int | None = None  # optimisation steps, ssl + defect (preset default)
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = 0.05
    ssl_fraction: float | None = None  # share of steps/time for masked reconstruction (preset default)
    p_defect: float = 0.5  # share of good images that get a synthetic defect per step
    # weight of the map-peak loss: the smoothed map's peak (the fast path's map score) pushed down on
    # good images (see map_peak_loss); 0 = off
    peak_loss: float = 0.0
    # each training image with its mask under one of the square's 8 symmetries, drawn per image (see
    # dihedral); for surfaces without a fixed orientation; off: a fixed camera's geometry is "normal"
    dihedral: bool = False
    # share of the generic synthetic defects drawn as faint streaks along the surface's direction
    # (anomaly_synthesis.streak_defects); 0 = none
    streak_share: float = 0.0
    # processes painting the named defects (training.named_pasting.RenderPool); None: render_workers_for(device)
    render_workers: int | None = None
    paste_types: tuple[str, ...] = DEFECT_TYPES  # named defect renderings pasted besides the generic ones
    name_pasted_kinds: bool = False  # lines without class labels learn to name the pasted kinds (experimental)
    # ... from crops cut where the trained model's map finds them ("model"), or around jittered masks ("mask");
    # "auto": model on GPUs; on a 2-core CPU the model's forward halved the namer's examples and named worse
    namer_regions: str = "auto"
    # seconds of the time budget for the namer phase; None: NAMER_SHARE of the budget (120 s without one).
    # s14, 20 CPU min: the namer's 300 s named 0.943 / 0.920 of two held-out lines from the map's crops;
    # the same main model with a 600 s namer 0.954 / 0.966 (bench/namer_retrain.py)
    namer_seconds: float | None = None
    # share of the good training images held out to choose the score source and the threshold
    val_fraction: float = 0.1
    target_frr: float | None = None  # choose the threshold for this false-reject rate instead of best F1
    # "auto": default_source, or another source validation shows clearly better; or serve this one
    score_source: str = "auto"
    # the served map (vision.inspector.calibrated_map): "auto" follows the score (fused where it reads the bank)
    map_source: str = "auto"
    memory_bank_size: int | None = None
    checkpoint_every_s: float = 120.0
    pretrained: str | None = None  # local ViT checkpoint to start the encoder from
    pretrained_act: str | None = None  # its activation when the file cannot tell ("gelu" for LAION CLIP)
    precision: str = "auto"  # bf16 autocast where the device computes bf16 natively (vision.precision)

    def resolved(self) -> TrainConfig:
        if self.preset not in PRESET_DEFAULTS:
            raise LineInspectError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESET_DEFAULTS)}")
        if self.namer_regions not in ("auto", "model", "mask"):
            raise LineInspectError(f"namer_regions must be auto, model or mask, got {self.namer_regions!r}")
        if self.namer_seconds is not None and not self.name_pasted_kinds:
            raise LineInspectError("namer seconds are for the namer phase of --name-pasted-kinds; add it or drop them")
        if not 0 <= self.streak_share <= 1:
            raise LineInspectError(f"streak share must be between 0 and 1, got {self.streak_share:g}")
        if not 0 <= self.val_fraction <= 0.5:
            raise LineInspectError(f"validation fraction must be between 0 and 0.5, got {self.val_fraction:g}")
        if self.score_source not in SCORE_SOURCES:
            raise LineInspectError(f"score source must be one of {', '.join(SCORE_SOURCES)}, got {self.score_source!r}")
        if self.map_source not in MAP_CHOICES:
            raise LineInspectError(f"map source must be one of {', '.join(MAP_CHOICES)}, got {self.map_source!r}")
        if self.peak_loss < 0:
            raise LineInspectError(f"peak loss weight must be >= 0, got {self.peak_loss:g}")
        if self.render_workers is not None and self.render_workers < 0:
            raise LineInspectError(f"render workers must be >= 0, got {self.render_workers}")
        if self.namer_seconds is not None and self.namer_seconds <= 0:
            raise LineInspectError(f"namer seconds must be above 0, got {self.namer_seconds:g}")
        if None not in (self.namer_seconds, self.time_budget) and self.namer_seconds >= self.time_budget:
            raise LineInspectError(f"namer seconds ({self.namer_seconds:g}) are part of the time budget "
                                   f"({self.time_budget:g} s): give the budget more than that")
        steps, cpu_bs, gpu_bs, bank, lr, ssl = PRESET_DEFAULTS[self.preset]
        gpu = self.device.startswith("cuda")
        workers = render_workers_for(self.device) if self.render_workers is None else self.render_workers
        return replace(self, steps=self.steps or steps, render_workers=workers,
                       batch_size=self.batch_size or (gpu_bs if gpu else cpu_bs),
                       memory_bank_size=self.memory_bank_size or bank, lr=self.lr or lr,
                       ssl_fraction=(ssl if gpu else CPU_SSL_FRACTION) if self.ssl_fraction is None
                       else self.ssl_fraction)


def render_workers_for(device: str) -> int:
    """Painting processes by default: none where the CPU also trains (its cores are busy with the model);
    on a GPU host, all cores but two, up to 8. With one painting process an H100 training `s14` waited for
    the host most of each step (262 ms a step against 145 with 8 workers; the namer 11 steps a second, as
    on a 2-core CPU, against 26)."""
    cores = os.cpu_count() or 1
    return min(8, cores - 2) if device.startswith("cuda") and cores >= 4 else 0


class Batch(NamedTuple):
    images: torch.Tensor  # (B,3,S,S) in [0,1]
    masks: torch.Tensor  # (B,1,S,S) {0,1}
    defect: torch.Tensor  # (B,) bool, labelled defect
    classes: torch.Tensor  # (B,) long, -1 when unknown or good
    index: torch.Tensor  # (B,) rows of the training cache


def dihedral_codes(n: int, square: bool, gen: torch.Generator) -> torch.Tensor:
    """One of the square's 8 symmetries per image (0 = identity; bits: mirror left-right, mirror up-down,
    transpose), drawn from `gen`; non-square images get only the mirrors."""
    return torch.randint(8 if square else 4, (n,), generator=gen)


def dihedral(images: torch.Tensor, masks: torch.Tensor | None, codes: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each image (B, C, H, W), and its mask (B, ..., H, W) alike, under its symmetry in `codes`
    (``dihedral_codes``). A surface's own features (a turning centre, a groove band) then turn up in new
    places, which a few hundred good parts show in few."""
    images = images.clone()
    masks = None if masks is None else masks.clone()
    for code in codes.unique().tolist():
        if code == 0:
            continue
        rows = torch.nonzero(codes == code).flatten().to(images.device)
        for t in (images, masks):
            if t is None:
                continue
            part = t[rows]
            if code & 1:
                part = part.flip(-1)
            if code & 2:
                part = part.flip(-2)
            if code & 4:
                part = part.transpose(-1, -2)
            t[rows] = part
    return images, masks


class PendingBatch(NamedTuple):
    """A drawn batch whose good images have their generic defects and whose named ones may still be painting."""
    drawn: Batch
    pasted: torch.Tensor | None  # the good images with generic defects (None: the batch has no good image)
    masks: torch.Tensor | None
    has: torch.Tensor | None
    paintings: NamedPaintings | None  # None when no named kinds are pasted
    symmetries: torch.Tensor | None  # (B,) dihedral_codes applied once it is finished (None: off)


@dataclass
class Progress:
    phase: str = "ssl"
    step: int = 0  # steps done in the current phase
    seconds: dict = field(default_factory=dict)  # seconds spent per finished/ongoing phase
    losses: dict = field(default_factory=dict)


def map_peak_loss(mask_logits: torch.Tensor, target: torch.Tensor, smoothing: int) -> torch.Tensor:
    """-log(1 - peak) of the smoothed map on the good images of the batch (0 when it has none);
    mask_logits (B,1,S,S), target (B,) 1 = defect.

    The map score is this peak. The per-pixel loss spreads its weight over every pixel, so a spot a
    good part normally has (a turning centre, a glint) costs it little while it decides the image:
    on two held-out lines such spots held 3-5 good parts above the threshold. This gives each good
    image's strongest false alarm the weight. Defect images are left to the per-pixel loss: pushing
    their smoothed peak up too rewarded maps that bloom past small defects (a 5x5 mean is highest
    when the whole window lights up), and the namer, cutting its crop from the map, then took small
    holes for contamination (5 of 25 on a held-out line)."""
    good = target < 0.5
    if not good.any():
        return mask_logits.new_zeros(())
    prob = torch.sigmoid(mask_logits[good].float())
    if smoothing > 1:
        prob = F.avg_pool2d(prob, smoothing, 1, smoothing // 2, count_include_pad=False)
    peak = prob.flatten(1).amax(1).clamp(max=1 - 1e-6)
    return -torch.log1p(-peak).mean()


def focal_dice_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-pixel focal BCE + soft dice on defect images. logits/target (B,1,S,S); weight (B,) 0/1."""
    if weight.sum() == 0:
        return logits.sum() * 0
    logits, target = logits.float(), target.float()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    pt = p * target + (1 - p) * (1 - target)
    focal = ((1 - pt) ** 2 * bce).mean((1, 2, 3))
    focal = (focal * weight).sum() / weight.sum()
    inter = (p * target).sum((1, 2, 3))
    dice = 1 - (2 * inter + 1) / (p.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1)
    has_defect = (target.sum((1, 2, 3)) > 0).float() * weight
    dice = (dice * has_defect).sum() / has_defect.sum().clamp_min(1)
    return 5 * focal + dice


def default_source(aurocs: dict[str, float], real_defects: bool) -> str:
    """The score source a model serves unless validation shows another clearly better.

    Validated on real defects, the learned head. Validated on synthetic defects alone, the fused
    score (head, memory bank, self-similarity and, since session 26, region statistics) where the bank
    is fitted: the head learns the synthetic families it is trained on, and validating on the same
    families favours it. On defects no family imitates (four real-steel lines, seven runs of `tiny` and
    `s14`) fused scored 0.02-0.09 higher in the mean of the lines (single lines up to 0.05 lower); on a
    synthetic line whose defects the training's renderer paints it gave up 0.00-0.02 (bench/RESULTS.md,
    session 25). With the region statistics: real steel 0.909 / 0.904 against the head's 0.796 / 0.806,
    turned metal within 0.01 of the head (session 26).
    """
    return "fused" if not real_defects and "fused" in aurocs and "memory" in aurocs else "head"


def choose_source(aurocs: dict[str, float], default: str, n_defect: int, n_good: int) -> tuple[str, float]:
    """(source, margin): the best validation AUROC where it leads `default` by SOURCE_MARGIN_SE of
    the default's standard errors, otherwise `default`."""
    margin = SOURCE_MARGIN_SE * auroc_standard_error(aurocs[default], n_defect, n_good)
    best = max(aurocs, key=aurocs.get)
    return (best if aurocs[best] > aurocs[default] + margin else default), margin


def head_chroma(chroma: str, paste_types: tuple[str, ...]) -> str:
    """The head's colour mode (HeadConfig.chroma) for a `chroma` setting of auto, pixel, image or off. "auto":
    into the decoder where named kinds are pasted; with generic pastes alone (their foreign textures and colour
    shifts) the decoder learnt colour as the defect itself (`tiny`, 3 CPU minutes: pixel AUROC 0.956 -> 0.826),
    so there the colour feeds the image score only (0.956)."""
    if chroma != "auto":
        return chroma
    return "pixel" if paste_types else "image"


class Trainer:
    def __init__(self, config: TrainConfig, dataset: Dataset, out: Path, resume: bool = False) -> None:
        self.cfg = config.resolved()
        self.dataset = dataset
        self.out = Path(out)
        self.ckpt_dir = self.out / "checkpoint"
        self.device = resolve_device(self.cfg.device)
        self.start = time.monotonic()
        torch.manual_seed(self.cfg.seed)
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, os.cpu_count() or 1))
        overrides = {k: v for k, v in (("img_size", self.cfg.img_size), ("patch_size", self.cfg.patch_size)) if v}
        enc = preset(self.cfg.preset, **overrides)
        pretrained = None
        if self.cfg.pretrained:
            pretrained = load_pretrained_encoder(self.cfg.pretrained, base=enc, act=self.cfg.pretrained_act)
            enc = pretrained.config
        self.size = enc.img_size
        # A line without class labels can still name what it finds after the pasted kinds it learnt from.
        self.names_pasted = not self._has_class_labels() and self.cfg.name_pasted_kinds and bool(self.cfg.paste_types)
        self.class_names = (list(dataset.class_names) if self._has_class_labels()
                            else list(self.cfg.paste_types) if self.names_pasted else [])
        head = {k: v for k, v in (("stem_channels", self.cfg.stem_channels),
                                  ("decoder_channels", self.cfg.decoder_channels)) if v}
        self.model = DefectModel(DefectModelConfig(
            enc, HeadConfig(num_classes=len(self.class_names), bandpass=self.cfg.bandpass,
                             ridges=self.cfg.ridges, chroma=head_chroma(self.cfg.chroma, self.cfg.paste_types), **head),
            memory_bank_size=self.cfg.memory_bank_size,
        ))
        if pretrained is not None:
            self.model.encoder.load_state_dict(pretrained.state_dict())
        self.model.to(self.device)
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2 and "token" not in n]
        no_decay = [p for n, p in self.model.named_parameters() if p.ndim < 2 or "token" in n]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.cfg.lr, betas=(0.9, 0.98),
        )
        self.pool: RenderPool | None = None  # open while run() runs
        self.next_batch: PendingBatch | None = None  # drawn ahead while the pool paints it
        self.progress = Progress()
        if resume and has_checkpoint(self.ckpt_dir):
            meta = load_checkpoint(self.ckpt_dir, self.model, self.opt)
            self.progress = Progress(**meta["progress"])
            tqdm.write(f"resuming from {self.ckpt_dir}: phase {self.progress.phase}, step {self.progress.step}")
        self.gen = torch.Generator().manual_seed(self.cfg.seed * 1000 + self.progress.step)
        self.autocast = autocast_dtype(self.device, self.cfg.precision)
        self.last_ckpt = time.monotonic()
        self.step_ms: dict[str, float] = {}
        self.steps_done: dict[str, int] = {}
        self.first_loss: dict[str, float] = {}  # mean wall time per optimisation step, per phase
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _has_class_labels(self) -> bool:
        return bool(self.dataset.class_names) and any(s.is_defect for s in self.dataset.train)

    # ---- time accounting -------------------------------------------------------------------
    def phase_budget(self, phase: str) -> float | None:
        if self.cfg.time_budget is None:
            return None
        # Reserve time for the memory bank and calibration (12 %, at most 30 s + 4 %: they take seconds to
        # a minute, not a share of a long budget), then split the rest between phases.
        budget = self.cfg.time_budget
        reserve = min(0.12 * budget, 30.0 + 0.04 * budget)
        train_time = budget - (self.namer_budget() if self.names_pasted else 0.0) - reserve - self.load_seconds
        share = self.cfg.ssl_fraction if phase == "ssl" else 1 - self.cfg.ssl_fraction
        return max(0.0, train_time * share)

    def phase_steps(self, phase: str) -> int:
        n = int(round(self.cfg.steps * self.cfg.ssl_fraction))
        return n if phase == "ssl" else self.cfg.steps - n

    # ---- data ------------------------------------------------------------------------------
    def load_data(self) -> None:
        t = time.monotonic()
        samples = self.dataset.train
        train_idx, val_idx = validation_split(samples, self.cfg.val_fraction)
        paste_size = paste_resolution(samples, self.size) if self.cfg.paste_types else None
        cache = load_cache(samples, self.size, self.class_names, desc="loading images", paste_size=paste_size)
        self.train_cache = cache.subset(train_idx).to(self.device)
        self.val_cache = cache.subset(val_idx) if val_idx else None
        self.good_idx = torch.nonzero(~self.train_cache.is_defect).flatten()
        self.load_seconds = time.monotonic() - t

    def batch(self, only_good: bool = False) -> Batch:
        """A training batch on the device, with photometric jitter."""
        pool = self.good_idx if only_good and len(self.good_idx) else torch.arange(len(self.train_cache))
        idx = pool[torch.randint(len(pool), (self.cfg.batch_size,), generator=self.gen)]
        c = self.train_cache
        images = c.images[idx].to(self.device, non_blocking=True).float().div_(255)
        masks = c.masks[idx].to(self.device).float()
        defect = c.is_defect[idx].to(self.device)
        classes = c.classes[idx].to(self.device)
        # Photometric jitter only: geometry of a fixed camera is part of "normal".
        b = images.shape[0]
        gain = torch.empty(b, 1, 1, 1).uniform_(0.9, 1.1, generator=self.gen).to(self.device)
        bias = torch.empty(b, 1, 1, 1).uniform_(-0.04, 0.04, generator=self.gen).to(self.device)
        images = (images * gain + bias).clamp_(0, 1)
        return Batch(images, masks, defect, classes, idx)

    # ---- phases ----------------------------------------------------------------------------
    def run(self) -> Path:
        self.load_data()
        if self.cfg.render_workers and self.cfg.paste_types:
            self.pool = RenderPool(self.cfg.render_workers)
        try:
            return self._run_phases()
        finally:
            if self.pool is not None:
                self.pool.close()
                self.pool, self.next_batch = None, None

    def _run_phases(self) -> Path:
        for phase in ("ssl", "defect"):
            order = ("ssl", "defect", "fit")
            if order.index(self.progress.phase) > order.index(phase):
                continue
            self.progress.phase = phase
            self.train_phase(phase)
            self.progress = Progress(phase=order[order.index(phase) + 1], seconds=self.progress.seconds,
                                     losses=self.progress.losses)
            self.checkpoint()
        return self.fit_and_save()

    def train_phase(self, phase: str) -> None:
        total = self.phase_steps(phase)
        budget = self.phase_budget(phase)
        if total == 0 or (budget is not None and budget <= 0):
            return
        self.model.train()
        spent_before = self.progress.seconds.get(phase, 0.0)
        first_step = self.progress.step
        t0 = time.monotonic()
        bar = tqdm(total=total, initial=self.progress.step, desc=phase, unit="step", dynamic_ncols=True,
                   disable=None)  # no bar when stderr is not a terminal (CI logs, pipes)
        ema = None
        while self.progress.step < total:
            elapsed = spent_before + time.monotonic() - t0
            if budget is not None and elapsed >= budget:
                break
            frac = max(self.progress.step / total, elapsed / budget if budget else 0.0)
            for group in self.opt.param_groups:
                group["lr"] = lr_at(frac, self.cfg.lr)
            with autocast(self.device, self.autocast):
                loss, parts = self.ssl_loss() if phase == "ssl" else self.defect_loss()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.progress.step += 1
            value = float(loss.detach())
            if not math.isfinite(value):
                raise LineInspectError(f"training diverged in phase {phase} at step {self.progress.step}; "
                                       "lower --lr or check the images")
            if ema is None:
                self.first_loss[phase] = value
            ema = value if ema is None else 0.95 * ema + 0.05 * value
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.4f}", **{k: f"{v:.3f}" for k, v in parts.items()})
            self.progress.seconds[phase] = spent_before + time.monotonic() - t0
            if time.monotonic() - self.last_ckpt > self.cfg.checkpoint_every_s:
                self.checkpoint()
        bar.close()
        self.progress.losses[phase] = ema
        self.progress.seconds[phase] = spent_before + time.monotonic() - t0
        self.steps_done[phase] = self.progress.step
        done = self.progress.step - first_step
        if done:
            self.step_ms[phase] = round((time.monotonic() - t0) * 1000 / done, 1)

    def ssl_loss(self) -> tuple[torch.Tensor, dict]:
        images = self.batch(only_good=True).images
        if self.cfg.dihedral:
            images, _ = dihedral(images, None, dihedral_codes(len(images), images.shape[-1] == images.shape[-2],
                                                               self.gen))
        loss = self.model.masked_reconstruction_loss(images)
        return loss, {}

    def defect_loss(self) -> tuple[torch.Tensor, dict]:
        b = self.defect_batch()
        return self.supervised_loss(self.model.logits(b.images, class_region=b.masks), b.masks, b.defect, b.classes)

    def defect_batch(self) -> Batch:
        """A batch with synthetic defects pasted on good images; its `defect` is the target after pasting.
        With a render pool the next batch is drawn and its paintings started before this one is handed
        back, so the workers paint while the device trains on this one."""
        batch = self.next_batch or self.start_defect_batch()
        self.next_batch = self.start_defect_batch() if self.pool is not None else None
        return self.finish_defect_batch(batch)

    def start_defect_batch(self) -> PendingBatch:
        """Draw a batch, paste the generic defects and start painting the named ones."""
        images, masks, defect, classes, idx = self.batch()
        good = ~defect
        pasted, pmask, has, paintings = None, None, None, None
        if good.any():
            pasted, pmask, has = synthesize_defects(images[good], self.gen, self.cfg.p_defect, self.cfg.streak_share)
            if self.cfg.paste_types:
                sources = self.train_cache.sources
                if sources is not None:
                    sources = sources[idx[good.to(idx.device)].cpu().numpy()]
                paintings = start_named_defects(pasted, has, self.cfg.paste_types, self.gen, sources=sources,
                                                pool=self.pool)
        symmetries = (dihedral_codes(len(images), images.shape[-1] == images.shape[-2], self.gen)
                      if self.cfg.dihedral else None)
        return PendingBatch(Batch(images, masks, defect, classes, idx), pasted, pmask, has, paintings, symmetries)

    def finish_defect_batch(self, pending: PendingBatch) -> Batch:
        """The pasted defects in place and the targets after pasting; then each image's symmetry, if drawn
        (after the pasting, because the painters work from the untransformed source images)."""
        images, masks, defect, classes, idx = pending.drawn
        target = defect
        if pending.pasted is not None:
            good = ~defect
            pasted, pmask, has = pending.pasted, pending.masks, pending.has
            if pending.paintings is not None:
                pasted, pmask, has, kinds = finish_named_defects(pasted, pmask, has, pending.paintings)
                if self.names_pasted:
                    classes = classes.clone()
                    classes[good] = kinds
            images[good], masks[good] = pasted, pmask
            target = defect.clone()
            target[good] = has
        if pending.symmetries is not None:
            images, masks = dihedral(images, masks, pending.symmetries)
        return Batch(images, masks, target, classes, idx)

    def supervised_loss(self, out: HeadOutput, masks: torch.Tensor, target: torch.Tensor,
                        classes: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Segmentation + image + class objectives of the head's logits against the batch's labels."""
        has_mask = self.train_cache.has_mask.new_ones(len(masks)).to(self.device)
        seg = focal_dice_loss(out.mask_logits, masks, has_mask.float())
        img = F.binary_cross_entropy_with_logits(out.image_logit.float(), target.float())
        parts = {"seg": float(seg.detach()), "img": float(img.detach())}
        loss = seg + img
        if self.cfg.peak_loss > 0:
            peak = map_peak_loss(out.mask_logits, target, self.model.config.map_smoothing)
            parts["peak"] = float(peak.detach())
            loss = loss + self.cfg.peak_loss * peak
        if out.class_logits is not None and (classes >= 0).any():
            known = classes >= 0
            cls = F.cross_entropy(out.class_logits[known].float(), classes[known], label_smoothing=0.1)
            parts["cls"] = float(cls.detach())
            loss = loss + cls
        return loss, parts

    def checkpoint(self) -> None:
        save_checkpoint(self.ckpt_dir, self.model, self.opt,
                        {"progress": asdict(self.progress), "config": asdict(self.cfg)})
        self.last_ckpt = time.monotonic()

    # ---- memory bank and calibration -------------------------------------------------------
    @torch.no_grad()
    def outputs(self, images_u8: torch.Tensor) -> list:
        self.model.eval()
        outs = []
        for chunk in images_u8.split(32):
            x = chunk.to(self.device).float().div_(255)
            with autocast(self.device, self.autocast):
                outs.append(self.model(x))
        return outs

    @torch.no_grad()
    def fit_memory(self) -> bool:
        good = self.train_cache.images[self.good_idx]
        if len(good) == 0:
            return False
        self.model.eval()
        desc = []
        for chunk in good.split(32):
            x = chunk.to(self.device).float().div_(255)
            with autocast(self.device, self.autocast):
                d, _ = self.model.descriptors(x)
            desc.append(d.float().flatten(0, 1))
        self.model.memory.fit(torch.cat(desc), seed=self.cfg.seed)
        self.model.regions.fit(good.to(self.device), seed=self.cfg.seed)  # uint8: converted a chunk at a time
        return True

    def validation_set(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Held-out images plus, for each good one, a copy with a synthetic defect (fixed seed)."""
        cache = self.val_cache if self.val_cache is not None else self.train_cache
        images, masks, defect = cache.images.cpu(), cache.masks.cpu(), cache.is_defect.cpu()
        good = ~defect
        g = torch.Generator().manual_seed(12345)
        base = images[good].float().div(255)
        pasted, pmask, has = synthesize_defects(base, g, p_defect=1.0)
        if self.cfg.paste_types:  # half of them show the named kinds the training pastes instead
            named = (torch.rand(len(has), generator=g) < 0.5).view(-1, 1, 1, 1)
            pasted, pmask = torch.where(named, base, pasted), pmask * ~named
            sources = None if cache.sources is None else cache.sources[good.numpy()]
            pasted, pmask, has, _ = paste_named_defects(pasted, pmask, has & ~named.flatten(), self.cfg.paste_types,
                                                     g, share=1.0, sources=sources, pool=self.pool)
        images = torch.cat([images, (pasted * 255).round().to(torch.uint8)[has]])
        masks = torch.cat([masks, pmask.to(torch.uint8)[has]])
        labels = torch.cat([defect, torch.ones(int(has.sum()), dtype=torch.bool)])
        is_good = torch.cat([good, torch.zeros(int(has.sum()), dtype=torch.bool)])
        return images, masks, labels, is_good

    def calibrate(self, bank_fitted: bool) -> Calibration:
        images, masks, labels, is_good = self.validation_set()
        outs = self.outputs(images)
        base = Calibration(class_names=tuple(self.class_names))
        def good_stats(peaks: torch.Tensor) -> tuple[float, float]:
            ref = peaks[is_good] if is_good.sum() >= 2 else peaks
            return float(ref.mean()), float(ref.std().clamp_min(1e-6))

        if bank_fitted:
            mean, std = good_stats(torch.cat([o.memory_map.flatten(1).amax(1) for o in outs]).cpu())
            base = replace(base, memory_mean=mean, memory_std=std)
        if outs[0].novelty_score is not None:
            mean, std = good_stats(torch.cat([o.novelty_score for o in outs]).cpu())
            base = replace(base, novelty_mean=mean, novelty_std=std)
        if outs[0].region_score is not None:
            mean, std = good_stats(torch.cat([o.region_score for o in outs]).cpu())
            base = replace(base, region_mean=mean, region_std=std)
        scores = {k: torch.cat([image_scores(o, base)[k] for o in outs]).cpu().numpy()
                  for k in image_scores(outs[0], base)}
        y = labels.numpy()
        notes: dict = {"n_val_images": int(len(y)), "n_val_defect": int(y.sum())}
        source = "head" if self.cfg.score_source == "auto" else self.cfg.score_source
        if source not in scores:
            raise LineInspectError(f"this model has no {source!r} score (it needs the self-similarity or memory bank)")
        if 0 < y.sum() < len(y):
            aurocs = {k: image_auroc(v, y) for k, v in scores.items()}
            notes["val_image_auroc"] = {k: round(v, 4) for k, v in aurocs.items()}
            if self.cfg.score_source == "auto":
                cache = self.val_cache if self.val_cache is not None else self.train_cache
                default = default_source(aurocs, real_defects=bool(cache.is_defect.any()))
                source, margin = choose_source(aurocs, default, int(y.sum()), int(len(y) - y.sum()))
                notes["source_margin"] = round(margin, 4)
            if self.cfg.target_frr is not None:
                threshold = threshold_for_false_reject_rate(scores[source][~y.astype(bool)], self.cfg.target_frr)
            else:
                threshold, f1 = f1_optimal_threshold(scores[source], y)
                notes["val_f1"] = round(f1, 4)
            held_out_goods = scores[source][is_good.numpy()]
            if len(held_out_goods):
                notes["val_goods_flagged"] = round(float((held_out_goods >= threshold).mean()), 4)
        else:
            threshold = 0.5  # only defect images to validate on: keep the trained decision point
        map_source = self.cfg.map_source
        if map_source == "auto":  # the served map follows the score: fused where the score reads the bank
            map_source = "fused" if bank_fitted and source in ("memory", "regions", "fused") else "head"
        elif map_source == "fused" and not bank_fitted:
            raise LineInspectError("the fused map needs the memory bank, fitted on good images; this line has none")
        base = replace(base, map_source=map_source)
        maps = torch.cat([calibrated_map(o, base) for o in outs]).cpu()
        sel = labels.bool()
        pix_scores = maps[sel].flatten().numpy()
        pix_labels = masks[sel].flatten().numpy() > 0
        if len(pix_scores) > 400_000:
            pick = np.random.default_rng(0).choice(len(pix_scores), 400_000, replace=False)
            pix_scores, pix_labels = pix_scores[pick], pix_labels[pick]
        pixel_threshold = 0.5
        if 0 < pix_labels.sum() < len(pix_labels):
            pixel_threshold, pf1 = f1_optimal_threshold(pix_scores, pix_labels)
            notes["val_pixel_f1"] = round(pf1, 4)
        calibration = replace(base, score_source=source, threshold=float(threshold),
                              pixel_threshold=float(max(pixel_threshold, 0.05)), notes=notes)
        cache = self.val_cache if self.val_cache is not None else self.train_cache
        if any(len(b) for b in cache.boxes):  # labelled boxes: cut boxes the way they are labelled
            real = maps[: len(cache), 0].numpy()  # validation_set puts the real images first
            fields, box_notes = choose_box_levels(real, cache.boxes, calibration.pixel_threshold,
                                                  max(4, int(calibration.min_box_area * self.size ** 2)))
            calibration = replace(calibration, **fields, notes={**notes, **box_notes})
        return calibration

    def fit_namer(self) -> dict:
        """The namer phase (training.namer_phase) on the pasted kinds; notes for the calibration."""
        seconds = self.namer_budget()
        mean, std = self.model.mean.cpu(), self.model.std.cpu()  # the pool is rendered on the host

        def normalize(images: torch.Tensor) -> torch.Tensor:
            return (images - mean) / std

        model = self.model

        @torch.no_grad()
        def region_of(images: torch.Tensor) -> torch.Tensor:  # the trained model's focus region, as at inference
            was_training = model.training
            model.eval()
            with autocast(self.device, self.autocast):
                logits = model.logits(images.to(self.device)).mask_logits
            model.train(was_training)
            return focus_region(torch.sigmoid(logits.float())).cpu()

        return train_namer(self.model.head.class_out, self.train_cache, self.good_idx.cpu(), self.cfg.paste_types,
                           self.cfg.seed, seconds, self.device, normalize, self.autocast,
                           region_of if self.namer_uses_model_regions() else None, pool=self.pool)

    def namer_budget(self) -> float:
        """Seconds for the namer phase (part of the time budget when there is one)."""
        if self.cfg.namer_seconds is not None:
            return self.cfg.namer_seconds
        return self.cfg.time_budget * NAMER_SHARE if self.cfg.time_budget else 120.0

    def namer_uses_model_regions(self) -> bool:
        return self.cfg.namer_regions == "model" or (self.cfg.namer_regions == "auto" and self.device.type == "cuda")

    def fit_and_save(self) -> Path:
        t = time.monotonic()
        namer = self.fit_namer() if self.names_pasted else {}
        fitted = self.fit_memory()
        calibration = self.calibrate(fitted)
        calibration = replace(calibration, notes={**calibration.notes, **namer})
        self.progress.seconds["fit"] = time.monotonic() - t
        summary = self.summary()
        save_model_dir(self.out, self.model.cpu(), calibration, summary)
        tqdm.write(json.dumps({"model": str(self.out), "calibration": calibration.notes,
                               "score_source": calibration.score_source, "threshold": round(calibration.threshold, 4),
                               "steps": summary["training"]["steps"], **summary["training"]["seconds"]}))
        return self.out

    def summary(self) -> dict:
        """What config.json records about the run besides the model and its calibration."""
        return {
            "training": {"config": asdict(self.cfg), "seconds": {k: round(v, 1) for k, v in
                                                                 self.progress.seconds.items()},
                         "load_seconds": round(self.load_seconds, 1), "first_losses": self.first_loss,
                         "final_losses": self.progress.losses,
                         "steps_planned": {"ssl": self.phase_steps("ssl"), "defect": self.phase_steps("defect")},
                         "steps": self.steps_done,
                         "ms_per_step": self.step_ms,
                         "render_workers": self.cfg.render_workers if self.cfg.paste_types else 0,
                         "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
                         if self.device.type == "cuda" else None,
                         "wall_seconds": round(time.monotonic() - self.start, 1)},
            "data": {"root": str(self.dataset.root), "layout": self.dataset.layout,
                     "n_train": len(self.train_cache), "n_val": len(self.val_cache) if self.val_cache else 0,
                     "class_names": self.class_names},
        }
