"""Does the language evidence depend on where the fast path runs? One trained model directory, the
test split of one line, evidence tokens (`train_language.encode_images`) computed on the CPU (fp32)
and on a GPU (bf16) with the head's pixel branch beside the encoder (the default) and after it:

* the largest difference between the two GPU variants (a race between the streams would show here);
* how often the map's strongest cell of the 3x3 location grid is the same on the GPU as on the CPU;
* with ``--language``, eval-language's figures on the GPU with each variant (compare them with the
  same model's CPU figures).

    python bench/evidence_devices.py MODEL_DIR DATA [--language] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lineinspect.moe_lm.report_model import load_language
from lineinspect.training import captions as cap
from lineinspect.training.datasets import open_dataset
from lineinspect.training.evaluate_language import evaluate_language
from lineinspect.training.train_language import encode_images
from lineinspect.vision import defect_model as defect_model_module
from lineinspect.vision.model_io import load_model_dir


def set_overlap(on: bool) -> None:
    """Every DefectModel built from now on runs its pixel branch beside the encoder (or not)."""
    cls = defect_model_module.DefectModel
    init = getattr(cls, "_bench_original_init", cls.__init__)
    cls._bench_original_init = init

    def patched(self, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        self.overlap_pixel_branch = on

    cls.__init__ = patched


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--language", action="store_true", help="also run eval-language on the GPU, both variants")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    dataset = open_dataset(args.data)
    items = cap.test_images(dataset)
    images = [it.load() for it in items]
    config = load_language(args.model, torch.device("cpu")).model.config.evidence
    result: dict = {"model": str(args.model), "data": str(args.data), "n_images": len(images)}
    evidence = {}
    for name, device, overlap in (("cpu", "cpu", False), ("cuda_after", "cuda", False), ("cuda_beside", "cuda", True)):
        set_overlap(overlap)
        model, calibration, _ = load_model_dir(args.model)
        with torch.inference_mode():
            evidence[name] = encode_images(model, images, config, torch.device(device), desc=None,
                                           calibration=calibration).float()
    p = config.patch_dim
    g = config.grid
    cells = {}
    for name, ev in evidence.items():
        pooled_max = ev[:, :, p + 1].view(-1, 1, g, g)
        cells[name] = F.adaptive_max_pool2d(pooled_max, 3).flatten(1).argmax(1).numpy()
    defect = np.array([not it.label.is_good for it in items])
    result["max_abs_diff_beside_vs_after"] = float((evidence["cuda_beside"] - evidence["cuda_after"]).abs().max())
    result["max_abs_diff_cuda_vs_cpu"] = float((evidence["cuda_after"] - evidence["cpu"]).abs().max())
    result["strongest_cell_same_as_cpu"] = {
        name: float(np.mean(cells[name][defect] == cells["cpu"][defect])) for name in ("cuda_after", "cuda_beside")}
    if args.language:
        for name, overlap in (("cuda_after", False), ("cuda_beside", True)):
            set_overlap(overlap)
            summary = evaluate_language(args.model, dataset, device="cuda", examples=0)
            result[f"language_{name}"] = {k: summary[k] for k in ("train", "heldout", "gates_closed") if k in summary}
    line = json.dumps(result)
    print(line)
    if args.out:
        args.out.write_text(line + "\n")


if __name__ == "__main__":
    main()
