//! The files sink: every event as one JSON line (COCO RLE) in rotating JSONL files, and every mask
//! as a PNG, in one directory that never grows past `max_total_bytes` and never fills the disk.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{MaskEvent, Sink, SinkError};

/// `[sinks.files]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct FilesSinkConfig {
    pub enabled: bool,
    /// Directory for JSONL records (COCO RLE) and PNG masks; created if missing.
    pub dir: String,
    /// Also write every mask as a PNG (255 inside).
    pub png: bool,
    /// Start a new JSONL file when the current one reaches this size.
    pub max_file_bytes: u64,
    /// Delete the oldest files when the directory holds more than this.
    pub max_total_bytes: u64,
    /// Write nothing while the file system has less free space than this.
    pub min_free_bytes: u64,
}

impl Default for FilesSinkConfig {
    fn default() -> Self {
        FilesSinkConfig {
            enabled: false,
            dir: String::new(),
            png: true,
            max_file_bytes: 16 << 20,
            max_total_bytes: 512 << 20,
            min_free_bytes: 64 << 20,
        }
    }
}

impl FilesSinkConfig {
    /// Checks values that serde cannot; the error names the key and what it accepts.
    pub fn validate(&self) -> Result<(), String> {
        if self.enabled && self.dir.is_empty() {
            return Err("[sinks.files] enabled = true needs a dir".into());
        }
        if self.max_file_bytes == 0 || self.max_total_bytes < self.max_file_bytes {
            return Err("sinks.files: give 0 < max_file_bytes ≤ max_total_bytes".into());
        }
        Ok(())
    }
}

const NAME: &str = "files";

/// Writes JSONL + PNG masks into a directory with rotation and retention.
#[derive(Debug)]
pub struct FilesSink {
    config: FilesSinkConfig,
    dir: PathBuf,
    /// Names files of this run apart from earlier runs' (start time in ms).
    run: u128,
    part: u32,
    current: Option<(PathBuf, File, u64)>,
    /// Our files in the directory with their sizes, oldest first.
    files: Vec<(PathBuf, u64)>,
    total_bytes: u64,
    dropped: u64,
}

/// Free bytes for unprivileged users on the file system holding `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("path contains a NUL byte"))?;
    // SAFETY: statvfs is plain data, c_path is a valid C string, and the call fills `stat`.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
}

fn is_ours(name: &str) -> bool {
    name.starts_with("samrt-") && (name.ends_with(".jsonl") || name.ends_with(".png"))
}

impl FilesSink {
    /// Creates the directory if needed and takes stock of the files earlier runs left.
    pub fn open(config: &FilesSinkConfig) -> Result<Self, String> {
        let dir = PathBuf::from(&config.dir);
        std::fs::create_dir_all(&dir).map_err(|e| {
            format!(
                "[sinks.files] cannot create {}: {e} (give a writable dir; under systemd, StateDirectory=samrt gives /var/lib/samrt)",
                dir.display()
            )
        })?;
        let mut files: Vec<(SystemTime, PathBuf, u64)> = std::fs::read_dir(&dir)
            .map_err(|e| format!("[sinks.files] cannot list {}: {e}", dir.display()))?
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let meta = entry.metadata().ok()?;
                (is_ours(&name) && meta.is_file()).then(|| {
                    (
                        meta.modified().unwrap_or(UNIX_EPOCH),
                        entry.path(),
                        meta.len(),
                    )
                })
            })
            .collect();
        files.sort();
        let files: Vec<(PathBuf, u64)> = files.into_iter().map(|(_, p, n)| (p, n)).collect();
        let total_bytes = files.iter().map(|(_, n)| n).sum();
        Ok(FilesSink {
            config: config.clone(),
            dir,
            run: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis()),
            part: 0,
            current: None,
            files,
            total_bytes,
            dropped: 0,
        })
    }

    /// Deletes our oldest files (never the JSONL being written) until `incoming` more bytes fit
    /// under `max_total_bytes`.
    fn make_room(&mut self, incoming: u64) {
        let current = self.current.as_ref().map(|(p, _, _)| p.clone());
        let mut i = 0;
        while self.total_bytes + incoming > self.config.max_total_bytes && i < self.files.len() {
            if Some(&self.files[i].0) == current.as_ref() {
                i += 1;
                continue;
            }
            let (path, size) = self.files.remove(i);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    log::warn!("files sink: cannot delete old {}: {e}", path.display());
                    self.files.insert(i, (path, size));
                    i += 1;
                    continue;
                }
            }
            self.total_bytes = self.total_bytes.saturating_sub(size);
        }
    }

    fn check_free_space(&self, incoming: u64) -> Result<(), SinkError> {
        let free = free_bytes(&self.dir).map_err(|e| SinkError::new(NAME, e))?;
        if free < self.config.min_free_bytes + incoming {
            return Err(SinkError::new(
                NAME,
                format!(
                    "disk full: {} has {} KB free, not enough for this event ({} KB) plus \
                     min_free_bytes ({} KB); event not written (free space, or lower [sinks.files] \
                     max_total_bytes)",
                    self.dir.display(),
                    free >> 10,
                    incoming.div_ceil(1024),
                    self.config.min_free_bytes >> 10
                ),
            ));
        }
        Ok(())
    }

    fn append_line(&mut self, line: &[u8]) -> Result<(), SinkError> {
        let rotate = match &self.current {
            Some((_, _, size)) => {
                size + line.len() as u64 > self.config.max_file_bytes && *size > 0
            }
            None => true,
        };
        if rotate {
            if let Some((_, file, _)) = self.current.take() {
                let _ = file.sync_data();
            }
            self.part += 1;
            let path = self
                .dir
                .join(format!("samrt-{}-{:04}.jsonl", self.run, self.part));
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| {
                    SinkError::new(NAME, format!("cannot create {}: {e}", path.display()))
                })?;
            self.files.push((path.clone(), 0));
            self.current = Some((path, file, 0));
        }
        let (path, file, size) = self.current.as_mut().expect("a current file");
        if let Err(e) = file.write_all(line) {
            // A partial line would corrupt the JSONL: cut the file back to its last full line.
            let _ = file.set_len(*size);
            return Err(SinkError::new(
                NAME,
                format!("cannot write {}: {e}", path.display()),
            ));
        }
        *size += line.len() as u64;
        let written = line.len() as u64;
        if let Some(entry) = self.files.iter_mut().find(|(p, _)| p == path) {
            entry.1 += written;
        }
        self.total_bytes += written;
        Ok(())
    }

    fn write_png(
        &mut self,
        name: String,
        mask: &crate::postprocess::Mask,
    ) -> Result<(), SinkError> {
        let path = self.dir.join(name);
        let mut bytes = Vec::new();
        crate::overlay::mask_image(mask)
            .write_to(
                &mut std::io::Cursor::new(&mut bytes),
                image::ImageFormat::Png,
            )
            .map_err(|e| SinkError::new(NAME, format!("cannot encode PNG: {e}")))?;
        if let Err(e) = std::fs::write(&path, &bytes) {
            let _ = std::fs::remove_file(&path);
            return Err(SinkError::new(
                NAME,
                format!("cannot write {}: {e}", path.display()),
            ));
        }
        self.total_bytes += bytes.len() as u64;
        self.files.push((path, bytes.len() as u64));
        Ok(())
    }
}

