"""Measure the language part on held-out images: does it name the defect, place it, pass good parts?

For every test image (a synthetic set written with a seed never trained on, or a real set's test
split) the model is asked each question intent with greedy decoding, once in the TRAIN phrasings
and once in the HELD-OUT phrasings (reported separately), and the answers are read back with
``captions.read_answer``:

* type accuracy - defect images whose answer to "What defect is visible?" names the true type
  (``report_type_accuracy``: the same read from the inspection report);
* location accuracy - defect images whose answer to "Where is the defect?" names exactly the true
  set of location words (``location_overlap``: at least one right word and none outside the set);
* no-defect rate - good images whose inspection report says there is no defect;
* acceptability accuracy - "Is this part acceptable?" answered yes for good and no for defective.

Ablation: the same model with every cross-attention gate forced closed (the decoder then cannot
see the image), asked the same TRAIN-phrasing questions; its type accuracy must fall to about
``chance`` (always naming the most common type).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lineinspect.errors import LineInspectError
from lineinspect.moe_lm.generate import SamplingConfig, generate
from lineinspect.moe_lm.report_model import LanguagePart, ReportModel, file_digest, load_language, prompt_text
from lineinspect.training import captions as cap
from lineinspect.training.datasets import Dataset
from lineinspect.training.train_language import encode_images
from lineinspect.vision.model_io import WEIGHTS, load_model_dir, resolve_device

TARGETS = {"type_accuracy": 0.95, "location_accuracy": 0.85, "good_no_defect": 0.95}
NEU_TYPE_TARGET = 0.90


def closed_gates(model: ReportModel) -> ReportModel:
    """A copy of the model with every gate's scale at 0: cross-attention adds exactly nothing."""
    closed = copy.deepcopy(model)
    with torch.no_grad():
        for block in closed.decoder.blocks:
            if block.xattn is not None:
                block.xattn.gate_scale.zero_()
    return closed


@torch.inference_mode()
def answer(model: ReportModel, tokenizer, evidence: torch.Tensor, prompts: Sequence[str], max_new_tokens: int = 48,
           batch_size: int = 64, device: torch.device | str = "cpu") -> list[str]:
    """Greedy answers, one per (evidence row, question)."""
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids = tokenizer.encode_batch([prompt_text(q) for q in prompts[start : start + batch_size]])
        image = model.image_tokens(evidence[start : start + batch_size].to(device).float())
        out += [tokenizer.decode(g) for g in generate(model.decoder, ids, sampling, image_tokens=image)]
    return [" ".join(t.split()) for t in out]


def _rate(hits: Sequence[bool]) -> float | None:
    return round(float(np.mean(hits)), 4) if len(hits) else None


def score(labels: Sequence[cap.DefectLabel], replies: dict[str, list[str]], type_names: Sequence[str]) -> dict:
    """Metrics from the answers per intent (each list aligned with `labels`)."""
    read = {k: [cap.read_answer(t, type_names) for t in v] for k, v in replies.items()}
    defect = [i for i, lb in enumerate(labels) if not lb.is_good]
    good = [i for i, lb in enumerate(labels) if lb.is_good]
    located = [i for i in defect if labels[i].locations]

    def exact(i: int, intent: str) -> bool:
        return read[intent][i].locations == frozenset(labels[i].locations)

    def overlap(i: int, intent: str) -> bool:
        got = read[intent][i].locations
        return bool(got) and got <= frozenset(labels[i].locations)

    verdict_ok = [read["acceptable"][i].verdict == ("accept" if labels[i].is_good else "reject")
                  for i in range(len(labels))]
    return {
        "n_defect": len(defect), "n_good": len(good),
        "type_accuracy": _rate([read["type"][i].type == labels[i].type for i in defect]),
        "report_type_accuracy": _rate([read["report"][i].type == labels[i].type for i in defect]),
        "location_accuracy": _rate([exact(i, "where") for i in located]),
        "report_location_accuracy": _rate([exact(i, "report") for i in located]),
        "location_overlap": _rate([overlap(i, "where") for i in located]),
        "good_no_defect": _rate([read["report"][i].type == cap.GOOD for i in good]),
        "good_no_defect_type_question": _rate([read["type"][i].type == cap.GOOD for i in good]),
        "defect_called_good": _rate([read["report"][i].type == cap.GOOD for i in defect]),
        "acceptable_accuracy": _rate(verdict_ok),
    }


