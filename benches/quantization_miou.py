#!/usr/bin/env python3
"""Accuracy cost of a quantized encoder on real photographs: mask mIoU against labelme's
ground-truth instance masks (tests/data/reference/quality.json: one foreground point at the
instance's interior, and its box) and against the fp32 encoder's masks, with samrt on both.

    cargo build --release
    python3 benches/quantization_miou.py --model DIR --precision int8-dynamic

DIR must hold a manifest whose encoder_variants include the precision (models/tools/export_sam.py
--quantize int8-dynamic writes one). Needs numpy and pycocotools.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from pycocotools import mask as mask_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def masks(samrt, model, precision, image, prompts):
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
    out = subprocess.run([samrt, "segment", os.path.join(ROOT, "tests/data", image), "--prompts", f.name,
                          "--model", model, "--precision", precision, "--json"],
                         check=True, capture_output=True, text=True).stdout
    os.unlink(f.name)
    return [mask_utils.decode(r["masks"][0]["rle"]).astype(bool) for r in json.loads(out)["results"]]


def iou(a, b):
    union = (a | b).sum()
    return 1.0 if union == 0 else (a & b).sum() / union


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--precision", default="int8-dynamic")
    ap.add_argument("--samrt", default=os.path.join(ROOT, "target", "release", "samrt"))
    args = ap.parse_args()
    quality = json.load(open(os.path.join(ROOT, "tests/data/reference/quality.json")))
    by_image = {}
    for inst in quality["instances"]:
        by_image.setdefault(inst["image"], []).append(inst)
    rows = {"point": [], "box": []}
    for image, instances in by_image.items():
        prompts = [{"points": [[i["point"][0], i["point"][1], 1]]} for i in instances]
        prompts += [{"box": i["box"]} for i in instances]
        fp32 = masks(args.samrt, args.model, "fp32", image, prompts)
        quant = masks(args.samrt, args.model, args.precision, image, prompts)
        n = len(instances)
        for k, inst in enumerate(instances):
            gt = mask_utils.decode(inst["gt_rle"]).astype(bool)
            for kind, j in (("point", k), ("box", n + k)):
                rows[kind].append((iou(fp32[j], gt), iou(quant[j], gt), iou(quant[j], fp32[j])))
    print(f"model {args.model}, {args.precision} vs fp32, {len(quality['instances'])} instances\n")
    print("| prompt | mIoU vs GT, fp32 | mIoU vs GT, " + args.precision + " | change (points) | mIoU " + args.precision + " vs fp32 |")
    print("|---|---|---|---|---|")
    for kind, r in rows.items():
        a = np.array(r)
        print(f"| {kind} | {a[:, 0].mean():.4f} | {a[:, 1].mean():.4f} | {100 * (a[:, 1].mean() - a[:, 0].mean()):+.2f} | {a[:, 2].mean():.4f} |")


if __name__ == "__main__":
    sys.exit(main())
