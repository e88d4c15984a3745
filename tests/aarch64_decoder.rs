//! Cross-target numerics: the default model's mask decoder, run on the stored embedding of
//! `camera.png` (`tests/data/reference/camera.embedding.f32`, written by onnxruntime on x86_64),
//! must reproduce the onnxruntime reference's low-res logits, predicted IoUs and masks for every
//! `camera.png` prompt of `reference/parity.json`, single-mask and multimask.
//!
//! It runs with the ordinary `cargo test` on x86_64 (AVX2/FMA kernels of tract-linalg), and is
//! the real-model check of `boards/cross-build.sh --test`, which runs it on aarch64 under
//! qemu-user with `-cpu cortex-a72` (Pi 4: plain NEON kernels) and `-cpu cortex-a76` (Pi 5 /
//! Jetson Orin class: fp16 + dot-product kernels). Only the decoder runs: the encoder takes
//! minutes under emulation, the decoder a few seconds per prompt. The embedding is loaded through
//! the engine API (a `samrt::Embedding` is only made by the encoder).
//!
//! Set `SAMRT_DECODER_DUMP=DIR` to write each prompt's decoder outputs (all tokens' logits, then
//! the IoUs, little-endian f32) to `DIR/<prompt>.f32`, to compare two targets directly.

mod common;

use common::*;
use samrt::engine::{DecoderInput, EmbeddingTensor, MaskDecoder, EMBEDDING_LEN, LOW_RES_MASK_LEN};
use samrt::model::read_model_file;
use samrt::postprocess::{select_single_mask, upscale_logits, MASK_THRESHOLD};
use samrt::{Mask, ModelFiles, Size};

/// Largest |difference| of the selected token's low-res logits from the onnxruntime (x86_64)
/// reference. Measured on the 5 prompts (logits up to |45|): x86_64 tract (AVX-512/FMA kernels)
/// 6.7e-5, 1.3e-4 with samrt's folded cross attention (`engine::token_attention`, the
/// projections summed in another order); aarch64 under qemu 7.2, cortex-a72 (NEON, Pi 4 kernel set) and cortex-a76 (NEON +
/// fp16 + dotprod, Pi 5 / Orin) 7.1e-5, the two bit-identical (f32 graphs use the same NEON f32
/// kernels on both); aarch64 vs x86_64 tract directly, all 4 tokens: 8.4e-5, no logit changes
/// sign. That is f32 summation-order noise. The bar is the parity test's 1e-3: 14x the worst
/// measurement, while a real kernel bug (or an f16 path, ~1e-2 relative) lands far above it.
const LOGITS_TOLERANCE: f32 = 1e-3;
/// Largest |difference| of predicted IoUs (measured 7.2e-7 on all three targets; 2.0e-6 on
/// x86_64 with the folded attention).
const IOU_TOLERANCE: f32 = 1e-4;
/// Smallest IoU of a full-resolution mask with the reference mask (measured 0.99998 on all
/// three targets: the same few boundary pixels).
const MIN_MASK_IOU: f64 = 0.999;

/// Under `boards/qemu-run` (which exports `SAMRT_QEMU_CPU` and shows tract a board's
/// /proc/cpuinfo), tract-linalg must have picked the kernels that board gets: plain NEON on a
/// Cortex-A72 (Pi 4); fp16 + dot product on a Cortex-A76 (Pi 5, Orin class); never SVE (qemu's
/// default CPU has it, and its emulated SVE kernels are unusably slow).
fn check_kernel_family() {
    let isa = tract_linalg::isa::native();
    println!("tract-linalg ISA on {}: {isa:?}", std::env::consts::ARCH);
    #[cfg(target_arch = "aarch64")]
    {
        use tract_linalg::isa::Isa;
        let kind = tract_linalg::arm64::Kind::choose();
        println!("tract-linalg aarch64 CPU kind: {kind:?}");
        let cpu = std::env::var("SAMRT_QEMU_CPU").unwrap_or_default();
        assert!(!isa.has(Isa::Aarch64Sve2), "SVE kernels under {cpu:?}");
        let (fp16, dotprod) = (isa.has(Isa::Aarch64Fp16), isa.has(Isa::Aarch64DotProd));
        match cpu.as_str() {
            "cortex-a72" => {
                assert!(
                    !fp16 && !dotprod,
                    "a Pi 4 has neither fp16 nor dotprod: {isa:?}"
                );
                if std::env::var_os("SAMRT_QEMU_CPUINFO").is_some() {
                    assert_eq!(kind, tract_linalg::arm64::Kind::CortexA72);
                }
            }
            "cortex-a76" => {
                assert!(dotprod, "a Cortex-A76 has dotprod: {isa:?}");
                if std::env::var_os("SAMRT_QEMU_CPUINFO").is_some() {
                    assert!(fp16, "a Cortex-A76 has fp16 arithmetic: {isa:?}");
                }
            }
            _ => {}
        }
    }
}

