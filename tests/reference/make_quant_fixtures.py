#!/usr/bin/env python3
"""Generate tiny quantized ONNX graphs plus onnxruntime goldens for tract regression tests.

Writes into tests/data/quant/:

* ``qdq_softmax.onnx`` -- ``x`` f32[1,4,16,16] -> MatMul(const f32[16,16]) -> QuantizeLinear
  (uint8, per-tensor scale/zero-point initializers) -> DequantizeLinear -> Softmax(axis=-1) -> ``y``.
  The Q/DQ pair in front of Softmax is what onnxruntime's static QDQ quantization puts before
  attention softmax.
* ``qdq_softmax_qdq.onnx`` -- the same, plus QuantizeLinear(uint8, scale 1/255, zp 0) ->
  DequantizeLinear after the Softmax, i.e. the whole pattern ``quantize_static(QuantFormat.QDQ)``
  emits around Softmax (checked against onnxruntime 1.32: same activation scale/zero point,
  output scale 1/255, zero point 0). tract 0.23.9 turns DequantizeLinear -> Softmax ->
  QuantizeLinear into a 256-entry lookup table (DequantizeLinearF32::declutter treats Softmax's
  natural axes mapping as element-wise) and so outputs 1.0 everywhere.
* ``per_channel_matmul.onnx`` -- ``x`` f32[1,8,32] -> MatMul with the weight
  DequantizeLinear(int8 [32,24], scale f32[24], zero_point int8[24] = 0, axis=1) -> ``y`` f32[1,8,24].
* ``dynamic_int8_matmul.onnx`` -- float MatMul f32[1,8,32] x f32[32,24] quantized by
  ``onnxruntime.quantization.quantize_dynamic(weight_type=QInt8, per_channel=False,
  reduce_range=False, op_types_to_quantize=["MatMul"])`` (the options of
  models/tools/export_sam.py): DynamicQuantizeLinear + MatMulInteger + Cast + Mul.

and for each ``<name>.json``: {"input_shape", "input", "output_shape", "output" (onnxruntime CPU),
"float_reference" (same graph in float numpy, no quantization), "notes", ...}. All values are
float32 numbers written as JSON floats (shortest repr that round-trips to the same float32).

"output" is onnxruntime with graph optimizations OFF (ORT_DISABLE_ALL), i.e. each ONNX node run by
its own kernel = the ONNX semantics. With its default optimizations onnxruntime 1.32 rewrites two of
these graphs: DequantizeLinear(int8, axis=1) + MatMul -> com.microsoft.MatMulNBits (bits=8), which
also quantizes the float activations to int8 and so is off by up to ~0.16 here; and
DynamicQuantizeLinear+MatMulInteger+Cast+Mul -> com.microsoft.DynamicQuantizeMatMul (bit-identical
here). That default-optimization output is kept under "ort_default_optimizations" for context.

Inputs: ``np.random.default_rng(0).standard_normal(shape) * 2`` (float64, then cast to float32),
one fresh generator per fixture. Weights come from other fixed seeds (see below).

Run with the reference venv (onnx 1.23.2, onnxruntime 1.32.0, numpy 2.4.6):

    /opt/samref/bin/python tests/reference/make_quant_fixtures.py

Re-running reproduces every file byte for byte (checked: the script hashes its outputs and
``--check`` compares against what is on disk without writing).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "data" / "quant"
OPSET = 17  # what models/tools/export_sam.py exports with
IR_VERSION = 8


def seeded_input(shape) -> np.ndarray:
    return (np.random.default_rng(0).standard_normal(shape) * 2).astype(np.float32)


def make_model(graph: onnx.GraphProto) -> onnx.ModelProto:
    m = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="samrt tests/reference/make_quant_fixtures.py",
        producer_version="1",
    )
    m.ir_version = IR_VERSION
    onnx.checker.check_model(m, full_check=True)
    return m


def serialize(m: onnx.ModelProto) -> bytes:
    return m.SerializeToString(deterministic=True)


def run_ort(model_bytes: bytes, x: np.ndarray, optimize: bool) -> tuple[np.ndarray, list[str]]:
    """onnxruntime CPU, one thread. optimize=False: ORT_DISABLE_ALL (every ONNX node runs as its
    own reference kernel, i.e. the spec semantics); True: the session default (ORT_ENABLE_ALL).
    Returns the output and the op types of the graph as onnxruntime ran it."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    with tempfile.TemporaryDirectory() as td:
        so.optimized_model_filepath = str(Path(td) / "ran.onnx")
        sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
        ran = op_types(onnx.load(so.optimized_model_filepath))
    (y,) = sess.run(["y"], {"x": x})
    return y, ran


def softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def flat(a: np.ndarray) -> list[float]:
    return [float(v) for v in np.asarray(a, dtype=np.float32).reshape(-1)]


