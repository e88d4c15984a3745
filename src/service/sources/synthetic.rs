//! `[source] kind = "synthetic"`: a generated test pattern, every frame recomputable from its
//! number.

use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::{CapturedFrame, FrameSource, Pacer, SourceError};
use crate::service::fields::non_negative;

/// `[source.synthetic]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct SyntheticSourceConfig {
    pub width: u32,
    pub height: u32,
    /// Frames per second; 0 = as fast as they can be made.
    pub fps: f64,
    /// Frames before the source finishes; 0 = endless.
    pub frames: u64,
}

impl Default for SyntheticSourceConfig {
    fn default() -> Self {
        SyntheticSourceConfig {
            width: 640,
            height: 480,
            fps: 15.0,
            frames: 0,
        }
    }
}

impl SyntheticSourceConfig {
    /// Checks values that serde cannot; the error names the key and what it accepts.
    pub fn validate(&self) -> Result<(), String> {
        non_negative(self.fps, "source.synthetic.fps")?;
        if self.width < 2 || self.height < 2 {
            return Err("source.synthetic width and height must be at least 2".into());
        }
        Ok(())
    }
}

/// A generated pattern: colour bars with a bright square that moves one step a frame, so each
/// frame differs and every frame can be recomputed from its number.
#[derive(Debug)]
pub struct SyntheticSource {
    config: SyntheticSourceConfig,
    pacer: Pacer,
    made: u64,
}

impl SyntheticSource {
    pub fn new(config: &SyntheticSourceConfig) -> Self {
        SyntheticSource {
            config: config.clone(),
            pacer: Pacer::new(config.fps),
            made: 0,
        }
    }
}

/// The synthetic source's frame number `n`.
pub fn synthetic_frame(width: u32, height: u32, n: u64) -> RgbImage {
    const BARS: [[u8; 3]; 8] = [
        [235, 235, 235],
        [235, 235, 16],
        [16, 235, 235],
        [16, 235, 16],
        [235, 16, 235],
        [235, 16, 16],
        [16, 16, 235],
        [16, 16, 16],
    ];
    let side = (width.min(height) / 4).max(1);
    let span_x = (width - side.min(width)).max(1) as u64;
    let x0 = ((n * 7) % span_x) as u32;
    let y0 = (height - side.min(height)) / 2;
    RgbImage::from_fn(width, height, |x, y| {
        if x >= x0 && x < x0 + side && y >= y0 && y < y0 + side {
            image::Rgb([250, 128, 20])
        } else {
            image::Rgb(BARS[(x * 8 / width) as usize])
        }
    })
}

impl FrameSource for SyntheticSource {
    fn describe(&self) -> String {
        format!(
            "synthetic {}x{} at {} fps",
            self.config.width, self.config.height, self.config.fps
        )
    }

    fn next_frame(&mut self) -> Result<CapturedFrame, SourceError> {
        if self.config.frames > 0 && self.made >= self.config.frames {
            return Err(SourceError::Finished);
        }
        self.pacer.wait();
        let image = synthetic_frame(self.config.width, self.config.height, self.made);
        self.made += 1;
        Ok(CapturedFrame {
            image,
            origin: format!("synthetic:{}", self.made - 1),
            dropped_before: 0,
        })
    }

    fn reconnect(&mut self) -> Result<(), SourceError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_frames_move_and_finish() {
        let mut source = SyntheticSource::new(&SyntheticSourceConfig {
            width: 64,
            height: 48,
            fps: 0.0,
            frames: 2,
        });
        let a = source.next_frame().unwrap().image;
        let b = source.next_frame().unwrap().image;
        assert_ne!(a, b);
        assert_eq!(b, synthetic_frame(64, 48, 1));
        assert_eq!(source.next_frame().unwrap_err(), SourceError::Finished);
    }
}