#[test]
fn decoder_matches_x86_reference_on_stored_embedding() {
    check_kernel_family();
    let reference = load_json("reference/parity.json");
    let image = reference["images"]
        .as_array()
        .expect("images")
        .iter()
        .find(|i| i["embedding"].is_object())
        .expect("an image of parity.json carries its stored embedding")
        .clone();
    let file = image["file"].as_str().unwrap();
    let original = Size::new(
        image["height"].as_u64().unwrap() as usize,
        image["width"].as_u64().unwrap() as usize,
    );
    let input = Size::new(
        image["input_size"][0].as_u64().unwrap() as usize,
        image["input_size"][1].as_u64().unwrap() as usize,
    );

    let files = ModelFiles::default_model().expect("default model");
    let bytes = read_model_file(&files.decoder, files.decoder_sha256.as_deref()).unwrap();
    let started = std::time::Instant::now();
    let decoder = MaskDecoder::from_onnx_bytes(&files.decoder, &bytes).expect("decoder");
    println!(
        "{}: decoder plan built in {:.2?}",
        files.decoder.display(),
        started.elapsed()
    );
    let embedding_file = image["embedding"]["file"].as_str().unwrap();
    let embedding = EmbeddingTensor::new(&load_f32(embedding_file, 0, EMBEDDING_LEN)).unwrap();
    let dump_dir = std::env::var_os("SAMRT_DECODER_DUMP").map(std::path::PathBuf::from);

    let prompts = image["prompts"].as_array().unwrap();
    assert!(prompts.len() >= 5, "{file}: at least 5 reference prompts");
    let mut failures = Vec::new();
    let (mut worst_logits, mut worst_iou, mut worst_mask_iou) = (0f32, 0f32, 1f64);
    for p in prompts {
        let name = p["name"].as_str().unwrap();
        let mut prompt = prompt_from_json(p);
        if let Some(k) = p["mask_input_from"].as_u64() {
            prompt.mask_input = Some(load_f32_ref(&prompts[k as usize]["low_res"]));
        }
        let decoder_prompt = prompt.to_decoder(original, input);
        let started = std::time::Instant::now();
        let tokens = decoder
            .decode(&DecoderInput {
                embedding: &embedding,
                point_coords: &decoder_prompt.point_coords,
                point_labels: &decoder_prompt.point_labels,
                mask_input: prompt.mask_input.as_deref(),
            })
            .unwrap();
        let elapsed = started.elapsed();
        assert_eq!(tokens.tokens(), 4, "SAM's decoder has 4 mask tokens");
        if let Some(dir) = &dump_dir {
            std::fs::create_dir_all(dir).unwrap();
            let values = tokens.low_res_logits.iter().chain(&tokens.iou_predictions);
            let bytes: Vec<u8> = values.flat_map(|v| v.to_le_bytes()).collect();
            std::fs::write(dir.join(format!("{name}.f32")), bytes).unwrap();
        }

        // (token, expected logits or none, expected IoU, expected mask)
        let mut checks = Vec::new();
        let single = select_single_mask(&tokens.iou_predictions, decoder_prompt.num_points());
        checks.push((
            single,
            Some(load_f32_ref(&p["low_res"])),
            p["iou"].as_f64().unwrap() as f32,
            rle_mask(&p["mask_rle"]),
        ));
        if let Some(multi) = p["multimask"].as_object() {
            for t in 1..tokens.tokens() {
                checks.push((
                    t,
                    None,
                    multi["iou"][t - 1].as_f64().unwrap() as f32,
                    rle_mask(&multi["masks_rle"][t - 1]),
                ));
            }
        }
        let mut line = format!("{file} {name}: decode {elapsed:.2?}, single token {single}");
        for (token, expected_logits, expected_iou, expected_mask) in checks {
            let logits = tokens.logits(token);
            assert_eq!(logits.len(), LOW_RES_MASK_LEN);
            if let Some(expected) = expected_logits {
                let diff = max_abs_diff(logits, &expected);
                worst_logits = worst_logits.max(diff);
                line += &format!(", logits diff {diff:.2e}");
                if diff > LOGITS_TOLERANCE {
                    failures.push(format!("{name} token {token}: logits differ by {diff:e}"));
                }
            }
            let iou_diff = (tokens.iou_predictions[token] - expected_iou).abs();
            worst_iou = worst_iou.max(iou_diff);
            let mask = Mask::from_logits(
                &upscale_logits(logits, input, original),
                original,
                MASK_THRESHOLD,
            );
            let mask_iou = mask_iou(&mask, &expected_mask);
            worst_mask_iou = worst_mask_iou.min(mask_iou);
            if iou_diff > IOU_TOLERANCE || mask_iou < MIN_MASK_IOU {
                failures.push(format!(
                    "{name} token {token}: predicted IoU differs by {iou_diff:e}, mask IoU {mask_iou}"
                ));
            }
        }
        println!("{line}");
    }
    println!(
        "{} on {}: worst logits diff {worst_logits:e}, worst IoU diff {worst_iou:e}, worst mask IoU {worst_mask_iou}",
        file,
        std::env::consts::ARCH
    );
    assert!(
        failures.is_empty(),
        "decoder differs from the reference:\n{}",
        failures.join("\n")
    );
}
