"""`lineinspect train`: train a defect model from scratch (or from a local pretrained encoder), and,
with --stages, the language part's three stages after it."""

from __future__ import annotations

import argparse
import sys
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
    p.add_argument("--paste-types", default="all", type=parse_paste_types,
                   help="named synthetic defect renderings pasted on good images besides the generic ones: "
                   "all (default), none, or a comma list of scratch, crack, hole, stain, missing, dent, contamination")
    p.add_argument("--ssl-fraction", type=float, default=None,
                   help="share of the training for masked patch reconstruction (default per preset)")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="SHARE",
                   help="share of the good training images held out to choose the score source and threshold "
                   "(default 0.1, at most 0.5): the threshold is set on these good parts, so a line with few of "
                   "them gets a rough false-reject rate; more of them estimate it better and leave fewer to train on")
    p.add_argument("--target-frr", type=float, default=None,
                   help="pick the threshold for this false-reject rate on good validation images (e.g. 0.01)")
    p.add_argument("--pretrained", type=Path, default=None,
                   help="local ViT checkpoint (timm, OpenAI CLIP or OpenCLIP layout) to start the encoder from")
    p.add_argument("--pretrained-act", choices=("gelu", "quick_gelu"), default=None,
                   help="activation of the --pretrained weights when the file cannot tell (LAION CLIP: gelu)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto (default): bf16 autocast on GPUs and on CPUs with native bf16 (AVX512-BF16/AMX), "
                   "about twice the training steps per second there; fp32 elsewhere")
    p.add_argument("--name-pasted-kinds", action="store_true",
                   help="experimental: a line without class labels learns to name defects after the pasted kinds "
                        "(a quarter of --time-budget trains the crop namer, training.namer_phase)")
    p.add_argument("--namer-seconds", type=float, default=None, metavar="SECONDS",
                   help="with --name-pasted-kinds: seconds of --time-budget for the namer phase (default: a quarter "
                   "of it); the namer is step-bound on a CPU: s14 named two held-out lines 0.943 / 0.920 right with "
                   "300 s, 0.954 / 0.966 with 600 s")
    p.add_argument("--peak-loss", type=float, default=0.0, metavar="WEIGHT",
                   help="weight of the loss on the smoothed map's peak (the map score) on good images: their strongest "
                   "false spot (default 0 = off; measured on two held-out lines in bench/RESULTS.md, session 16)")
    p.add_argument("--dihedral-jitter", action="store_true",
                   help="flip and quarter-turn each training image with its mask (the 8 symmetries of the square), for "
                   "surfaces with no fixed orientation: their own features (turning centres) are seen in new places "
                   "(synthetic metal recipe, threshold set for 4%% false rejects on each held-out line's own good "
                   "parts: defects missed 30 / 4 of 175 -> 1 / 0, bench/RESULTS.md session 22); leave off where the "
                   "camera's geometry is part of normal")
    p.add_argument("--streak-share", type=float, default=0.0, metavar="SHARE",
                   help="share of the generic synthetic defects drawn as faint soft streaks along the surface's own "
                   "direction (rolled, drawn or brushed surfaces; default 0)")
    p.add_argument("--score-source", choices=("auto", "head", "fused"), default="auto",
                   help="the image score the model serves: 'head' (the learned head alone) or 'fused' (head, memory "
                   "bank, self-similarity and region statistics; on real steel with unseen defects 0.10 higher mean "
                   "image AUROC, and ~10 ms a frame on a 2-core CPU for s14 at 168 px); auto (default): "
                   "fused on lines validated on synthetic defects alone, head where real labelled defects validate it, "
                   "unless the validation set shows another source clearly better")
    p.add_argument("--map-source", choices=("auto", "head", "fused"), default="auto",
                   help="the heatmap the model serves and cuts boxes from: 'head' (the learned head's) or 'fused' (its "
                   "geometric mean with the memory bank's and region statistics' maps; real steel with unseen "
                   "defects: pixel AUROC 0.77-0.83 against 0.62-0.70; a line whose defects the synthetic ones "
                   "imitate: up to 0.02 lower); auto (default): fused where the served score is")
    p.add_argument("--render-workers", type=int, default=None, metavar="N",
                   help="processes painting the pasted named defects (default: on a GPU host all cores but two, up "
                   "to 8; none on a CPU, whose cores train the model)")
    p.add_argument("--namer-regions", choices=("auto", "model", "mask"), default="auto",
                   help="with --name-pasted-kinds: cut the namer's training crops where the trained model's map "
                        "finds each pasted defect (model), or around its jittered mask (mask); auto: model on GPUs, "
                        "mask on CPUs, where the model's forward would cost the namer half its examples")
    p.add_argument("--no-bandpass", dest="bandpass", action="store_false",
                   help="ablation: the head does without the image's Laplacian-pyramid bands (vision.bandpass)")
    p.add_argument("--no-ridges", dest="ridges", action="store_false",
                   help="ablation: the head does without the oriented thin-line filters (vision.ridges)")
    p.add_argument("--chroma", choices=("auto", "pixel", "image", "off"), default="auto",
                   help="where the head reads each cell's colour deviation from the part's own hue (vision.chroma): "
                   "'pixel' = into the map's decoder, 'image' = its peak into the image score only, 'off' = not at "
                   "all (the ablation); 'auto' (default) = pixel, or image with --paste-types none")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--stages", default="defect", type=parse_stages,
                   help='what to train: "defect" (default), "1,2,3" (the language stages, on the defect model '
                   'already in --out) or "defect,1,2,3"')
    p.add_argument("--language-preset", default="tiny", choices=("tiny", "l14"),
                   help="decoder + resampler size for the language stages (tiny for CPUs)")
    p.add_argument("--language-time-budget", type=float, default=None, metavar="SECONDS",
                   help="wall-clock budget for the language stages together")
    p.add_argument("--captions", type=Path, default=None,
                   help='JSON lines {"image": path, "text": caption} added to the language training data')
    p.set_defaults(func=run)


