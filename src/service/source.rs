//! Frame sources: one trait, chosen by the config's `[source] kind`. The capture thread calls
//! [`FrameSource::next_frame`] in a loop and reconnects with backoff on
//! [`SourceError::Disconnected`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use image::RgbImage;

use super::config::{FilesSourceConfig, SourceConfig, SourceKind, SyntheticSourceConfig};

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
struct Pacer {
    period: Option<Duration>,
    next_due: Option<Instant>,
}

impl Pacer {
    fn new(fps: f64) -> Self {
        Pacer {
            period: (fps > 0.0).then(|| Duration::from_secs_f64(1.0 / fps)),
            next_due: None,
        }
    }

    fn wait(&mut self) {
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

const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "bmp", "tif", "tiff", "webp", "gif"];

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Image files: one file, every image of a directory in name order, or a glob. The list is read
/// again at the start of every pass, so files added or removed while running are seen.
#[derive(Debug)]
pub struct FileSource {
    pattern: String,
    repeat: bool,
    pacer: Pacer,
    files: Vec<PathBuf>,
    next: usize,
    passes: u64,
}

impl FileSource {
    /// Lists the files once to fail early on a path with no images.
    pub fn open(config: &FilesSourceConfig) -> Result<Self, SourceError> {
        let mut source = FileSource {
            pattern: config.path.clone(),
            repeat: config.repeat,
            pacer: Pacer::new(config.fps),
            files: Vec::new(),
            next: 0,
            passes: 0,
        };
        source.files = source.list()?;
        Ok(source)
    }

    fn list(&self) -> Result<Vec<PathBuf>, SourceError> {
        let path = Path::new(&self.pattern);
        let files = if self.pattern.contains(['*', '?', '[']) {
            let paths = glob::glob(&self.pattern).map_err(|e| {
                SourceError::Disconnected(format!("bad glob {:?}: {e}", self.pattern))
            })?;
            let mut files: Vec<PathBuf> = paths
                .filter_map(|p| p.ok())
                .filter(|p| p.is_file())
                .collect();
            files.sort();
            files
        } else if path.is_dir() {
            let entries = std::fs::read_dir(path).map_err(|e| {
                SourceError::Disconnected(format!("cannot list {}: {e}", path.display()))
            })?;
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && is_image(p))
                .collect();
            files.sort();
            files
        } else if path.is_file() {
            vec![path.to_path_buf()]
        } else {
            return Err(SourceError::Disconnected(format!(
                "{} does not exist (check [source.files] path)",
                path.display()
            )));
        };
        if files.is_empty() {
            return Err(SourceError::Disconnected(format!(
                "no images in {} (PNG, JPEG, BMP, TIFF, WebP or GIF files)",
                self.pattern
            )));
        }
        Ok(files)
    }
}

impl FrameSource for FileSource {
    fn describe(&self) -> String {
        format!("files {} ({} images)", self.pattern, self.files.len())
    }

    fn next_frame(&mut self) -> Result<CapturedFrame, SourceError> {
        if self.next >= self.files.len() {
            if !self.repeat && self.passes > 0 {
                return Err(SourceError::Finished);
            }
            self.files = self.list()?;
            self.next = 0;
        }
        if self.next == 0 {
            self.passes += 1;
        }
        let path = self.files[self.next].clone();
        self.next += 1;
        self.pacer.wait();
        let origin = path.display().to_string();
        let image =
            crate::image_io::load_rgb(&path).map_err(|e| SourceError::Corrupt(e.to_string()))?;
        Ok(CapturedFrame {
            image,
            origin,
            dropped_before: 0,
        })
    }

    fn reconnect(&mut self) -> Result<(), SourceError> {
        self.files = self.list()?;
        self.next = 0;
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

/// Opens the source the config selects.
pub fn open_source(config: &SourceConfig) -> Result<Box<dyn FrameSource>, SourceError> {
    Ok(match config.kind {
        SourceKind::Files => Box::new(FileSource::open(&config.files)?),
        SourceKind::Synthetic => Box::new(SyntheticSource::new(&config.synthetic)),
        SourceKind::V4l2 => Box::new(super::v4l2::V4l2Source::open(&config.v4l2)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files_config(path: &Path) -> FilesSourceConfig {
        FilesSourceConfig {
            path: path.display().to_string(),
            repeat: false,
            fps: 0.0,
        }
    }

    #[test]
    fn directory_frames_in_order_corrupt_ones_reported() {
        let dir = std::env::temp_dir().join(format!("samrt-src-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        synthetic_frame(8, 6, 0).save(dir.join("a.png")).unwrap();
        std::fs::write(dir.join("b.jpg"), b"not a jpeg").unwrap();
        synthetic_frame(8, 6, 1).save(dir.join("c.png")).unwrap();
        std::fs::write(dir.join("notes.txt"), b"ignored").unwrap();
        let mut source = FileSource::open(&files_config(&dir)).unwrap();
        let first = source.next_frame().unwrap();
        assert!(first.origin.ends_with("a.png"));
        assert_eq!(first.image, synthetic_frame(8, 6, 0));
        assert!(matches!(source.next_frame(), Err(SourceError::Corrupt(r)) if r.contains("b.jpg")));
        assert_eq!(source.next_frame().unwrap().image, synthetic_frame(8, 6, 1));
        assert_eq!(source.next_frame().unwrap_err(), SourceError::Finished);

        std::fs::remove_file(dir.join("b.jpg")).unwrap();
        let mut looping = FileSource::open(&FilesSourceConfig {
            repeat: true,
            ..files_config(&dir)
        })
        .unwrap();
        let origins: Vec<String> = (0..5)
            .map(|_| looping.next_frame().unwrap().origin)
            .collect();
        assert!(
            origins[2].ends_with("a.png") && origins[4].ends_with("a.png"),
            "{origins:?}"
        );

        std::fs::remove_dir_all(&dir).unwrap();
        for _ in 0..2 {
            let _ = looping.next_frame();
        }
        assert!(
            matches!(looping.next_frame(), Err(SourceError::Disconnected(r)) if r.contains("does not exist"))
        );
    }

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