def op_types(m: onnx.ModelProto) -> list[str]:
    return [n.op_type if not n.domain else f"{n.domain}.{n.op_type}" for n in m.graph.node]


# --------------------------------------------------------------------------------------------
def qdq_softmax(quantize_output: bool = False):
    shape = [1, 4, 16, 16]
    x = seeded_input(shape)
    w = (np.random.default_rng(1).standard_normal((16, 16)) * 0.3).astype(np.float32)
    z = np.matmul(x, w)  # float32, used as "calibration" for the activation range
    # onnxruntime MinMax calibration, asymmetric uint8: range extended to include 0,
    # scale = (max - min) / 255, zero_point = round(-min / scale). Computed once here and
    # stored as float32 / uint8 initializers.
    lo, hi = min(float(z.min()), 0.0), max(float(z.max()), 0.0)
    scale = np.float32((hi - lo) / 255.0)
    zp = np.uint8(np.clip(round(-lo / float(scale)), 0, 255))

    # Softmax output Q/DQ as onnxruntime's static QDQ quantizer emits it: range fixed to [0, 1],
    # uint8 -> scale 1/255, zero point 0.
    p_scale = np.float32(1.0 / 255.0)
    name = "qdq_softmax_qdq" if quantize_output else "qdq_softmax"
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["logits"], name="matmul"),
        helper.make_node("QuantizeLinear", ["logits", "q_scale", "q_zero_point"], ["logits_q"], name="quant"),
        helper.make_node("DequantizeLinear", ["logits_q", "q_scale", "q_zero_point"], ["logits_dq"], name="dequant"),
        helper.make_node("Softmax", ["logits_dq"], ["probs" if quantize_output else "y"], name="softmax", axis=-1),
    ]
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.array(scale, dtype=np.float32), "q_scale"),
        numpy_helper.from_array(np.array(zp, dtype=np.uint8), "q_zero_point"),
    ]
    if quantize_output:
        nodes += [
            helper.make_node("QuantizeLinear", ["probs", "p_scale", "p_zero_point"], ["probs_q"], name="quant_out"),
            helper.make_node("DequantizeLinear", ["probs_q", "p_scale", "p_zero_point"], ["y"], name="dequant_out"),
        ]
        inits += [
            numpy_helper.from_array(np.array(p_scale, dtype=np.float32), "p_scale"),
            numpy_helper.from_array(np.array(0, dtype=np.uint8), "p_zero_point"),
        ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        initializer=inits,
    )
    m = make_model(graph)
    ref = softmax(z)
    # numpy emulation of Q/DQ (round half to even, saturate) for the notes
    q = np.clip(np.rint(z / scale) + int(zp), 0, 255)
    qdq_ref = softmax(((q - int(zp)) * scale).astype(np.float32))
    if quantize_output:
        qdq_ref = (np.clip(np.rint(qdq_ref / p_scale), 0, 255) * p_scale).astype(np.float32)
    extra = {
        "q_scale": float(scale),
        "q_zero_point": int(zp),
        "numpy_qdq_reference_max_abs_diff_vs_output": None,  # filled in by caller
        "_qdq_ref": qdq_ref,
    }
    notes = (
        "MatMul(x, w const f32[16,16]) -> QuantizeLinear(uint8, per-tensor scale/zero-point "
        "initializers; scale/zp from the min/max of this input's MatMul output, like onnxruntime "
        "MinMax calibration) -> DequantizeLinear -> Softmax(axis=-1)"
        + (
            " -> QuantizeLinear(uint8, scale 1/255, zero point 0: the fixed [0,1] range onnxruntime's "
            "static QDQ quantizer gives Softmax outputs) -> DequantizeLinear. This is the full "
            "pattern quantize_static(QuantFormat.QDQ) produces around Softmax. float_reference = "
            "softmax(x @ w) in numpy without any Q/DQ. Rows sum to ~1 (up to the 1/255 output "
            "step); a backend that folds DequantizeLinear -> Softmax -> QuantizeLinear into a "
            "per-element lookup table computes softmax of single elements, i.e. all 1.0."
            if quantize_output
            else ". float_reference = softmax(x @ w) in numpy without the Q/DQ pair. Each softmax "
            "row sums to 1 and is not all 1.0."
        )
    )
    if quantize_output:
        extra["p_scale"] = float(p_scale)
        extra["p_zero_point"] = 0
    return name, m, x, ref, notes, extra


