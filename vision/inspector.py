"""The fast defect path end to end: RGB frames in, Inspection verdicts out.

An Inspector owns a DefectModel on one device plus the calibration chosen on validation data
(which score to trust, its threshold, the pixel threshold for boxes). It is the one object the
CLI, the batch audit and the gRPC engine call; it holds no per-request state.

On a CUDA device the model runs from CUDA graphs captured when the Inspector is built, with frames
resized on the GPU (`vision.cuda_graphs`); ``cuda_graphs=False`` keeps the eager path, which is
also the only path on CPUs. On a CPU with native bf16 the eager path runs a copy whose linear and
convolution weights are stored in bf16 (``cpu_bf16_copy``): bf16 autocast would otherwise cast
every weight again on every call.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from lineinspect import __version__
from lineinspect.errors import LineInspectError
from lineinspect.vision.cuda_graphs import BUCKETS, CudaGraphRunner, cat_rows, inference_copy, split_batch
from lineinspect.vision.defect_model import DefectModel, DefectOutput
from lineinspect.vision.int8 import quantized_layers
from lineinspect.vision.postprocess import boxes_at_levels, peak_box, scale_boxes, upsample_map
from lineinspect.vision.precision import autocast, autocast_dtype
from lineinspect.vision.preprocess import to_batch
from lineinspect.vision.result import Box, Inspection

SCORE_SOURCES = ("image", "map", "head", "memory", "novelty", "regions", "fused")
MAP_SOURCES = ("head", "fused")
# The region statistics count twice in the fused score: on real steel with unseen defects (27 trained models
# over four lines) image AUROC 0.897 -> 0.905, higher for 23, lower for 3; four fresh models trained after the
# choice 0.910 -> 0.915; turned metal (10 models) 0.987 -> 0.987; weights 3 and 4 gained more on steel but cost
# metal (bench/fusion_weights.py, bench/RESULTS.md session 28).
REGION_WEIGHT = 2.0


@dataclass(frozen=True)
class FrameOutput:
    """One frame's model output on the host, from which `Inspector.finish` makes its Inspection."""

    score: float  # the calibrated image score
    small_map: np.ndarray  # (S, S) float32 anomaly map at model resolution
    probs: np.ndarray | None  # (K,) class probabilities, when the classes are named
    model_ms: float  # this frame's share of its batch's model call


@dataclass(frozen=True)
class Calibration:
    score_source: str = "head"  # which image score decides (chosen on validation)
    threshold: float = 0.5  # image score >= threshold -> defect
    pixel_threshold: float = 0.5  # served map >= this -> defect region (boxes)
    # which map is served and boxed (`calibrated_map`): "head" (the learned head's), or "fused" (its geometric
    # mean with the memory bank's and region statistics' maps); models calibrated before it existed: "head"
    map_source: str = "head"
    # how an unbounded peak becomes a score (`squash_peak`); models calibrated before it existed: "sigmoid"
    peak_squash: str = "rational"
    memory_mean: float = 0.0  # good-image statistics of the memory bank's peak distance
    memory_std: float = 1.0
    novelty_mean: float = 1.0  # good-image statistics of the peak self-similarity novelty
    novelty_std: float = 1.0
    region_mean: float = 0.0  # good-image statistics of the region-statistics score
    region_std: float = 1.0
    # the region statistics' weight in the fused score (`image_scores`); models calibrated before it existed: 1
    region_weight: float = REGION_WEIGHT
    min_box_area: float = 0.0005  # fraction of the image; smaller regions are not boxed
    seed_fraction: float = 0.45  # defect cores: a level's threshold + this share of the way to 1
    # a second, looser level for boxes: faint defects the pixel threshold misses (chosen on labelled boxes)
    box_lower_threshold: float | None = None
    class_names: tuple[str, ...] = ()
    notes: dict = field(default_factory=dict)  # validation figures behind the choice

    def to_dict(self) -> dict:
        d = asdict(self)
        d["class_names"] = list(self.class_names)
        return d

    @property
    def box_levels(self) -> list[float]:
        """The anomaly-map levels that boxes are cut at, strictest first."""
        lower = self.box_lower_threshold
        return [self.pixel_threshold] + ([lower] if lower is not None and lower < self.pixel_threshold else [])

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        data = dict(data)
        data["class_names"] = tuple(data.get("class_names", ()))
        data.setdefault("peak_squash", "sigmoid")
        data.setdefault("region_weight", 1.0)
        if data.get("score_source", "head") not in SCORE_SOURCES:
            raise LineInspectError(f"unknown score source {data['score_source']!r}: one of {', '.join(SCORE_SOURCES)}")
        if data.get("map_source", "head") not in MAP_SOURCES:
            raise LineInspectError(f"unknown map source {data['map_source']!r}: one of {', '.join(MAP_SOURCES)}")
        return cls(**data)


