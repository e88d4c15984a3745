#!/usr/bin/env python3
"""Golden outputs of Meta's PyTorch SamPredictor for a random-weight model made by export_sam.py.

    python models/tools/make_goldens.py --model models/vit_b_reduced --out tests/data/reference/vit_b_reduced

The Sam is rebuilt from the manifest ("random, seed N") with export_sam.build_sam, exactly as the
exporter built it. Before anything is written, the tool checks that the committed ONNX files are this
model: it re-exports encoder/decoder to a temporary directory and compares sha256 sums with the
manifest (bit-identical re-export), and -- independently -- runs the committed encoder.onnx /
decoder.onnx with onnxruntime on every golden input and asserts they match PyTorch.

Writes into --out:
  goldens.json             everything below, paths relative to tests/data/
  <image>.embedding.f32    predictor.features of the first image, f32 little-endian [1,256,64,64]
  lowres.f32               low-res mask logits (tokens 1..3, [3,256,256] f32 LE per prompt), concatenated
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import export_sam as E  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests/data"

# Prompts in original-image pixel coordinates: points [x, y, label], box [x0, y0, x1, y1].
IMAGES = [
    ("images/grace_hopper.jpg", [
        ("point_face", [[264, 240, 1]], None),
        ("box_cap", [], [146, 21, 373, 176]),
        ("fg_face_bg_flag", [[264, 240, 1], [47, 176, 0]], None),
    ]),
    ("images/rocket.jpg", [
        ("point_rocket", [[321, 275, 1]], None),
        ("box_left_tower", [], [166, 119, 210, 412]),
        ("fg_rocket_bg_sky", [[321, 275, 1], [250, 125, 0]], None),
    ]),
]
EMBEDDING_SAVED_FOR = "images/grace_hopper.jpg"
ENCODER_TOL = 1e-4  # max abs, ORT vs torch, embedding values of magnitude ~5
DECODER_TOL = 1e-4


def f32le(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype="<f4").tobytes()


def rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")}


def decoder_inputs(predictor, points, box):
    """What Meta's PromptEncoder sees, in decoder.onnx's input convention (SamOnnxModel): points
    transformed with apply_coords; a box becomes two points labelled 2, 3 appended after the points;
    with no box a padding point (0, 0) labelled -1 is appended."""
    coords, labels = [], []
    if points:
        p = np.array([[x, y] for x, y, _ in points], dtype=np.float64)
        coords.append(predictor.transform.apply_coords(p, predictor.original_size))
        labels.append(np.array([l for _, _, l in points], dtype=np.float64))
    if box is not None:
        b = predictor.transform.apply_boxes(np.array(box, dtype=np.float64), predictor.original_size)
        coords.append(b.reshape(2, 2))
        labels.append(np.array([2, 3], dtype=np.float64))
    else:
        coords.append(np.zeros((1, 2)))
        labels.append(np.array([-1.0]))
    return np.concatenate(coords)[None].astype(np.float32), np.concatenate(labels)[None].astype(np.float32)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    from segment_anything import SamPredictor

    manifest = json.loads((args.model / "manifest.json").read_text())
    weights = manifest["weights"]
    if not weights.startswith("random, seed "):
        sys.exit("make_goldens.py: only random-weight models (manifest weights 'random, seed N')")
    seed = int(weights.split()[-1])
    torch.manual_seed(seed)
    sam, w = E.build_sam(manifest["architecture"], None, seed)
    assert w == weights

    # 1. Bit-identical re-export.
    reexport = {}
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        E.export_encoder(sam, tmp / "encoder.onnx", manifest["exported_by"]["opset"])
        E.export_decoder(sam, tmp / "decoder.onnx", manifest["exported_by"]["opset"])
        for part in ("encoder", "decoder"):
            got = E.sha256_file(tmp / f"{part}.onnx")
            reexport[part] = got == manifest[part]["sha256"]
    for part in ("encoder", "decoder"):
        assert E.sha256_file(args.model / manifest[part]["file"]) == manifest[part]["sha256"], part

    enc = E.ort_session(args.model / manifest["encoder"]["file"])
    dec = E.ort_session(args.model / manifest["decoder"]["file"])
    int8 = [v for v in manifest["encoder_variants"] if v["precision"] == "int8-dynamic"]
    enc8 = E.ort_session(args.model / int8[0]["file"]) if int8 else None

    predictor = SamPredictor(sam)
    args.out.mkdir(parents=True, exist_ok=True)
    rel_out = args.out.resolve().relative_to(DATA.resolve())
    lowres_path = args.out / "lowres.f32"
    lowres = bytearray()
    images = []
    worst = {"encoder_ort_vs_torch_max_abs": 0.0, "decoder_lowres_ort_vs_torch_max_abs": 0.0,
             "decoder_iou_ort_vs_torch_max_abs": 0.0}
    for rel, prompts in IMAGES:
        image = np.array(Image.open(DATA / rel).convert("RGB"))
        with torch.no_grad():
            predictor.set_image(image)
        feats = predictor.features.detach().numpy().astype(np.float32)
        x = sam.preprocess(torch.as_tensor(predictor.transform.apply_image(image))
                           .permute(2, 0, 1).contiguous()[None].float()).numpy()
        ort_feats = enc.run(["image_embeddings"], {"image": x})[0]
        e = E.errors(feats, ort_feats)
        assert e["max_abs"] < ENCODER_TOL, e
        worst["encoder_ort_vs_torch_max_abs"] = max(worst["encoder_ort_vs_torch_max_abs"], e["max_abs"])
        entry = {
            "file": rel,
            "width": int(image.shape[1]),
            "height": int(image.shape[0]),
            "input_size": [int(v) for v in predictor.input_size],  # [h, w] after ResizeLongestSide
            "embedding_stats": {
                "sum": float(feats.astype(np.float64).sum()),
                "mean_abs": float(np.abs(feats.astype(np.float64)).mean()),
                "first64": [float(v) for v in feats.reshape(-1)[:64]],
            },
            "encoder_ort_vs_torch": e,
            "embedding": None,
        }
        if enc8 is not None:
            q = enc8.run(["image_embeddings"], {"image": x})[0]
            entry["int8_encoder_ort"] = {
                "cosine_vs_torch_fp32": E.cosine(feats, q),
                "sum": float(q.astype(np.float64).sum()),
                "mean_abs": float(np.abs(q.astype(np.float64)).mean()),
                "first64": [float(v) for v in q.reshape(-1)[:64]],
            }
        if rel == EMBEDDING_SAVED_FOR:
            name = Path(rel).stem + ".embedding.f32"
            (args.out / name).write_bytes(f32le(feats))
            entry["embedding"] = {"file": str(rel_out / name), "shape": [1, 256, 64, 64], "dtype": "f32le"}

        entry["prompts"] = []
        for pname, points, box in prompts:
            pc = np.array([[x_, y_] for x_, y_, _ in points], dtype=np.float64) if points else None
            pl = np.array([l for _, _, l in points], dtype=np.int64) if points else None
            bx = np.array(box, dtype=np.float64) if box is not None else None
            with torch.no_grad():
                masks, ious, low = predictor.predict(point_coords=pc, point_labels=pl, box=bx,
                                                     multimask_output=True, return_logits=True)
            assert masks.shape == (3, image.shape[0], image.shape[1]) and low.shape == (3, 256, 256)
            low = low.astype(np.float32)
            # Same prompt through the committed decoder.onnx (all 4 tokens; Meta returns tokens 1..3).
            coords, labels = decoder_inputs(predictor, points, box)
            ort_low, ort_iou = dec.run(E.DECODER_OUTPUTS, {
                "image_embeddings": feats, "point_coords": coords, "point_labels": labels,
                "mask_input": np.zeros((1, 1, 256, 256), np.float32),
                "has_mask_input": np.zeros(1, np.float32)})
            dl = E.errors(low, ort_low[0, 1:])
            di = E.errors(ious.astype(np.float32), ort_iou[0, 1:])
            assert dl["max_abs"] < DECODER_TOL and di["max_abs"] < DECODER_TOL, (pname, dl, di)
            worst["decoder_lowres_ort_vs_torch_max_abs"] = max(worst["decoder_lowres_ort_vs_torch_max_abs"], dl["max_abs"])
            worst["decoder_iou_ort_vs_torch_max_abs"] = max(worst["decoder_iou_ort_vs_torch_max_abs"], di["max_abs"])
            binm = masks > sam.mask_threshold
            offset = len(lowres) // 4
            lowres += f32le(low)
            entry["prompts"].append({
                "name": pname,
                "points": points,
                "box": box,
                "decoder_point_coords": coords[0].tolist(),
                "decoder_point_labels": labels[0].tolist(),
                "iou_predictions": [float(v) for v in ious],
                "masks_rle": [rle(m) for m in binm],
                "mask_areas": [int(m.sum()) for m in binm],
                # random weights give speckled masks with small logits: how many pixels of each mask sit
                # within eps of the threshold (a bound on the pixels an f32 reimplementation may flip)
                "pixels_near_threshold": {k: [int((np.abs(m) < eps).sum()) for m in masks]
                                          for k, eps in (("1e-3", 1e-3), ("1e-4", 1e-4), ("1e-5", 1e-5))},
                "low_res": {"file": str(rel_out / "lowres.f32"), "offset": offset, "len": int(low.size),
                            "offset_bytes": offset * 4, "shape": [3, 256, 256], "dtype": "f32le"},
                "token0_from_onnx": {"iou": float(ort_iou[0, 0])},
                "decoder_ort_vs_torch": {"low_res_max_abs": dl["max_abs"], "iou_max_abs": di["max_abs"]},
            })
        images.append(entry)
    lowres_path.write_bytes(bytes(lowres))

    goldens = {
        "generator": "models/tools/make_goldens.py",
        "model": {
            "dir": str(args.model.resolve().relative_to(REPO)),
            "architecture": manifest["architecture"],
            "weights": weights,
            "state_dict_sha256": E.state_dict_sha256(sam),
            "encoder_sha256": manifest["encoder"]["sha256"],
            "decoder_sha256": manifest["decoder"]["sha256"],
            "encoder_variants": manifest["encoder_variants"],
            "onnx_reexport_bit_identical": reexport,
        },
        "versions": {k: version(k) for k in ("torch", "torchvision", "segment_anything", "onnx", "onnxruntime",
                                             "numpy", "pillow", "pycocotools")},
        "pipeline": {
            "reference": "segment_anything.SamPredictor (PyTorch, CPU, float32)",
            "image_loading": "PIL.Image.open(path).convert('RGB') -> numpy HWC uint8 (no EXIF transpose)",
            "set_image": "predictor.set_image(image) (RGB): ResizeLongestSide(1024).apply_image, "
                         "(x - pixel_mean) / pixel_std, bottom/right zero pad to 1024x1024",
            "predict": "predictor.predict(point_coords, point_labels, box, multimask_output=True, "
                       "return_logits=True)",
            "multimask": "Meta returns mask tokens 1..3 in token order (NOT sorted by IoU); decoder.onnx "
                         "outputs tokens 0..3, so tokens 1..3 of it correspond to these",
            "masks": "masks_rle = COCO compressed RLE (column-major, pycocotools.mask.encode) of "
                     "upscaled logits > 0.0 at the original image size",
            "low_res": "the 3 low-res logits [3,256,256] f32 LE; offset/len in f32 elements",
            "decoder_inputs": "decoder_point_coords/labels = what decoder.onnx is fed to reproduce the prompt: "
                              "apply_coords/apply_boxes to the 1024 frame, box -> 2 points labelled 2,3 "
                              "(after the points), padding point (0,0) label -1 iff no box",
            "random_weights_note": "random weights: masks and IoUs are meaningless but deterministic",
        },
        "tolerances_used_here": {"encoder_max_abs": ENCODER_TOL, "decoder_max_abs": DECODER_TOL},
        "worst_ort_vs_torch": worst,
        "images": images,
    }
    (args.out / "goldens.json").write_text(json.dumps(goldens, indent=1) + "\n")
    print(json.dumps({"reexport_bit_identical": reexport, "worst": worst,
                      "files": {f.name: f.stat().st_size for f in sorted(args.out.iterdir())}}, indent=1))


if __name__ == "__main__":
    main()
