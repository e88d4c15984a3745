//! Quantized graphs in tract, against onnxruntime (tests/reference/make_quant_fixtures.py):
//! per-channel DequantizeLinear weights and onnxruntime's dynamic int8 are computed right; a QDQ
//! pair before a Softmax is right; a Softmax *between* DequantizeLinear and QuantizeLinear (static
//! QDQ around attention), which tract 0.23 folds into a wrong lookup table, is refused at load.

mod common;

use common::*;
use serde_json::Value;

fn fixture(name: &str) -> (std::path::PathBuf, Vec<u8>, Value) {
    let path = data_dir().join(format!("quant/{name}.onnx"));
    let bytes = std::fs::read(&path).unwrap();
    (path, bytes, load_json(&format!("quant/{name}.json")))
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn shape(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

fn check_matches_onnxruntime(name: &str, tolerance: f32) {
    let (path, bytes, reference) = fixture(name);
    let out = samrt::engine::run_f32_graph(
        &path,
        &bytes,
        &shape(&reference["input_shape"]),
        &floats(&reference["input"]),
    )
    .unwrap();
    let diff = max_abs_diff(&out, &floats(&reference["output"]));
    println!("{name}: max abs diff {diff:e} against onnxruntime");
    assert!(
        diff <= tolerance,
        "{name}: tract differs from onnxruntime by {diff}"
    );
}

#[test]
fn per_channel_weights_match_onnxruntime() {
    check_matches_onnxruntime("per_channel_matmul", 1e-4);
}

#[test]
fn dynamic_int8_matches_onnxruntime() {
    check_matches_onnxruntime("dynamic_int8_matmul", 1e-5);
}

#[test]
fn qdq_before_softmax_matches_onnxruntime() {
    check_matches_onnxruntime("qdq_softmax", 1e-5);
}

#[test]
fn softmax_between_dequantize_and_quantize_is_refused() {
    let (path, bytes, reference) = fixture("qdq_softmax_qdq");
    let err = samrt::engine::run_f32_graph(
        &path,
        &bytes,
        &shape(&reference["input_shape"]),
        &floats(&reference["input"]),
    )
    .expect_err("tract computes this graph wrong; it must be refused")
    .to_string();
    assert!(
        err.contains("Softmax between DequantizeLinear and QuantizeLinear")
            && err.contains("quantize_dynamic"),
        "{err}"
    );
}