impl Sink for FilesSink {
    fn name(&self) -> &str {
        NAME
    }

    fn emit_line(&mut self, event: &MaskEvent, line: &[u8]) -> Result<(), SinkError> {
        // PNGs of binary masks compress to well under 1/8 of a byte per pixel.
        let estimate = line.len() as u64
            + if self.config.png {
                event
                    .masks
                    .iter()
                    .map(|m| m.mask.data.len() as u64 / 8 + 1024)
                    .sum()
            } else {
                0
            };
        self.make_room(estimate);
        if let Err(e) = self.check_free_space(estimate) {
            self.dropped += 1;
            return Err(e);
        }
        if let Err(e) = self.append_line(line) {
            self.dropped += 1;
            return Err(e);
        }
        if self.config.png {
            for (k, m) in event.masks.iter().enumerate() {
                let name = format!("samrt-{}-{:08}-{k}.png", self.run, event.id);
                self.write_png(name, &m.mask)?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        if let Some((path, file, _)) = &self.current {
            file.sync_all().map_err(|e| {
                SinkError::new(NAME, format!("cannot sync {}: {e}", path.display()))
            })?;
        }
        Ok(())
    }

    fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postprocess::Mask;
    use crate::service::event::{EventMask, PromptOrigin};
    use std::sync::Arc;

    fn event(id: u64) -> MaskEvent {
        let mask = Mask {
            width: 40,
            height: 30,
            data: (0..1200).map(|i| i % 7 == 0).collect(),
        };
        MaskEvent {
            id,
            frame: id,
            frame_origin: "test".into(),
            origin: PromptOrigin::Fixed,
            prompt: None,
            masks: vec![EventMask::new(mask, 0.9, 0.8)],
            latency_ms: 1.0,
            time: SystemTime::now(),
            image: Arc::new(image::RgbImage::new(40, 30)),
        }
    }

    fn ours(dir: &Path, extension: &str) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == extension))
            .collect();
        files.sort();
        files
    }

    #[test]
    fn rotates_and_keeps_under_the_cap() {
        let dir = std::env::temp_dir().join(format!("samrt-files-sink-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let config = FilesSinkConfig {
            enabled: true,
            dir: dir.display().to_string(),
            png: true,
            max_file_bytes: 2_000,
            max_total_bytes: 10_000,
            min_free_bytes: 0,
        };
        let mut sink = FilesSink::open(&config).unwrap();
        for id in 0..100 {
            sink.emit(&event(id)).unwrap();
        }
        sink.flush().unwrap();
        let total: u64 = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(total <= 10_000, "{total} bytes kept");
        let jsonl = ours(&dir, "jsonl");
        assert!(jsonl.len() > 1, "rotated into {} files", jsonl.len());
        // The newest records survive, whole and in order, ending with the last event.
        let mut ids = Vec::new();
        for file in &jsonl {
            assert!(std::fs::metadata(file).unwrap().len() <= 2_000 + 600);
            for line in std::fs::read_to_string(file).unwrap().lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                ids.push(v["id"].as_u64().unwrap());
            }
        }
        assert_eq!(*ids.last().unwrap(), 99);
        assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");
        let last_png = ours(&dir, "png").pop().unwrap();
        let png = image::open(&last_png).unwrap().to_luma8();
        assert_eq!(png.get_pixel(0, 0)[0], 255);
        assert_eq!(png.get_pixel(1, 0)[0], 0);

        // A reopened sink counts the earlier run's files against the same cap.
        let mut again = FilesSink::open(&config).unwrap();
        again.emit(&event(100)).unwrap();
        let total: u64 = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(total <= 10_000, "{total} bytes kept");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_to_fill_the_disk() {
        let dir = std::env::temp_dir().join(format!("samrt-files-full-{}", std::process::id()));
        let config = FilesSinkConfig {
            enabled: true,
            dir: dir.display().to_string(),
            min_free_bytes: u64::MAX / 4,
            ..FilesSinkConfig::default()
        };
        let mut sink = FilesSink::open(&config).unwrap();
        let err = sink.emit(&event(0)).unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
        assert_eq!(sink.dropped(), 1);
        assert!(ours(&dir, "jsonl").is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
