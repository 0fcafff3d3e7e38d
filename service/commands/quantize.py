"""`lineinspect quantize`: a model directory with symmetric int8 encoder linears, for CPUs."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING

from lineinspect.errors import LineInspectError

if TYPE_CHECKING:
    from lineinspect.vision.inspector import Inspector

MAX_CHECK_IMAGES = 200


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize", help="int8-quantise a model's encoder linear layers (CPU inference)",
        description="Quantise the weights of the encoder's linear layers to int8, symmetric per output channel "
        "(the head's few linears act on one vector per image and stay float). Activations are quantised per call, "
        "so nothing needs calibrating; the calibration (threshold, score source) is kept. Prints one JSON line.",
    )
    p.add_argument("--model", required=True, type=Path, metavar="MODEL_DIR", help="float model directory")
    p.add_argument("--out", required=True, type=Path, metavar="OUT_DIR", help="quantised model directory to write")
    p.add_argument("--calibration-data", type=Path, default=None, metavar="DIR",
                   help="data set whose test split (else its validation hold-out) is run through both models "
                   f"to report how far scores, verdicts and maps move (at most {MAX_CHECK_IMAGES} images)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lineinspect.vision.int8 import SCHEME, quantize_linears
    from lineinspect.vision.model_io import WEIGHTS, load_model_dir, save_model_dir

    if args.out.resolve() == args.model.resolve():
        raise LineInspectError(f"--out {args.out}: is the input model; write the quantised model to another folder")
    model, calibration, config = load_model_dir(args.model)
    if "quantization" in config:
        raise LineInspectError(f"{args.model}: is already quantised ({config['quantization']['scheme']})")
    reference = None
    if args.calibration_data is not None:
        from lineinspect.vision.inspector import Inspector

        reference = Inspector(copy.deepcopy(model), calibration, precision="fp32")
    layers = quantize_linears(model)
    # The language part, if any, is tied to the float weights by their digest: it is not carried over.
    keep = {k: v for k, v in config.items() if k not in ("format", "format_version", "lineinspect_version",
                                                         "model", "calibration", "quantization")}
    save_model_dir(args.out, model, calibration, {**keep, "quantized_from": str(args.model)})
    report = {"model": str(args.out), "scheme": SCHEME, "layers": len(layers),
              "weights_mb": {"before": round((args.model / WEIGHTS).stat().st_size / 2**20, 2),
                             "after": round((args.out / WEIGHTS).stat().st_size / 2**20, 2)}}
    if reference is not None:
        report["check"] = check(reference, args.out, args.calibration_data)
    print(json.dumps(report))
    return 0


def check(reference: Inspector, quantized_dir: Path, data: Path) -> dict:
    """The float model (fp32) and the quantised one on the data's held-out images (see compare_models)."""
    from lineinspect.training.data_cache import validation_split
    from lineinspect.training.datasets import open_dataset
    from lineinspect.training.evaluate import compare_models
    from lineinspect.vision.model_io import load_inspector

    dataset = open_dataset(data)
    samples = dataset.test or [dataset.train[i] for i in validation_split(dataset.train, 0.1)[1]]
    if not samples:
        raise LineInspectError(f"--calibration-data {data}: no held-out images (test split or validation hold-out)")
    candidate = load_inspector(quantized_dir)
    return {"data": str(data), **compare_models(reference, candidate, samples[:MAX_CHECK_IMAGES])}
