//! samrt: Segment Anything on robots and cameras, on tract.
//!
//! Data flows one way: image → [`preprocess`] → [`engine`] (encoder, once per image) →
//! [`prompt`] → [`engine`] (decoder, once per prompt) → [`postprocess`] → sinks ([`rle`],
//! [`overlay`]). [`SamPredictor`] is the facade over all of it. Only [`engine`] uses tract.
//! Shared by the stages: [`sam_sizes`], the sizes SAM's models are built for (encoder input,
//! embedding, low-resolution masks); [`boxes`], the box IoU and NMS of [`amg`], [`edges`] and
//! [`detector`].

pub mod amg;
pub mod boxes;
pub mod detector;
pub mod edges;
pub mod engine;
pub mod error;
pub mod image_io;
pub mod instances;
pub mod jpeg;
pub mod model;
pub mod overlay;
pub mod parallel;
pub mod postprocess;
pub mod predictor;
pub mod preprocess;
pub mod prompt;
pub mod resize;
pub mod rle;
pub mod sam_sizes;

pub use error::{Error, Result};
pub use model::ModelFiles;
pub use postprocess::Mask;
pub use predictor::{Embedding, MaskOutput, PredictedMask, Prediction, SamPredictor};
pub use preprocess::Size;
pub use prompt::{BoxPrompt, PointLabel, PointPrompt, Prompt};
pub use rle::CocoRle;
/// `samrt run`, the on-board service: Linux only (V4L2, GPIO, framebuffer, systemd, Unix sockets).
#[cfg(target_os = "linux")]
pub mod service;
