//! JPEG decoding must equal Pillow's (libjpeg-turbo's) bit for bit, and damaged JPEGs must be
//! errors, not grey-filled images or panics.
//!
//! The reference is tests/data/reference/jpeg_decode.json, made by
//! tests/reference/make_jpeg_reference.py: for each file, the sha256 of
//! `np.asarray(Image.open(f).convert("RGB")).tobytes()`.

use std::path::{Path, PathBuf};
use std::process::Command;

use samrt::image_io::load_rgb;
use samrt::jpeg::decode_jpeg_rgb;
use samrt::model::sha256_hex;
use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn reference() -> Value {
    let path = root().join("tests/data/reference/jpeg_decode.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn read(relative: &str) -> Vec<u8> {
    let path = root().join(relative);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Writes `bytes` to a scratch file for the tests that go through paths.
fn scratch_file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("jpeg_decode-{}-{name}", std::process::id()));
    std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    path
}

/// On a mismatch, Pillow's bytes themselves, if the reference Python environment is here
/// (`SAMRT_REF_PYTHON`, default /opt/samref/bin/python), to say how many bytes differ.
fn pillow_rgb(path: &Path) -> Option<Vec<u8>> {
    let python =
        std::env::var("SAMRT_REF_PYTHON").unwrap_or_else(|_| "/opt/samref/bin/python".into());
    let script = "import sys, numpy as np; from PIL import Image; \
                  sys.stdout.buffer.write(np.asarray(Image.open(sys.argv[1]).convert('RGB')).tobytes())";
    let out = Command::new(python)
        .args(["-c", script])
        .arg(path)
        .output()
        .ok()?;
    out.status.success().then_some(out.stdout)
}

fn describe_difference(path: &Path, ours: &[u8]) -> String {
    match pillow_rgb(path) {
        Some(pillow) if pillow.len() == ours.len() => {
            let diffs: Vec<u8> = ours
                .iter()
                .zip(&pillow)
                .map(|(a, b)| a.abs_diff(*b))
                .filter(|&d| d > 0)
                .collect();
            format!(
                "{} of {} bytes differ from Pillow's, by up to {}",
                diffs.len(),
                ours.len(),
                diffs.iter().max().copied().unwrap_or(0)
            )
        }
        Some(pillow) => format!("Pillow gives {} bytes, samrt {}", pillow.len(), ours.len()),
        None => "(set SAMRT_REF_PYTHON to a Python with Pillow and numpy to count differing bytes)"
            .into(),
    }
}

