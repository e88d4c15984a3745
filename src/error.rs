//! The library's error type: every variant names the problem and, where there is one, the fix.

use std::fmt;
use std::path::PathBuf;

/// The text of a caught panic's payload (`panic!` gives a `&str` or a `String`); `None` for
/// any other payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> Option<&str> {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
}

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, with enough context for a user to fix it.
#[derive(Debug)]
pub enum Error {
    /// An image file could not be read or decoded.
    Image { path: PathBuf, reason: String },
    /// An image was decoded but cannot be segmented (e.g. too thin to resize).
    UnsupportedImage(String),
    /// A model file is missing, unreadable, corrupt, or not the kind of model expected.
    Model { path: PathBuf, reason: String },
    /// A model file's bytes differ from the checksum it is expected to have.
    ModelChecksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    /// A prompt cannot be used with this image.
    Prompt(String),
    /// A prompts file could not be read or parsed.
    PromptFile { path: PathBuf, reason: String },
    /// The inference engine failed while running a model.
    Inference(String),
    /// Writing an output failed.
    Output { path: PathBuf, reason: String },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Image { path, reason } => write!(
                f,
                "cannot read image {}: {reason} (give a readable PNG, JPEG, BMP, TIFF, WebP or GIF file)",
                path.display()
            ),
            Error::UnsupportedImage(reason) => write!(f, "unsupported image: {reason}"),
            Error::Model { path, reason } => write!(f, "model file {}: {reason}", path.display()),
            Error::ModelChecksum { path, expected, actual } => write!(
                f,
                "model file {} is damaged or not the expected model: sha256 is {actual}, expected {expected} \
                 (restore it from the repository or the release package)",
                path.display()
            ),
            Error::Prompt(reason) => write!(f, "invalid prompt: {reason}"),
            Error::PromptFile { path, reason } => {
                write!(f, "prompts file {}: {reason}", path.display())
            }
            Error::Inference(reason) => write!(f, "inference failed: {reason}"),
            Error::Output { path, reason } => {
                write!(f, "cannot write {}: {reason}", path.display())
            }
        }
    }
}

impl std::error::Error for Error {}
