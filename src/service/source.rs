//! Frame sources: one trait, chosen by the config's `[source] kind`. The capture thread calls
//! [`FrameSource::next_frame`] in a loop and reconnects with backoff on
//! [`SourceError::Disconnected`].

use std::fmt;

use image::RgbImage;

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