def image_scores(out: DefectOutput, cal: Calibration) -> dict[str, torch.Tensor]:
    """Every candidate image score (B,) for this output; all in [0, 1]."""
    head = 0.5 * (out.map_score + out.image_prob)
    scores = {"image": out.image_prob, "map": out.map_score, "head": head}
    if out.memory_map is not None:
        peak = out.memory_map.flatten(1).amax(1).float()
        scores["memory"] = squash_peak((peak - cal.memory_mean) / max(cal.memory_std, 1e-6), cal.peak_squash)
    if out.novelty_score is not None:
        z = (out.novelty_score.float() - cal.novelty_mean) / max(cal.novelty_std, 1e-6)
        scores["novelty"] = squash_peak(z, cal.peak_squash)
    if out.region_score is not None:
        z = (out.region_score.float() - cal.region_mean) / max(cal.region_std, 1e-6)
        scores["regions"] = squash_peak(z, cal.peak_squash)
    weights = {k: w for k, w in (("memory", 1.0), ("novelty", 1.0), ("regions", cal.region_weight)) if k in scores}
    if weights:
        scores["fused"] = (head + sum(w * scores[k] for k, w in weights.items())) / (1 + sum(weights.values()))
    return scores


def squash_peak(z: torch.Tensor, how: str = "rational") -> torch.Tensor:
    """An unbounded peak, standardised by the good images' statistics (z), as a score in (0, 1):
    2 sigma above the good images' mean is even odds. "rational" (0.5 + 0.5 t / (1 + |t|), t = z - 2)
    keeps the order of peaks far out in the tail, up to z ~ 1e7 in float32; "sigmoid", which earlier
    models were calibrated with, rounds every z past ~19 to 1.0, and where the validation goods'
    spread is narrow that tied whole test sets (an s14 model on real steel: memory-bank AUROC 0.5)."""
    t = z - 2.0
    if how == "sigmoid":
        return torch.sigmoid(t)
    if how != "rational":
        raise LineInspectError(f"unknown peak squash {how!r}: 'rational' or 'sigmoid'")
    return 0.5 + 0.5 * t / (1.0 + t.abs())


def calibrated_score(out: DefectOutput, cal: Calibration) -> torch.Tensor:
    """The image score (B,) that the verdict compares with `cal.threshold`. A memory or fused
    source needs `out` from a call with the memory bank (``uses_memory``)."""
    scores = image_scores(out, cal)
    if cal.score_source not in scores:
        raise LineInspectError(f"calibrated score: the output lacks what score source {cal.score_source!r} needs")
    return scores[cal.score_source]


