//! `--precision f16`: encoders converted to f16 at load against fp32, where the CPU computes in
//! half precision (under qemu `-cpu cortex-a76` in CI, as on a Pi 5 or a Jetson Orin), and the
//! refusal, naming the fallback, everywhere else (x86_64, the Pi 4's Cortex-A72).
//! `SAMRT_F16_ANY_CPU=1` runs the comparisons on any CPU (tract's f16 in software: for checking
//! the conversion on x86_64, as `.ci/run` does).
//!
//! The default encoder is compared with its own fp32 run, except under emulation: its two
//! encodes take 12.6 minutes under qemu (measured there once: embedding relative error 4.0e-3,
//! mask IoUs 0.9995, 0.9997, 0.9982 with tract's fp16 kernels). Under qemu the reduced ViT-B
//! fixture is compared instead with its stored PyTorch fp32 embedding and masks, so that tract's
//! real fp16 kernels are checked on every CI run.

mod common;

use common::*;
use samrt::{MaskOutput, ModelFiles, Prompt, SamPredictor};

/// ‖f16 − fp32‖ / ‖fp32‖ of the default encoder's embedding (measured 1.6e-3 with tract's f16
/// in software on x86_64, 4.0e-3 with its fp16 kernels under qemu cortex-a76).
const EMBEDDING_RELATIVE_ERROR: f64 = 1e-2;
/// IoU of each f16 mask with the fp32 mask of the same prompt (measured ≥ 0.9987).
const MIN_MASK_IOU: f64 = 0.98;

/// The same for the reduced ViT-B against PyTorch fp32 (measured 6.2e-4 in software on x86_64,
/// 3.3e-3 under qemu cortex-a76, mask IoUs ≥ 0.997 there, 130 s).
const VIT_B_EMBEDDING_RELATIVE_ERROR: f64 = 1e-2;

fn emulated() -> bool {
    std::env::var_os("SAMRT_QEMU_CPU").is_some()
}

fn runs_f16() -> bool {
    samrt::engine::f16_arithmetic()
        || std::env::var(samrt::engine::F16_ANY_CPU_ENV).is_ok_and(|v| v == "1")
}

fn f16_files() -> ModelFiles {
    ModelFiles::default_model()
        .unwrap()
        .with_precision("f16")
        .unwrap()
}

#[test]
fn f16_is_refused_without_half_precision_arithmetic() {
    if runs_f16() {
        return;
    }
    let err = SamPredictor::load(&f16_files()).unwrap_err().to_string();
    println!("{err}");
    assert!(
        err.contains("half-precision arithmetic")
            && err.contains("Cortex-A76")
            && err.contains("--precision fp32"),
        "{err}"
    );
}

#[test]
fn f16_encoder_stays_close_to_fp32() {
    if !runs_f16() || emulated() {
        println!("skipped: no fp16 arithmetic on this CPU, or emulated (see the module's note)");
        return;
    }
    let f16 = SamPredictor::load(&f16_files()).unwrap();
    let fp32 = predictor();
    let photo = samrt::image_io::load_rgb(&data_dir().join("images/camera.png")).unwrap();
    let (a, b) = (fp32.embed(&photo).unwrap(), f16.embed(&photo).unwrap());
    let error = relative_error(b.data(), a.data());
    println!("f16 embedding: relative error {error:.2e} against fp32");
    assert!(error <= EMBEDDING_RELATIVE_ERROR, "relative error {error}");
    for prompt in [
        Prompt::point(100.0, 300.0),
        Prompt::point(260.0, 120.0),
        Prompt::boxed(60.0, 30.0, 420.0, 500.0),
    ] {
        let want = fp32.predict(&a, &prompt, MaskOutput::Single).unwrap();
        let got = f16.predict(&b, &prompt, MaskOutput::Single).unwrap();
        let iou = mask_iou(&got.masks[0].mask, &want.masks[0].mask);
        println!("{prompt:?}: mask IoU {iou:.4}");
        assert!(iou >= MIN_MASK_IOU, "{prompt:?}: IoU {iou}");
    }
}

#[test]
fn f16_reduced_vit_b_stays_close_to_pytorch_fp32() {
    if !runs_f16() {
        println!("skipped: no fp16 arithmetic on this CPU");
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/vit_b_reduced");
    let files = ModelFiles::from_dir(&dir)
        .unwrap()
        .with_precision("f16")
        .unwrap();
    let f16 = SamPredictor::load(&files).unwrap();
    let goldens = load_json("reference/vit_b_reduced/goldens.json");
    let image = &goldens["images"][0];
    let photo =
        samrt::image_io::load_rgb(&data_dir().join(image["file"].as_str().unwrap())).unwrap();
    let embedding = f16.embed(&photo).unwrap();
    let reference = load_f32(
        image["embedding"]["file"].as_str().unwrap(),
        0,
        embedding.data().len(),
    );
    let error = relative_error(embedding.data(), &reference);
    println!("reduced ViT-B f16 embedding: relative error {error:.2e} against PyTorch fp32");
    assert!(
        error <= VIT_B_EMBEDDING_RELATIVE_ERROR,
        "relative error {error}"
    );
    for p in image["prompts"].as_array().unwrap() {
        let prediction = f16
            .predict(&embedding, &prompt_from_json(p), MaskOutput::Multimask)
            .unwrap();
        let rles = golden_mask_rles(p);
        for m in &prediction.masks {
            let iou = mask_iou(&m.mask, &rle_mask(&rles[m.token - 1]));
            println!("{} token {}: mask IoU {iou:.4}", p["name"], m.token);
            assert!(
                iou >= MIN_MASK_IOU,
                "{} token {}: IoU {iou}",
                p["name"],
                m.token
            );
        }
    }
}