def parse_paste_types(value: str) -> tuple[str, ...]:
    from lineinspect.training.defects import DEFECT_TYPES

    if value == "all":
        return DEFECT_TYPES
    kinds = tuple(v.strip() for v in value.split(",") if v.strip() and v.strip() != "none")
    unknown = [k for k in kinds if k not in DEFECT_TYPES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown defect type(s) {unknown}; use all, none or a comma list of "
                                         f"{', '.join(DEFECT_TYPES)}")
    return kinds


def parse_stages(value: str) -> tuple[str, ...]:
    """ "defect,1,2,3" -> ("defect", "1", "2", "3"); the order of training is fixed."""
    parts = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in parts if v not in ("defect", "1", "2", "3")]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"{value!r}: use a comma list of defect, 1, 2, 3 (e.g. defect,1,2,3)")
    return tuple(sorted(set(parts), key=("defect", "1", "2", "3").index))


def run(args: argparse.Namespace) -> int:
    from lineinspect.training.datasets import open_dataset

    language = [int(s) for s in args.stages if s != "defect"]
    if "defect" in args.stages:
        if args.out.exists() and any(args.out.iterdir()) and not args.resume:
            raise LineInspectError(f"{args.out}: exists and is not empty; pass --resume to continue its training "
                                   "or choose a new --out")
    elif not (args.out / "config.json").is_file():
        raise LineInspectError(f"{args.out}: no defect model here (config.json); the language stages read it, "
                               "so train it first (--stages defect,1,2,3)")
    dataset = open_dataset(args.data)
    if "defect" in args.stages:
        train_defect(args, dataset)
    if language:
        from lineinspect.training.train_language import LanguageTrainConfig, train_language

        config = LanguageTrainConfig(preset=args.language_preset, device=args.device, seed=args.seed,
                                     time_budget=args.language_time_budget)
        train_language(args.out, dataset, config, args.captions, language, resume=args.resume)
    return 0


def train_defect(args: argparse.Namespace, dataset) -> None:
    from lineinspect.training.train_defect import TrainConfig, Trainer

    config = TrainConfig(
        preset=args.preset, img_size=args.img_size, device=args.device, seed=args.seed,
        time_budget=args.time_budget, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        paste_types=args.paste_types, ssl_fraction=args.ssl_fraction, target_frr=args.target_frr,
        pretrained=str(args.pretrained) if args.pretrained else None, pretrained_act=args.pretrained_act,
        precision=args.precision, name_pasted_kinds=args.name_pasted_kinds, bandpass=args.bandpass,
        ridges=args.ridges, chroma=args.chroma, namer_regions=args.namer_regions,
        namer_seconds=args.namer_seconds, val_fraction=args.val_fraction, peak_loss=args.peak_loss,
        score_source=args.score_source, map_source=args.map_source,
        render_workers=args.render_workers, dihedral=args.dihedral_jitter, streak_share=args.streak_share,
    )
    out = Trainer(config, dataset, args.out, resume=args.resume).run()
    warn_if_threshold_rejects_goods(out)


# Above this share of held-out good images flagged, the threshold from synthetic defects is not one a line can
# run with: on the real-steel patches line 15 of 29 held-out goods were flagged and then 31 of its 48 test goods.
FLAGGED_GOODS_WARNING = 0.2


def warn_if_threshold_rejects_goods(model_dir: Path) -> None:
    from lineinspect.vision.model_io import read_model_config

    notes = read_model_config(model_dir)["calibration"].get("notes", {})
    flagged = notes.get("val_goods_flagged")
    if flagged is not None and flagged > FLAGGED_GOODS_WARNING and "val_f1" in notes:
        print(f"lineinspect: warning: the threshold, set where validation F1 peaks, flags {flagged:.0%} of the "
              "held-out good images: this line's goods and the synthetic defects overlap. Before production, set it "
              "from good parts: `lineinspect calibrate --model MODEL --good DIR --target-frr 0.02`, or train with "
              "`--target-frr`.", file=sys.stderr)