def calibrated_map(out: DefectOutput, cal: Calibration) -> torch.Tensor:
    """The served anomaly map (B, 1, S, S) in [0, 1], which boxes are cut from and pixel AUROC is measured on.

    "head": the head's defect probability. "fused": the geometric mean of it and the mean of the memory
    bank's and the region statistics' maps (where the output has them; the statistics weighted as in the
    fused score), each standardised and squashed as their image scores are (2 sigma above the good images'
    peak is even odds). A pixel scores high only where the head and the good parts' statistics agree: the
    head keeps its sharp outlines, the banks veto its false alarms on real texture.

    Pixel AUROC / best pixel F1 (bench/RESULTS.md). Session 27, weight 1: four real-steel lines of unseen
    defects (`tiny`, offline on session 26's models) 0.79 / 0.55 against the head's 0.62 / 0.33 (end to end,
    two seeds: pixel AUROC 0.77 / 0.83 against 0.62 / 0.70); turned metal, whose defects the training's
    renderer imitates, 0.95-0.98 / 0.57-0.69 against 0.97 / 0.70-0.72 (three models). The arithmetic mean of
    the three reached 0.84 / 0.57 on steel but lost metal's outlines (best F1 0.42-0.53). Session 28, the
    statistics weighted twice (bench/map_weights.py; 8 steel and 6 metal models): steel 0.822 / 0.553 ->
    0.829 / 0.561, metal 0.970 / 0.619 -> 0.972 / 0.613."""
    prob = out.anomaly_map.float()
    banks = []  # (squashed map, weight)
    if cal.map_source == "fused" and out.memory_map is not None:
        z = (out.memory_map.float() - cal.memory_mean) / max(cal.memory_std, 1e-6)
        banks.append((squash_peak(z, cal.peak_squash), 1.0))
    if cal.map_source == "fused" and out.region_map is not None:
        z = (out.region_map.float() - cal.region_mean) / max(cal.region_std, 1e-6)
        banks.append((squash_peak(z, cal.peak_squash), cal.region_weight))
    if not banks:
        return prob
    return (prob * sum(m * w for m, w in banks) / sum(w for _, w in banks)).sqrt()


def uses_memory(cal: Calibration) -> bool:
    """Whether the calibrated score or map reads the memory bank or the region statistics fitted with it."""
    return cal.score_source in ("memory", "regions", "fused") or cal.map_source == "fused"


def graph_fields(cal: Calibration) -> tuple:
    """The calibration fields that CUDA graphs compute with (thresholds are applied on the host)."""
    return (cal.score_source, cal.map_source, cal.peak_squash, cal.memory_mean, cal.memory_std, cal.novelty_mean,
            cal.novelty_std, cal.region_mean, cal.region_std, cal.region_weight, bool(cal.class_names))


def cpu_bf16_copy(model: DefectModel) -> DefectModel | None:
    """A frozen copy of `model` with the weights of its linear and convolution layers in bf16 (the
    rest fp32), for bf16 autocast on a CPU, where autocast casts fp32 weights anew on every call:
    `s14` at batch 1 on a 2-core AVX512-BF16 CPU 54.7 -> 49.1 ms p50, the same maps (bench/RESULTS.md).
    None for an int8 model (its packed linears do not copy this way)."""
    if quantized_layers(model):
        return None
    twin = inference_copy(model, torch.float32)
    for module in twin.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.to(torch.bfloat16)
    return twin


