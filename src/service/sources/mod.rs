//! Frame sources: one trait, chosen by the config's `[source] kind`. The capture thread calls
//! [`FrameSource::next_frame`] in a loop and reconnects with backoff on
//! [`SourceError::Disconnected`].
//!
//! One file per source, each owning its `[source.NAME]` config table: [`files`], [`synthetic`],
//! [`v4l2`]. [`SOURCES`] is the registry that [`open_source`] opens them from.

use std::fmt;
use std::time::{Duration, Instant};

use image::RgbImage;
use serde::{Deserialize, Serialize};

pub mod files;
pub mod synthetic;
pub mod v4l2;

use files::{FileSource, FilesSourceConfig};
use synthetic::{SyntheticSource, SyntheticSourceConfig};
use v4l2::{V4l2Config, V4l2Source};

/// A frame as a source delivers it.
#[derive(Debug)]
pub struct CapturedFrame {
    pub image: RgbImage,
    /// Where it came from (a file path, a device path).
    pub origin: String,
    /// Frames the source knows it lost just before this one (from driver sequence numbers).
    pub dropped_before: u64,
}

/// Why a source gave no frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceError {
    /// This frame is unusable (corrupt data); the next one may be fine.
    Corrupt(String),
    /// The source is gone (device unplugged, directory removed); reconnect with backoff.
    Disconnected(String),
    /// A source that does not loop has no more frames.
    Finished,
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceError::Corrupt(reason) => write!(f, "corrupt frame: {reason}"),
            SourceError::Disconnected(reason) => write!(f, "source disconnected: {reason}"),
            SourceError::Finished => write!(f, "source finished"),
        }
    }
}

impl std::error::Error for SourceError {}

/// A source of RGB frames.
pub trait FrameSource: Send {
    /// What the source reads, for logs ("/dev/video0 640x480 MJPG", "directory images/").
    fn describe(&self) -> String;
    /// The next frame; may block until one is ready (a camera) or pace itself (files at `fps`).
    fn next_frame(&mut self) -> Result<CapturedFrame, SourceError>;
    /// Tries to open the source again after [`SourceError::Disconnected`].
    fn reconnect(&mut self) -> Result<(), SourceError>;
}

/// Sleeps until `next_due`, then moves it one period on; no pacing when `fps` is 0.
#[derive(Debug)]
pub(crate) struct Pacer {
    period: Option<Duration>,
    next_due: Option<Instant>,
}

impl Pacer {
    pub(crate) fn new(fps: f64) -> Self {
        Pacer {
            period: (fps > 0.0).then(|| Duration::from_secs_f64(1.0 / fps)),
            next_due: None,
        }
    }

    pub(crate) fn wait(&mut self) {
        let Some(period) = self.period else { return };
        let now = Instant::now();
        let due = self.next_due.unwrap_or(now);
        if due > now {
            std::thread::sleep(due - now);
        }
        // A late frame does not make the next ones come in a burst.
        self.next_due = Some(due.max(now) + period);
    }
}

/// Which frame source `[source] kind` selects.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// Image files: one file, a directory, or a glob.
    #[default]
    Files,
    /// A generated test pattern.
    Synthetic,
    /// A V4L2 camera (build feature `v4l2`).
    V4l2,
}

/// `[source]`
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct SourceConfig {
    pub kind: SourceKind,
    pub files: FilesSourceConfig,
    pub synthetic: SyntheticSourceConfig,
    pub v4l2: V4l2Config,
}

impl SourceConfig {
    /// Checks values that serde cannot; the error names the key and what it accepts.
    pub fn validate(&self) -> Result<(), String> {
        if self.kind == SourceKind::Files && self.files.path.is_empty() {
            return Err(
                "[source] kind = \"files\" needs [source.files] path (a file, directory or glob)"
                    .into(),
            );
        }
        self.files.validate()?;
        self.synthetic.validate()?;
        if self.kind == SourceKind::V4l2 {
            self.v4l2
                .validate()
                .map_err(|e| format!("[source.v4l2] {e}"))?;
        }
        Ok(())
    }
}

/// One row of [`SOURCES`].
#[derive(Debug, Clone, Copy)]
pub struct SourceBackend {
    pub kind: SourceKind,
    /// The name used in the config's `[source] kind`.
    pub name: &'static str,
    /// The cargo feature that compiles it in; `None`: always there.
    pub feature: Option<&'static str>,
    /// Whether this build has it (one that is off opens with an error naming the feature).
    pub compiled_in: bool,
    /// Opens it from its `[source.NAME]` table.
    pub open: fn(&SourceConfig) -> Result<Box<dyn FrameSource>, SourceError>,
}

/// Every frame source, in config order, and whether this build has it.
pub const SOURCES: &[SourceBackend] = &[
    SourceBackend {
        kind: SourceKind::Files,
        name: "files",
        feature: None,
        compiled_in: true,
        open: |config| Ok(Box::new(FileSource::open(&config.files)?)),
    },
    SourceBackend {
        kind: SourceKind::Synthetic,
        name: "synthetic",
        feature: None,
        compiled_in: true,
        open: |config| Ok(Box::new(SyntheticSource::new(&config.synthetic))),
    },
    SourceBackend {
        kind: SourceKind::V4l2,
        name: "v4l2",
        feature: Some("v4l2"),
        compiled_in: cfg!(feature = "v4l2"),
        open: |config| Ok(Box::new(V4l2Source::open(&config.v4l2)?)),
    },
];

/// The [`SOURCES`] row of `kind`.
pub fn source_backend(kind: SourceKind) -> &'static SourceBackend {
    SOURCES
        .iter()
        .find(|backend| backend.kind == kind)
        .expect("every SourceKind has a row in SOURCES")
}

/// Opens the source the config selects.
pub fn open_source(config: &SourceConfig) -> Result<Box<dyn FrameSource>, SourceError> {
    (source_backend(config.kind).open)(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_source_kind_has_a_row_named_as_in_the_config() {
        for backend in SOURCES {
            assert_eq!(source_backend(backend.kind).name, backend.name);
            let named: SourceKind =
                serde::Deserialize::deserialize(toml::Value::String(backend.name.into())).unwrap();
            assert_eq!(named, backend.kind);
        }
    }

    #[test]
    fn pacer_spaces_frames() {
        let mut pacer = Pacer::new(50.0);
        let start = Instant::now();
        for _ in 0..4 {
            pacer.wait();
        }
        assert!(
            start.elapsed() >= Duration::from_millis(58),
            "{:?}",
            start.elapsed()
        );
    }
}
