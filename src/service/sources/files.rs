//! `[source] kind = "files"`: image files, one file, a directory in name order, or a glob.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{CapturedFrame, FrameSource, Pacer, SourceError};
use crate::service::fields::non_negative;

/// `[source.files]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct FilesSourceConfig {
    /// An image file, a directory (its images in name order) or a glob such as "frames/*.jpg".
    pub path: String,
    /// Start again from the first image after the last one.
    #[serde(rename = "loop")]
    pub repeat: bool,
    /// Frames per second to deliver; 0 = as fast as they can be read.
    pub fps: f64,
}

impl Default for FilesSourceConfig {
    fn default() -> Self {
        FilesSourceConfig {
            path: String::new(),
            repeat: true,
            fps: 0.0,
        }
    }
}

impl FilesSourceConfig {
    /// Checks values that serde cannot; the error names the key and what it accepts.
    pub fn validate(&self) -> Result<(), String> {
        non_negative(self.fps, "source.files.fps")
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::sources::synthetic::synthetic_frame;

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
}
