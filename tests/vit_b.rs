//! The official ViT-B image-encoder architecture (reduced: 2 blocks, one windowed and one global,
//! with relative position bias and the neck; random weights, seed 0) exported by
//! models/tools/export_sam.py, against Meta's PyTorch `SamPredictor` on the same weights
//! (models/tools/make_goldens.py): embedding, low-res logits, predicted IoU and masks of every
//! multimask token; and its dynamic-int8 encoder against fp32.

mod common;

use std::path::Path;
use std::sync::OnceLock;

use common::*;
use samrt::{MaskOutput, ModelFiles, SamPredictor, Size};
use serde_json::Value;

const EMBEDDING_RELATIVE_ERROR: f64 = 1e-4;
const LOGITS_TOLERANCE: f32 = 1e-4;
const IOU_PREDICTION_TOLERANCE: f32 = 1e-3;
const MIN_MASK_IOU: f64 = 0.99;

fn model_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/vit_b_reduced")
}

fn fp32() -> &'static SamPredictor {
    static P: OnceLock<SamPredictor> = OnceLock::new();
    P.get_or_init(|| SamPredictor::load(&ModelFiles::from_dir(&model_dir()).unwrap()).unwrap())
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn check_stats(data: &[f32], stats: &Value, what: &str) {
    let first: Vec<f32> = stats["first64"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let diff = max_abs_diff(&data[..first.len()], &first);
    let mean_abs = data.iter().map(|v| f64::from(v.abs())).sum::<f64>() / data.len() as f64;
    let expected = stats["mean_abs"].as_f64().unwrap();
    assert!(diff < 1e-3, "{what}: first values differ by {diff}");
    assert!(
        (mean_abs - expected).abs() < 1e-4 * expected.max(1.0),
        "{what}: mean |x| {mean_abs} vs {expected}"
    );
}

#[test]
fn reduced_vit_b_matches_meta_pytorch() {
    let goldens = load_json("reference/vit_b_reduced/goldens.json");
    let predictor = fp32();
    for image in goldens["images"].as_array().unwrap() {
        let file = image["file"].as_str().unwrap();
        let photo = samrt::image_io::load_rgb(&data_dir().join(file)).unwrap();
        let embedding = predictor.embed(&photo).unwrap();
        let size = &image["input_size"];
        assert_eq!(
            embedding.input_size,
            Size::new(
                size[0].as_u64().unwrap() as usize,
                size[1].as_u64().unwrap() as usize
            )
        );
        check_stats(embedding.data(), &image["embedding_stats"], file);
        if let Some(e) = image["embedding"].as_object() {
            let expected = load_f32(e["file"].as_str().unwrap(), 0, embedding.data().len());
            let rel = relative_error(embedding.data(), &expected);
            println!("{file}: embedding relative error {rel:e}");
            assert!(
                rel <= EMBEDDING_RELATIVE_ERROR,
                "{file}: embedding relative error {rel}"
            );
        }
        for p in image["prompts"].as_array().unwrap() {
            let name = p["name"].as_str().unwrap();
            let prompt = prompt_from_json(p);
            let decoder_prompt = prompt.to_decoder(embedding.original_size, embedding.input_size);
            let coords: Vec<f32> = p["decoder_point_coords"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|xy| {
                    xy.as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_f64().unwrap() as f32)
                })
                .collect();
            assert_eq!(
                decoder_prompt.point_coords, coords,
                "{file} {name}: decoder coordinates"
            );
            let prediction = predictor
                .predict(&embedding, &prompt, MaskOutput::Multimask)
                .unwrap();
            let low_res = load_f32_ref(&p["low_res"]);
            let rles = golden_mask_rles(p);
            for m in &prediction.masks {
                let t = m.token - 1;
                let logits_diff =
                    max_abs_diff(&m.low_res_logits, &low_res[t * 65536..(t + 1) * 65536]);
                let iou_diff = (m.iou - p["iou_predictions"][t].as_f64().unwrap() as f32).abs();
                let mask_iou = mask_iou(&m.mask, &rle_mask(&rles[t]));
                println!("{file} {name} token {}: logits diff {logits_diff:e}, iou diff {iou_diff:e}, mask IoU {mask_iou:.5}", m.token);
                assert!(
                    logits_diff <= LOGITS_TOLERANCE,
                    "{file} {name} token {}: logits differ by {logits_diff}",
                    m.token
                );
                assert!(
                    iou_diff <= IOU_PREDICTION_TOLERANCE,
                    "{file} {name} token {}",
                    m.token
                );
                assert!(
                    mask_iou >= MIN_MASK_IOU,
                    "{file} {name} token {}: mask IoU {mask_iou}",
                    m.token
                );
            }
        }
    }
}