def ask_all(model: ReportModel, tokenizer, evidence: torch.Tensor, n: int, split: str, device: torch.device,
            max_new_tokens: int, intents: Sequence[str] = cap.INTENTS) -> dict[str, list[str]]:
    """Every intent for every image, the i-th image asked the (i mod k)-th phrasing of `split`."""
    replies = {}
    for intent in intents:
        qs = cap.questions(intent, split)
        replies[intent] = answer(model, tokenizer, evidence, [qs[i % len(qs)] for i in range(n)], max_new_tokens,
                                 device=device)
    return replies


def evaluate_language(model_dir: Path, dataset: Dataset, device: str = "cpu", max_images: int | None = None,
                      max_new_tokens: int = 48, ablation: bool = True, examples: int = 4) -> dict:
    """Evaluate `model_dir`'s language part on `dataset`'s test split; returns a JSON-able summary."""
    t0 = time.monotonic()
    dev = resolve_device(device)
    defect_model, calibration, _ = load_model_dir(model_dir)
    part: LanguagePart = load_language(model_dir, dev)
    digest = part.meta.get("defect_model_sha256")
    if digest and digest != file_digest(Path(model_dir) / WEIGHTS):
        raise LineInspectError(
            f"{model_dir}: the language part was trained on other defect-model weights than {WEIGHTS}; "
            "retrain the language stages (--stages 1,2,3)"
        )
    items = cap.test_images(dataset)
    if not items:
        raise LineInspectError(f"{dataset.root}: no test images to evaluate the language part on")
    if max_images is not None and len(items) > max_images:
        pick = np.random.default_rng(0).choice(len(items), max_images, replace=False)
        items = [items[i] for i in sorted(pick)]
    labels = [it.label for it in items]
    type_names = part.meta.get("data", {}).get("types") or sorted({lb.type for lb in labels if not lb.is_good})
    unknown = sorted({lb.type for lb in labels if not lb.is_good} - set(type_names))
    if unknown:
        raise LineInspectError(
            f"{dataset.root}: test types {unknown} were never trained on (trained: {type_names}); "
            "evaluate on data of the same line"
        )
    config = part.model.config.evidence
    evidence = encode_images(defect_model, [it.load() for it in items], config, dev, desc=None,
                             calibration=calibration)
    model = part.model.to(dev).eval()
    result: dict = {"model": str(model_dir), "data": str(dataset.root), "n_images": len(items),
                    "types": list(type_names), "chance_type_accuracy": round(cap.chance_level(labels), 4)}
    replies = {}
    for split in cap.SPLITS:
        replies[split] = ask_all(model, part.tokenizer, evidence, len(items), split, dev, max_new_tokens)
        result[split] = score(labels, replies[split], type_names)
    if ablation:
        closed = closed_gates(model)
        shut = ask_all(closed, part.tokenizer, evidence, len(items), "train", dev, max_new_tokens)
        result["gates_closed"] = score(labels, shut, type_names)
    result["examples"] = [
        {"label": lb.type, "locations": list(lb.locations), **{k: replies["train"][k][i] for k in cap.INTENTS}}
        for i, lb in enumerate(labels[:examples])
    ]
    targets = dict(TARGETS)
    if not part.meta.get("data", {}).get("synthetic", False):
        targets["type_accuracy"] = NEU_TYPE_TARGET
    result["targets"] = {k: {"target": v, "value": result["train"][k],
                             "met": result["train"][k] is not None and result["train"][k] >= v}
                         for k, v in targets.items()}
    result["seconds"] = round(time.monotonic() - t0, 1)
    return result
