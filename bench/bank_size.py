"""Image AUROC of a trained model's memory-bank and fused scores with its bank refitted at smaller sizes.

The bank's nearest-neighbour product is what the memory and fused scores cost a CPU frame, and its
cost grows with the rows kept; this shows what fewer rows give up. The descriptors of the data set's
training good images (less the validation split) are recomputed, the greedy coreset is taken at the
bank's size, half and a quarter, and the test split scored each time with the model's calibration.

    python bench/bank_size.py MODEL_DIR DATA_DIR
"""

from __future__ import annotations

import argparse
import json

import cv2
import numpy as np
import torch

from lineinspect.images import read_image
from lineinspect.training.data_cache import validation_split
from lineinspect.training.datasets import open_dataset
from lineinspect.training.metrics import image_auroc
from lineinspect.training.recalibrate import score_sources
from lineinspect.vision.memory_bank import greedy_coreset
from lineinspect.vision.model_io import load_inspector


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("data")
    args = ap.parse_args()
    inspector = load_inspector(args.model, "cpu", cuda_graphs=False, precision="fp32")
    model, dataset = inspector.model, open_dataset(args.data)
    train_idx, _ = validation_split(dataset.train, 0.1)
    side = model.config.encoder.img_size
    goods = [cv2.resize(read_image(dataset.train[i].path), (side, side), interpolation=cv2.INTER_AREA)
             for i in train_idx if not dataset.train[i].is_defect]
    x = torch.from_numpy(np.stack(goods)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        descriptors = torch.cat([model.descriptors(chunk)[0].flatten(0, 1) for chunk in x.split(32)])
    paths = [s.path for s in dataset.test]
    labels = np.array([s.is_defect for s in dataset.test])
    rows = model.memory.bank.shape[0]
    figures = {}
    for size in (rows, rows // 2, rows // 4):
        model.memory.bank = descriptors[greedy_coreset(descriptors, size, seed=0)].clone()
        scores = score_sources(inspector, paths)
        figures[size] = {name: round(image_auroc(scores[name], labels), 4) for name in ("memory", "fused")}
    print(json.dumps({"model": args.model, "data": args.data, "n_descriptors": len(descriptors), "auroc": figures}))


if __name__ == "__main__":
    main()
