"""`lineinspect distill`: train a (smaller) student model on a line, guided by a trained teacher model."""

from __future__ import annotations

import argparse
from pathlib import Path

from lineinspect.errors import LineInspectError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill", help="train a student model that also matches a trained teacher's outputs",
        description="Train a defect model as `lineinspect train` does (synthetic defects pasted on the line's good "
        "images, memory bank, calibration), adding to its loss the KL between its mask, image and class outputs "
        "and the teacher's on the same images. Writes a normal model directory.",
    )
    p.add_argument("--teacher", required=True, type=Path, metavar="MODEL_DIR", help="trained teacher model directory")
    p.add_argument("--data", required=True, type=Path, help="the line's data set (as for train)")
    p.add_argument("--preset", default="s14", choices=("tiny", "s14", "l14"), help="student preset (default s14)")
    p.add_argument("--out", required=True, type=Path, metavar="MODEL_DIR", help="student model directory to write")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="wall-clock budget for the whole run; each phase ends cleanly inside it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="optimisation steps (default per preset)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--img-size", type=int, default=None, help="student input size override (multiple of the patch)")
    p.add_argument("--distill-weight", type=float, default=1.0,
                   help="weight of the distillation terms against the supervised loss (default 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lineinspect.training.datasets import open_dataset
    from lineinspect.training.distill import DistillTrainer
    from lineinspect.training.train_defect import TrainConfig

    if args.out.exists() and any(args.out.iterdir()):
        raise LineInspectError(f"{args.out}: exists and is not empty; choose a new --out")
    dataset = open_dataset(args.data)
    config = TrainConfig(preset=args.preset, img_size=args.img_size, device=args.device, seed=args.seed,
                         time_budget=args.time_budget, steps=args.steps, batch_size=args.batch_size)
    DistillTrainer(config, dataset, args.out, args.teacher, weight=args.distill_weight).run()
    return 0
