//! `--precision f16`: the default encoder converted to f16 at load, against the same encoder in
//! fp32, where the CPU computes in half precision (under qemu `-cpu cortex-a76` in CI, as on a
//! Pi 5 or a Jetson Orin), and the refusal, naming the fallback, everywhere else (x86_64, the
//! Pi 4's Cortex-A72). `SAMRT_F16_ANY_CPU=1` runs the comparison on any CPU (tract's f16 in
//! software: slow, for checking the conversion on x86_64).

mod common;

use common::*;
use samrt::{MaskOutput, ModelFiles, Prompt, SamPredictor};

/// ‖f16 − fp32‖ / ‖fp32‖ of the embedding.
const EMBEDDING_RELATIVE_ERROR: f64 = 2e-2;
/// IoU of each f16 mask with the fp32 mask of the same prompt.
const MIN_MASK_IOU: f64 = 0.97;

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
    if !runs_f16() {
        println!("skipped: no fp16 arithmetic on this CPU");
        return;
    }
    let f16 = SamPredictor::load(&f16_files()).unwrap();
    let fp32 = predictor();
    let photo = samrt::image_io::load_rgb(&data_dir().join("images/camera.png")).unwrap();
    let (a, b) = (fp32.embed(&photo).unwrap(), f16.embed(&photo).unwrap());
    let diff: f64 = a
        .data()
        .iter()
        .zip(b.data())
        .map(|(x, y)| f64::from(x - y).powi(2))
        .sum();
    let norm: f64 = a.data().iter().map(|x| f64::from(*x).powi(2)).sum();
    let error = (diff / norm).sqrt();
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
