"""`lineinspect predict`: verdicts for image files, one JSON line each, overlays on request."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lineinspect.errors import LineInspectError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="inspect image files")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="one JSON object per line (default: short text)")
    p.add_argument("--heatmap-dir", type=Path, default=None, help="write <stem>_overlay.png per image here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lineinspect.images import encode_png, read_image
    from lineinspect.service.overlay import render_overlay
    from lineinspect.vision.model_io import load_inspector

    inspector = load_inspector(args.model, args.device)
    if args.heatmap_dir:
        args.heatmap_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in args.images:
        try:
            image = read_image(path)
        except LineInspectError as exc:
            failed += 1
            print(f"lineinspect: error: {exc}", file=sys.stderr)
            if args.json:
                print(json.dumps({"image": str(path), "error": str(exc)}))
            continue
        result = inspector.inspect_batch([image], heatmaps=bool(args.heatmap_dir))[0]
        row = {"image": str(path), **result.to_dict()}
        if args.heatmap_dir:
            text = f"{row['verdict']} {result.score:.3f} {result.defect_class}".strip()
            overlay = render_overlay(image, result.heatmap, result.boxes, text, defect=result.is_defect)
            target = args.heatmap_dir / f"{path.stem}_overlay.png"
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(encode_png(overlay))
            os.replace(tmp, target)
            row["overlay"] = str(target)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{path}: {row['verdict']} score={row['score']:.4f} class={row['defect_class'] or '-'} "
                  f"boxes={len(row['boxes'])}")
    return 2 if failed else 0
