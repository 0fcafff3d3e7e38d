"""Print the headline metrics of evals.jsonl lines ({"run": NAME, "result": eval JSON}) from bench/gpu_accuracy.sh."""

import json
import sys

HEADLINE = ("image_auroc", "pixel_auroc", "f1", "class_accuracy", "box_recall_iou03", "map50", "n_images")

for line in open(sys.argv[1]):
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        print("unreadable line:", line[:200])
        continue
    result = row["result"]
    print(row["run"], {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items() if k in HEADLINE})
    print("  per type (image, pixel):",
          {k: (v.get("image_auroc"), v.get("pixel_auroc")) for k, v in result.get("per_type", {}).items()})
