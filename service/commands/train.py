"""`lineinspect train`: train a defect model from scratch (or from a local pretrained encoder)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lineinspect.errors import LineInspectError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a defect model on a folder of line images")
    p.add_argument("--data", required=True, type=Path, help="MVTec-layout folder (train/good ...) or VOC folder")
    p.add_argument("--preset", default="tiny", choices=("tiny", "s14", "l14"))
    p.add_argument("--out", required=True, type=Path, help="model directory to write")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="wall-clock budget for the whole run; each phase ends cleanly inside it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="optimisation steps (default per preset)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--img-size", type=int, default=None, help="input size override (multiple of the patch)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--paste-types", default="", help="comma list of named synthetic defect types to paste too")
    p.add_argument("--target-frr", type=float, default=None,
                   help="pick the threshold for this false-reject rate on good validation images (e.g. 0.01)")
    p.add_argument("--pretrained", type=Path, default=None,
                   help="local ViT checkpoint (timm, OpenAI CLIP or OpenCLIP layout) to start the encoder from")
    p.add_argument("--pretrained-act", choices=("gelu", "quick_gelu"), default=None,
                   help="activation of the --pretrained weights when the file cannot tell (LAION CLIP: gelu)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lineinspect.training.datasets import open_dataset
    from lineinspect.training.train_defect import TrainConfig, Trainer

    if args.out.exists() and any(args.out.iterdir()) and not args.resume:
        raise LineInspectError(f"{args.out}: exists and is not empty; pass --resume to continue its training "
                               "or choose a new --out")
    dataset = open_dataset(args.data)
    config = TrainConfig(
        preset=args.preset, img_size=args.img_size, device=args.device, seed=args.seed,
        time_budget=args.time_budget, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        paste_types=tuple(t for t in args.paste_types.split(",") if t), target_frr=args.target_frr,
        pretrained=str(args.pretrained) if args.pretrained else None, pretrained_act=args.pretrained_act,
    )
    Trainer(config, dataset, args.out, resume=args.resume).run()
    return 0
