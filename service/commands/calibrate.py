"""`lineinspect calibrate`: set a trained model's threshold from the line's own good parts."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate", help="set a model's threshold for a false-reject rate on a folder of good parts",
        description="Score every image in --good (a folder, searched recursively: good parts from the line) and "
        "set the model's image threshold so that at most --target-frr of them would be rejected. --defects (labelled "
        "defective parts) shows the recall at the old and the new threshold and chooses the score source that catches "
        "the most of them at that rate (--keep-source: not). The weights stay as they are; config.json keeps the "
        "figures under calibration.notes.recalibrated. Last stdout line: JSON.",
    )
    p.add_argument("--model", required=True, type=Path, metavar="MODEL_DIR")
    p.add_argument("--good", required=True, type=Path, metavar="DIR", help="folder of good parts' images")
    p.add_argument("--defects", type=Path, default=None, metavar="DIR", help="folder of defective parts' images")
    p.add_argument("--target-frr", type=float, default=0.01,
                   help="share of good parts the threshold may reject (default 0.01; resolvable from about "
                   "1 / target images on)")
    p.add_argument("--keep-source", action="store_true",
                   help="keep the model's score source even where the labelled defects favour another")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dry-run", action="store_true", help="print what would change, write nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lineinspect.errors import LineInspectError
    from lineinspect.service.frames import IMAGE_SUFFIXES, list_images
    from lineinspect.training.recalibrate import MIN_DEFECTS_TO_CHOOSE, recalibrate, write_threshold
    from lineinspect.vision.model_io import load_inspector

    def images(folder: Path, flag: str) -> list[Path]:
        if not folder.is_dir():
            raise LineInspectError(f"{folder}: {flag} needs a folder of images")
        files = list_images(folder, recursive=True)
        if not files:
            raise LineInspectError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in it or below it")
        return files

    good = images(args.good, "--good")
    defects = images(args.defects, "--defects") if args.defects else []
    seen = trained_on(args.model, good)
    if seen:
        print(f"note: {seen} of the {len(good)} good images lie in the model's own training data; the memory bank "
              "holds their patches, so they score lower than new good parts would, and the threshold will reject "
              "more new parts than asked: give calibrate good parts the model has not seen", file=sys.stderr)
    inspector = load_inspector(args.model, args.device)
    result = recalibrate(inspector, good, args.target_frr, defects, choose_source=not args.keep_source)
    if result.n_good * args.target_frr < 1:
        print(f"note: {result.n_good} good images cannot resolve a false-reject rate of {args.target_frr:g}; the "
              "threshold is set above all of them", file=sys.stderr)
    print(f"threshold {result.old_threshold:.4f} -> {result.new_threshold:.4f}: good parts rejected "
          f"{result.frr_at_old:.1%} -> {result.frr_at_new:.1%} of {result.n_good}", file=sys.stderr)
    if result.n_defect:
        for name, f in result.sources.items():
            print(f"  {name:8s} catches {f['recall']:.1%} at that rate, image AUROC {f['auroc']:.3f}", file=sys.stderr)
        if result.n_defect < MIN_DEFECTS_TO_CHOOSE and not args.keep_source:
            print(f"note: {result.n_defect} labelled defects are too few to choose the score source by (it takes "
                  f"{MIN_DEFECTS_TO_CHOOSE}); it stays {result.old_source}", file=sys.stderr)
        print(f"score source {result.old_source} -> {result.new_source}; defects caught {result.recall_at_old:.1%} -> "
              f"{result.recall_at_new:.1%} of {result.n_defect}", file=sys.stderr)
    if not args.dry_run:
        write_threshold(args.model, result)
        print(f"wrote {args.model / 'config.json'}", file=sys.stderr)
    print(json.dumps({**result.to_dict(), "n_good_from_training": seen, "written": not args.dry_run}))
    return 0


def trained_on(model_dir: Path, images: list[Path]) -> int:
    """How many of `images` lie under the `train` folder of the data the model was trained on."""
    from lineinspect.vision.model_io import read_model_config

    root = read_model_config(model_dir).get("data", {}).get("root")
    if not root:
        return 0
    train = (Path(root) / "train").resolve()
    return sum(p.resolve().is_relative_to(train) for p in images)