#[test]
fn dynamic_int8_encoder_stays_close_to_fp32() {
    let goldens = load_json("reference/vit_b_reduced/goldens.json");
    let files = ModelFiles::from_dir(&model_dir())
        .unwrap()
        .with_precision("int8-dynamic")
        .unwrap();
    assert!(files.encoder.ends_with("encoder.int8.onnx"));
    let int8 = SamPredictor::load(&files).unwrap();
    let image = &goldens["images"][0];
    let photo =
        samrt::image_io::load_rgb(&data_dir().join(image["file"].as_str().unwrap())).unwrap();
    let quantized = int8.embed(&photo).unwrap();
    let e = &image["embedding"];
    let reference = load_f32(e["file"].as_str().unwrap(), 0, quantized.data().len());
    let cos = cosine(quantized.data(), &reference);
    let ort = image["int8_encoder_ort"]["cosine_vs_torch_fp32"]
        .as_f64()
        .unwrap();
    println!("int8 encoder: cosine {cos:.6} against PyTorch fp32 (onnxruntime's int8: {ort:.6})");
    assert!(cos >= 0.999, "int8 embedding cosine {cos}");
    assert!(
        cos >= ort - 1e-3,
        "tract's int8 ({cos}) is much further from fp32 than onnxruntime's ({ort})"
    );
}

/// samrt's own int8 (`export_sam.py --quantize int8-static`: per-channel weights, activation
/// scales calibrated on the unlabelled test photos), run by samrt's int8 kernel where the CPU has
/// VNNI and by tract's operators elsewhere.
#[test]
fn static_int8_encoder_stays_close_to_fp32() {
    let goldens = load_json("reference/vit_b_reduced/goldens.json");
    let files = ModelFiles::from_dir(&model_dir())
        .unwrap()
        .with_precision("int8-static")
        .unwrap();
    assert!(files.encoder.ends_with("encoder.int8-static.onnx"));
    let int8 = SamPredictor::load(&files).unwrap();
    let image = &goldens["images"][0];
    let photo =
        samrt::image_io::load_rgb(&data_dir().join(image["file"].as_str().unwrap())).unwrap();
    let quantized = int8.embed(&photo).unwrap();
    let e = &image["embedding"];
    let reference = load_f32(e["file"].as_str().unwrap(), 0, quantized.data().len());
    let cos = cosine(quantized.data(), &reference);
    println!("static int8 encoder: cosine {cos:.6} against PyTorch fp32");
    // onnxruntime on the same file: 0.99995 against its fp32 (export_report.json).
    assert!(cos >= 0.9995, "static int8 embedding cosine {cos}");
}

#[test]
fn manifests_drive_loading_and_bad_ones_are_explained() {
    let files = ModelFiles::from_dir(&model_dir()).unwrap();
    assert_eq!(files.name, "vit_b_reduced");
    assert!(files.encoder_sha256.is_some() && files.decoder_sha256.is_some());
    assert!(files.verify().iter().all(|(_, r)| r.is_ok()));
    let err = files
        .clone()
        .with_precision("int4")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no int4 encoder")
            && err.contains("int8-dynamic")
            && err.contains("int8-static"),
        "{err}"
    );
    // f16 is the fp32 encoder, converted when the plan is built.
    let half = files.clone().with_precision("f16").unwrap();
    assert_eq!(
        (half.encoder.clone(), half.precision.as_str()),
        (files.encoder.clone(), "f16")
    );
    let back = files
        .clone()
        .with_precision("int8-static")
        .and_then(|f| f.with_precision("f16"))
        .unwrap();
    assert_eq!(back.encoder, files.encoder);

    let dir = std::env::temp_dir().join(format!("samrt-manifest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = std::fs::read_to_string(model_dir().join("manifest.json")).unwrap();
    std::fs::write(
        dir.join("manifest.json"),
        manifest.replace("\"image_size\": 1024", "\"image_size\": 512"),
    )
    .unwrap();
    let err = ModelFiles::from_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("image_size 512"), "{err}");
    std::fs::write(dir.join("manifest.json"), "{\"name\": \"x\"}").unwrap();
    let err = ModelFiles::from_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("not a samrt model manifest"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Both attention blocks (the windowed one, 14x14 windows, and the global one over 64x64 tokens)
/// run as samrt's fused operator, give tract's result, and never hold a queries x keys matrix:
/// the global block's would be 12 heads x 4096 x 4096 values, one head's 4096 x 4096.
#[test]
fn attention_runs_fused_in_blocks() {
    use samrt::engine::{EncoderOptions, ImageEncoder};
    let path = model_dir().join("encoder.onnx");
    let bytes = std::fs::read(&path).unwrap();
    let fused = ImageEncoder::from_onnx_bytes_with(
        &path,
        &bytes,
        EncoderOptions {
            fused_attention: true,
            ..EncoderOptions::default()
        },
    )
    .unwrap();
    let tract = ImageEncoder::from_onnx_bytes_with(
        &path,
        &bytes,
        EncoderOptions {
            fused_attention: false,
            ..EncoderOptions::default()
        },
    )
    .unwrap();
    assert_eq!(fused.fused_attention_blocks(), 2);
    assert_eq!(tract.fused_attention_blocks(), 0);
    let image: Vec<f32> = (0..3 * 1024 * 1024usize)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let a = fused.embed(&image).unwrap();
    let b = tract.embed(&image).unwrap();
    let error = relative_error(&a, &b);
    assert!(
        error < 1e-5,
        "fused attention vs tract's: relative error {error}"
    );
    let one_head_scores = 4096 * 4096;
    let peak = samrt::engine::attention_peak_scratch_values();
    assert!(
        peak > 0 && peak < one_head_scores / 8,
        "attention scratch peaked at {peak} values (one head's scores: {one_head_scores})"
    );
}
