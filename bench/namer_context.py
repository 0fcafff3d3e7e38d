"""Would the crop namer name a held-out line better with more context at inference? Names each
labelled defect from crops around several regions of the model's map (the peak's component at 0.35,
0.5 and 0.65 of the peak, everything above half the peak) and around the true mask, each with the
crop's margin at 0.3 (the trained one), 0.6 and 1.0, and from pairs whose class probabilities are
averaged.

    python bench/namer_context.py MODEL_DIR DATA_DIR

Prints one JSON object: accuracy per variant.
"""

from __future__ import annotations

import itertools
import json
import sys

import torch
from held_out_defects import labelled_batches

import lineinspect.vision.crop_namer as crop_namer
from lineinspect.vision.heads import focus_region
from lineinspect.vision.model_io import load_model_dir
from lineinspect.vision.precision import autocast, autocast_dtype

MARGINS = (0.3, 0.6, 1.0)
PAIRS = [("peak50_m0.3", other) for other in
         ("full50_m0.3", "peak50_m0.6", "peak50_m1.0", "full50_m0.6", "full50_m1.0", "peak35_m0.3")]


def regions(prob: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    peak = prob.flatten(1).amax(1).view(-1, 1, 1, 1)
    return {"peak50": focus_region(prob, 0.5), "peak35": focus_region(prob, 0.35), "peak65": focus_region(prob, 0.65),
            "full50": (prob >= 0.5 * peak).float(), "mask": masks}


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    model, cal, _ = load_model_dir(sys.argv[1])
    names, size, device = list(cal.class_names), model.config.encoder.img_size, torch.device("cpu")
    probs: dict[str, list[torch.Tensor]] = {}
    truth: list[int] = []
    trained_margin = crop_namer.MARGIN
    for batch, masks, classes in labelled_batches(sys.argv[2], names, size, device):
        truth += classes
        with torch.inference_mode(), autocast(device, autocast_dtype(device, "auto")):
            prob = torch.sigmoid(model.logits(batch).mask_logits.float())
            for (name, region), margin in itertools.product(regions(prob, masks).items(), MARGINS):
                crop_namer.MARGIN = margin
                logits = model.logits(batch, class_region=region).class_logits.float()
                probs.setdefault(f"{name}_m{margin}", []).append(logits.exp())
        crop_namer.MARGIN = trained_margin
    target = torch.tensor(truth)
    joined = {k: torch.cat(v) for k, v in probs.items()}
    result = {k: round(float((p.argmax(1) == target).float().mean()), 4) for k, p in joined.items()}
    for a, b in PAIRS:
        result[f"{a}+{b}"] = round(float(((joined[a] + joined[b]).argmax(1) == target).float().mean()), 4)
    print(json.dumps({"model": sys.argv[1], "data": sys.argv[2], "n_defects": len(truth), "accuracy": result}))


if __name__ == "__main__":
    main()