class Inspector:
    """The defect model and its calibration on one device (see the module docstring).

    With CUDA graphs (on CUDA unless ``cuda_graphs=False``), the graphs run a copy of `model` taken
    at construction, with weights in the Inspector's precision (bf16 by default): later changes to
    `model`'s weights are not seen, and setting a calibration that scores differently captures the
    graphs again (seconds). `model` itself serves `run_model`, except on a CPU with native bf16, where
    a copy with bf16 linear and convolution weights does (``cpu_bf16_copy``; the same caveat). On a
    CPU the encoder is switched to explicit attention, the faster form there
    (`VisionEncoder.use_fused_attention`). Forward hooks on `model` (the language path's evidence
    tap) see each batch's input and output on every path.
    """

    def __init__(self, model: DefectModel, calibration: Calibration, device: torch.device | str = "cpu",
                 preset: str | None = None, precision: str = "auto", cuda_graphs: bool = True,
                 buckets: tuple[int, ...] = BUCKETS) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.model.encoder.use_fused_attention(self.device.type != "cpu")
        self._calibration = calibration
        self.preset = preset or model.config.encoder.preset
        self.input_size = model.config.encoder.img_size
        # bf16 where the device computes it natively: the encoder's matmuls dominate (vision.precision).
        self.autocast_dtype = autocast_dtype(self.device, precision)
        self.buckets = buckets
        self.graphs = self._capture_graphs() if cuda_graphs and self.device.type == "cuda" else None
        self._cpu_runner = None
        if self.device.type == "cpu" and self.autocast_dtype == torch.bfloat16:
            self._cpu_runner = cpu_bf16_copy(self.model)
            if self._cpu_runner is not None:
                self._cpu_runner.encoder.use_fused_attention(False)

    @property
    def calibration(self) -> Calibration:
        return self._calibration

    @calibration.setter
    def calibration(self, value: Calibration) -> None:
        old, self._calibration = self._calibration, value
        if self.graphs is not None and graph_fields(value) != graph_fields(old):
            self.graphs = self._capture_graphs()

    def _prob_columns(self) -> int:
        """Class-probability columns in the graphs' rows: as many as classes when they are named."""
        return self.model.config.head.num_classes if self.calibration.class_names else 0

    def _capture_graphs(self) -> CudaGraphRunner[DefectOutput]:
        """Graphs of a copy of the model that also pack score, class probabilities and map into one
        float32 row per image: [score, probs (K), map (S*S)]."""
        cal, k = self.calibration, self._prob_columns()
        dtype = self.autocast_dtype or torch.float32
        model = inference_copy(self.model, dtype)
        use_memory = uses_memory(cal) and bool(model.memory.fitted)  # read once, here

        def forward(images: torch.Tensor) -> tuple[torch.Tensor, DefectOutput]:
            out = model(images, use_memory=use_memory, bank_fitted=use_memory)
            cols = [calibrated_score(out, cal).float()[:, None]]
            if k:
                cols.append(torch.softmax(out.class_logits.float(), 1))
            cols.append(calibrated_map(out, cal).flatten(1))
            return torch.cat(cols, 1), out

        return CudaGraphRunner(forward, self.input_size, self.device, self.buckets)

    @property
    def threshold(self) -> float:
        return self.calibration.threshold

    @property
    def class_names(self) -> list[str]:
        return list(self.calibration.class_names)

    def info(self) -> dict:
        return {
            "preset": self.preset,
            "version": __version__,
            "threshold": self.threshold,
            "score_source": self.calibration.score_source,
            "map_source": self.calibration.map_source,
            "device": str(self.device),
            "class_names": self.class_names,
            "input_size": self.input_size,
            "params": sum(p.numel() for p in self.model.parameters()),
            "cuda_graphs": list(self.graphs.buckets) if self.graphs is not None else [],
            "precision": self.precision,
        }

    @property
    def precision(self) -> str:
        """What the model computes in: "bf16" or "fp32", with "int8 linears, " first for a quantised model."""
        base = "bf16" if self.autocast_dtype == torch.bfloat16 else "fp32"
        return f"int8 linears, {base}" if quantized_layers(self.model) else base

    def boxes(self, small_map: np.ndarray, label: str, width: int, height: int) -> list[Box]:
        """Boxes found on the model-resolution map, in input pixels (cheaper than at full size). For a defect
        verdict: where no region reaches the box levels, the box around the map's peak (`peak_box`)."""
        cal = self.calibration
        size = small_map.shape[0]
        found = boxes_at_levels(small_map, cal.box_levels, cal.seed_fraction,
                                min_area=max(4, int(cal.min_box_area * size * size)), label=label)
        return scale_boxes(found or [peak_box(small_map, label)], width / small_map.shape[1], height / size,
                           width, height)

    @torch.inference_mode()
    def run_model(self, batch: torch.Tensor) -> DefectOutput:
        """batch (B,3,S,S) float [0,1] on the device -> raw model output."""
        use_memory = uses_memory(self.calibration)
        with autocast(self.device, self.autocast_dtype):
            if self._cpu_runner is None:
                return self.model(batch, use_memory=use_memory)
            out = self._cpu_runner(batch, use_memory=use_memory)
        self._call_hooks(batch, out)
        return out

    @torch.inference_mode()
    def source_scores(self, images: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Every candidate image score of `image_scores` (B,) for RGB uint8 frames, the memory
        bank's included whatever the calibrated source: for choosing the source on a line's images."""
        batch = to_batch(images, self.input_size, self.device)
        with autocast(self.device, self.autocast_dtype):
            out = (self._cpu_runner or self.model)(batch, use_memory=True)
        return {k: v.float().cpu().numpy() for k, v in image_scores(out, self.calibration).items()}

    def _call_hooks(self, inputs: torch.Tensor, output: DefectOutput) -> None:
        """The forward hooks of `model` (the language path's evidence tap), for calls that ran a copy."""
        for hook in list(self.model._forward_hooks.values()):
            hook(self.model, (inputs,), output)

    def inspect_batch(self, images: list[np.ndarray], heatmaps: list[bool] | bool = False,
                      sizes: list[tuple[int, int]] | None = None) -> list[Inspection]:
        """RGB uint8 (H,W,3) images of any size -> one Inspection each (boxes in input pixels).

        `sizes`: each image's (H, W) as sent, when it was decoded shrunk; heatmaps and boxes are
        given in those pixels. The same as `run_batch` followed by `finish` for each frame."""
        want = heatmaps if isinstance(heatmaps, list) else [heatmaps] * len(images)
        outputs = self.run_batch(images)
        return [self.finish(out, sizes[i] if sizes is not None else images[i].shape[:2], want[i])
                for i, out in enumerate(outputs)]

    def run_batch(self, images: list[np.ndarray]) -> list[FrameOutput]:
        """The model part of a batch: RGB uint8 frames -> each frame's score, map and class
        probabilities on the host. The serving engine's batch worker calls only this, so that
        the host-side `finish` of a large batch can run elsewhere while the device takes the next."""
        if not images:
            return []
        t0 = time.perf_counter()
        cal = self.calibration
        if self.graphs is not None:
            score, maps, probs = self._run_graphs(images)
        else:
            batch = to_batch(images, self.input_size, self.device)
            out = self.run_model(batch)
            score = calibrated_score(out, cal).float().cpu().numpy()
            maps = calibrated_map(out, cal)[:, 0].cpu().numpy()  # (B, S, S)
            probs = (torch.softmax(out.class_logits.float(), 1).cpu().numpy()
                     if out.class_logits is not None and cal.class_names else None)
        model_ms = (time.perf_counter() - t0) * 1000 / len(images)
        return [FrameOutput(float(score[i]), maps[i], None if probs is None else probs[i], model_ms)
                for i in range(len(images))]

    def finish(self, out: FrameOutput, size: tuple[int, int], heatmap: bool = False) -> Inspection:
        """One frame's verdict, class, boxes and (on request) heatmap, in the pixels of `size`
        (H, W). Host work only (NumPy and OpenCV, no torch): safe on any thread."""
        t0 = time.perf_counter()
        cal = self.calibration
        h, w = size
        is_defect = bool(out.score >= cal.threshold)
        cls_name, cls_prob = "", 0.0
        if out.probs is not None:
            k = int(out.probs.argmax())
            cls_name, cls_prob = cal.class_names[k], float(out.probs[k])
        result = Inspection(
            score=out.score, is_defect=is_defect, threshold=cal.threshold,
            defect_class=cls_name if is_defect else "", class_prob=cls_prob if is_defect else 0.0,
            boxes=self.boxes(out.small_map, cls_name, w, h) if is_defect else [],
            heatmap=upsample_map(out.small_map, h, w) if heatmap else None,
        )
        result.timings_ms.update(model=out.model_ms, post=(time.perf_counter() - t0) * 1000)
        return result

    def _run_graphs(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Score (B,), maps (B, S, S) and class probabilities (B, K) or None, through the graphs in
        chunks of the largest bucket. Graph replays bypass the model's forward hooks, so the hooks
        are called here with copies of the batch's input and output."""
        hooks = list(self.model._forward_hooks.values())
        results = [self.graphs.run(images[part], keep=bool(hooks))
                   for part in split_batch(len(images), self.graphs.max_batch)]
        if hooks:
            inputs, output = results[0].images, results[0].extra
            if len(results) > 1:
                inputs, output = cat_rows([r.images for r in results]), cat_rows([r.extra for r in results])
            self._call_hooks(inputs, output)
        rows = [r.rows for r in results]
        table = rows[0] if len(rows) == 1 else np.concatenate(rows)
        k = self._prob_columns()
        maps = table[:, 1 + k:].reshape(len(images), self.input_size, self.input_size)
        return table[:, 0], maps, table[:, 1 : 1 + k] if k else None