def per_channel_matmul():
    shape = [1, 8, 32]
    x = seeded_input(shape)
    w = (np.random.default_rng(2).standard_normal((32, 24)) * 0.2).astype(np.float32)
    # distinct per-column magnitudes so per-tensor handling of the scale would be visibly wrong
    w *= np.linspace(0.25, 4.0, 24, dtype=np.float32)[None, :]
    scale = (np.abs(w).max(axis=0) / 127.0).astype(np.float32)  # [24], symmetric
    wq = np.clip(np.rint(w / scale[None, :]), -127, 127).astype(np.int8)
    zp = np.zeros(24, dtype=np.int8)

    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero_point"], ["w_dq"], name="dequant_w", axis=1),
        helper.make_node("MatMul", ["x", "w_dq"], ["y"], name="matmul"),
    ]
    graph = helper.make_graph(
        nodes,
        "per_channel_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 24])],
        initializer=[
            numpy_helper.from_array(wq, "w_q"),
            numpy_helper.from_array(scale, "w_scale"),
            numpy_helper.from_array(zp, "w_zero_point"),
        ],
    )
    m = make_model(graph)
    ref = np.matmul(x, w)
    wdq = (wq.astype(np.float32) * scale[None, :]).astype(np.float32)
    extra = {
        "_qdq_ref": np.matmul(x.astype(np.float64), wdq.astype(np.float64)).astype(np.float32),
        "numpy_qdq_reference_max_abs_diff_vs_output": None,
    }
    notes = (
        "MatMul(x, DequantizeLinear(w_q int8[32,24], w_scale f32[24], w_zero_point int8[24] zeros, "
        "axis=1)). Column scales span a 16x range, so treating the scale as per-tensor or along "
        "the wrong axis is visibly wrong. float_reference = x @ w with the original float weights "
        "(before int8 rounding)."
    )
    return "per_channel_matmul", m, x, ref, notes, extra


def dynamic_int8_matmul():
    from onnxruntime.quantization import QuantType, quantize_dynamic

    shape = [1, 8, 32]
    x = seeded_input(shape)
    w = (np.random.default_rng(3).standard_normal((32, 24)) * 0.2).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")],
        "dynamic_int8_matmul_float",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 24])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    fm = make_model(graph)
    with tempfile.TemporaryDirectory() as td:
        src, dst = Path(td) / "float.onnx", Path(td) / "int8.onnx"
        src.write_bytes(serialize(fm))
        quantize_dynamic(
            model_input=str(src),
            model_output=str(dst),
            weight_type=QuantType.QInt8,
            per_channel=False,
            reduce_range=False,
            op_types_to_quantize=["MatMul"],
        )
        m = onnx.load(str(dst))
    ref = np.matmul(x, w)
    extra = {"_qdq_ref": None}
    notes = (
        "Float MatMul(x f32[1,8,32], w f32[32,24]) run through onnxruntime.quantization."
        "quantize_dynamic(weight_type=QInt8, per_channel=False, reduce_range=False, "
        "op_types_to_quantize=['MatMul']) as in models/tools/export_sam.py. float_reference = "
        "x @ w in float (the model before quantization)."
    )
    return "dynamic_int8_matmul", m, x, ref, notes, extra


# --------------------------------------------------------------------------------------------
def build() -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    makers = (qdq_softmax, lambda: qdq_softmax(quantize_output=True), per_channel_matmul, dynamic_int8_matmul)
    for make in makers:
        name, m, x, ref, notes, extra = make()
        mb = serialize(m)
        y, _ = run_ort(mb, x, optimize=False)
        y_opt, ran_opt = run_ort(mb, x, optimize=True)
        qdq_ref = extra.pop("_qdq_ref")
        if qdq_ref is not None:
            extra["numpy_qdq_reference_max_abs_diff_vs_output"] = float(np.abs(qdq_ref - y).max())
        doc = {
            "model": f"{name}.onnx",
            "model_sha256": hashlib.sha256(mb).hexdigest(),
            "op_types": op_types(m),
            "opset": OPSET,
            "onnxruntime": ort.__version__,
            "onnx": onnx.__version__,
            "numpy": np.__version__,
            "input_name": "x",
            "output_name": "y",
            "input_shape": list(x.shape),
            "input": flat(x),
            "output_shape": list(y.shape),
            "output": flat(y),
            "float_reference": flat(ref),
            "max_abs_diff_output_vs_float_reference": float(np.abs(y - ref).max()),
            "output_source": "onnxruntime CPUExecutionProvider, graph_optimization_level=ORT_DISABLE_ALL, 1 thread",
            "ort_default_optimizations": {
                "op_types_as_run": ran_opt,
                "max_abs_diff_vs_output": float(np.abs(y_opt - y).max()),
                "output": flat(y_opt),
            },
            "notes": notes,
            **extra,
        }
        files[f"{name}.onnx"] = mb
        files[f"{name}.json"] = (json.dumps(doc, indent=1) + "\n").encode()
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the files on disk, write nothing")
    args = ap.parse_args(argv)
    files = build()
    bad = 0
    if not args.check:
        OUT.mkdir(parents=True, exist_ok=True)
    for fname, data in files.items():
        p = OUT / fname
        if args.check:
            same = p.exists() and p.read_bytes() == data
            bad += not same
            print(f"{'ok  ' if same else 'DIFF'} {fname}")
        else:
            p.write_bytes(data)
            print(f"wrote {p.relative_to(ROOT)} ({len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