#[test]
fn every_reference_jpeg_decodes_exactly_as_pillow() {
    let reference = reference();
    let images = reference["images"].as_array().expect("images");
    assert!(images.len() >= 7, "the reference lists too few images");
    let mut failures = Vec::new();
    for entry in images {
        let file = entry["file"].as_str().expect("file");
        let path = root().join(file);
        let bytes = read(file);
        let file_sha = sha256_hex(&bytes);
        if file_sha != entry["file_sha256"].as_str().expect("file_sha256") {
            failures.push(format!(
                "{file}: the file changed since the reference was made (sha256 {file_sha}); \
                 rerun tests/reference/make_jpeg_reference.py"
            ));
            continue;
        }
        let rgb = match load_rgb(&path) {
            Ok(rgb) => rgb,
            Err(e) => {
                failures.push(format!("{file}: {e}"));
                continue;
            }
        };
        let size = (u64::from(rgb.width()), u64::from(rgb.height()));
        let expected_size = (
            entry["width"].as_u64().expect("width"),
            entry["height"].as_u64().expect("height"),
        );
        if size != expected_size {
            failures.push(format!("{file}: size {size:?}, Pillow {expected_size:?}"));
            continue;
        }
        if sha256_hex(rgb.as_raw()) != entry["rgb_sha256"].as_str().expect("rgb_sha256") {
            failures.push(format!(
                "{file}: pixels differ: {}",
                describe_difference(&path, rgb.as_raw())
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "decoded with Pillow {} (libjpeg-turbo {}):\n{}",
        reference["pillow"],
        reference["libjpeg_turbo"],
        failures.join("\n")
    );
}

#[test]
fn truncated_jpegs_are_errors() {
    for (file, case) in [
        ("tests/data/images/grace_hopper.jpg", "baseline"),
        (
            "tests/data/images/jpeg_cases/progressive420.jpg",
            "progressive",
        ),
    ] {
        let bytes = read(file);
        // Half the file, and the whole file but its end-of-image marker (Pillow rejects both).
        for (cut, len) in [("half", bytes.len() / 2), ("no-eoi", bytes.len() - 2)] {
            let message = decode_jpeg_rgb(&bytes[..len]).expect_err(&format!("{file} {cut}"));
            assert!(message.contains("truncated"), "{file} {cut}: {message}");

            let path = scratch_file(&format!("{case}-{cut}.jpg"), &bytes[..len]);
            let message = load_rgb(&path)
                .expect_err(&format!("{file} {cut}"))
                .to_string();
            assert!(message.contains(&*path.to_string_lossy()), "{message}");
            assert!(message.contains("corrupt or truncated"), "{message}");
            let _ = std::fs::remove_file(&path);
        }
    }
}

#[test]
fn garbage_after_soi_is_an_error() {
    // SOI and the start of a marker (so that the file is taken for a JPEG), then noise.
    let mut bytes = b"\xff\xd8\xff".to_vec();
    bytes.extend((0..4000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    assert!(decode_jpeg_rgb(&bytes).is_err());

    let path = scratch_file("garbage.jpg", &bytes);
    let message = load_rgb(&path).expect_err("garbage").to_string();
    assert!(message.contains(&*path.to_string_lossy()), "{message}");
    assert!(message.contains("corrupt or truncated"), "{message}");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn exif_orientation_is_applied_to_jpegs() {
    let photo = read("tests/data/images/jpeg_cases/ycc422.jpg");
    let (w, h, pixels) = decode_jpeg_rgb(&photo).expect("decode");
    let upright = image::RgbImage::from_raw(w, h, pixels).expect("size");
    // An APP1 Exif segment (big-endian TIFF, one IFD entry: Orientation = 6, "rotate 90° clockwise
    // to display") right after SOI.
    let mut exif = b"\xff\xe1\x00\x22Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x01".to_vec();
    exif.extend(b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00\x00\x00\x00\x00");
    let mut rotated = photo[..2].to_vec();
    rotated.extend(&exif);
    rotated.extend(&photo[2..]);
    let path = scratch_file("orientation6.jpg", &rotated);
    let loaded = load_rgb(&path).expect("load");
    let _ = std::fs::remove_file(&path);
    assert_eq!(loaded.dimensions(), (h, w));
    assert!(
        loaded == image::imageops::rotate90(&upright),
        "not rotated 90° clockwise"
    );
}

/// `photo` with bytes in the middle of its entropy-coded data scrambled, without creating
/// markers (as a bad sector or bit flips would).
fn scrambled(photo: &[u8]) -> Vec<u8> {
    let mut bytes = photo.to_vec();
    let mid = bytes.len() / 2;
    for i in mid..mid + 48 {
        if bytes[i - 1] != 0xff && bytes[i] != 0xff {
            let x = bytes[i] ^ 0x5a;
            bytes[i] = if x == 0xff { 0x7f } else { x };
        }
    }
    bytes
}

#[test]
fn scrambled_entropy_data_is_not_an_error() {
    // libjpeg only warns about corrupt entropy-coded data and Pillow accepts such files, so they
    // decode (to a damaged picture) rather than fail.
    let photo = read("tests/data/images/grace_hopper.jpg");
    let (w, h, pixels) =
        decode_jpeg_rgb(&scrambled(&photo)).expect("scrambled data is only a warning");
    assert_eq!((w, h, pixels.len()), (512, 600, 512 * 600 * 3));
}

#[test]
fn damaged_jpegs_fail_cleanly_in_the_cli() {
    let photo = read("tests/data/images/grace_hopper.jpg");
    let mut garbage = b"\xff\xd8\xff\xdb\x00\x43".to_vec();
    garbage.extend(std::iter::repeat_n(0xa5u8, 300));
    for (name, bytes) in [
        ("cli-truncated.jpg", &photo[..photo.len() / 2]),
        ("cli-garbage.jpg", &garbage[..]),
    ] {
        let path = scratch_file(name, bytes);
        let out = Command::new(env!("CARGO_BIN_EXE_samrt"))
            .arg("segment")
            .arg(&path)
            .args(["--point", "1,1"])
            .output()
            .expect("run samrt");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
        assert!(stderr.contains("corrupt or truncated"), "{name}: {stderr}");
        assert!(
            stderr.contains(&*path.to_string_lossy()),
            "{name}: {stderr}"
        );
        let _ = std::fs::remove_file(&path);
    }
}
