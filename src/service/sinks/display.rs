//! The overlay on a display: an SPI or HDMI screen behind a Linux framebuffer device (`/dev/fbN`),
//! drawn with embedded-graphics.
//!
//! - [`Framebuffer`] is an in-memory picture in the device's pixel format (RGB565, XRGB8888 or
//!   RGB888, little-endian as fbdev stores them) and an embedded-graphics [`DrawTarget`](embedded_graphics::prelude::DrawTarget).
//! - [`draw_event`] draws one [`MaskEvent`] into it: the frame scaled to fit (letterboxed), the
//!   masks tinted and outlined, the prompts marked, a status line in the top-left corner.
//! - [`FramebufferDevice`] asks the kernel for the display's geometry and writes whole pictures to
//!   it (or to a regular file, given the geometry).
//! - [`DisplaySink`] is the [`Sink`] that ties them together, at most one redraw per
//!   [`DisplayConfig::min_interval_ms`].

use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{MaskEvent, Sink, SinkError};

mod device;
mod draw;
mod framebuffer;

pub use device::FramebufferDevice;
#[cfg(test)]
use device::{fbdev, open_error};
pub use draw::draw_event;
#[cfg(test)]
use draw::{blend, display_range, sample_map, status_text, Viewport};
pub use framebuffer::{FbPixelFormat, Framebuffer, Geometry};

/// The value of [`DisplayConfig::device`] that draws into memory and presents nothing.
pub const MEMORY_DEVICE: &str = "memory";
/// Size of the in-memory display when [`DisplayConfig::width`] / `height` are 0.
pub const MEMORY_DEFAULT_SIZE: (u32, u32) = (640, 480);
/// Largest width or height accepted in a [`DisplayConfig`].
pub const MAX_DISPLAY_SIDE: u32 = 8192;

/// `[display]`: the overlay on a framebuffer display.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DisplayConfig {
    /// Draw every event (frame, masks, prompt, status line) on a display. Default false.
    pub enabled: bool,
    /// The framebuffer device: "/dev/fb0" (default; HDMI on a Pi), "/dev/fb1" (typically an SPI
    /// display, once its overlay is enabled in config.txt). The user needs the `video` group.
    /// The special value "memory" draws into memory and presents nothing: the same work,
    /// headless (tests, benchmarks).
    pub device: String,
    /// Display width in pixels; 0 (default) asks the device. `width`, `height` and `format` go
    /// together: set all three to skip asking (then `device` may be a regular file, written from
    /// offset 0 with packed rows). With "memory", 0 means 640.
    pub width: u32,
    /// Display height in pixels; 0 (default) asks the device. With "memory", 0 means 480.
    pub height: u32,
    /// Pixel format: "rgb565", "xrgb8888" or "rgb888"; unset (default) asks the device. With
    /// "memory", unset means "xrgb8888".
    #[serde(with = "crate::service::fields::empty_is_none")]
    pub format: Option<FbPixelFormat>,
    /// Least time between two redraws in milliseconds; default 100, at most 10 redraws a second.
    /// An event that comes sooner waits, replaced by any newer one, and is drawn with the first
    /// event after the interval or at shutdown. 0 draws every event.
    pub min_interval_ms: u64,
}

impl Default for DisplayConfig {
    fn default() -> Self {
        DisplayConfig {
            enabled: false,
            device: "/dev/fb0".into(),
            width: 0,
            height: 0,
            format: None,
            min_interval_ms: 100,
        }
    }
}

impl DisplayConfig {
    /// Whether this is the in-memory display.
    pub fn is_memory(&self) -> bool {
        self.device == MEMORY_DEVICE
    }

    /// Checks the fields that can be checked without opening the device.
    pub fn validate(&self) -> Result<(), String> {
        if self.device.trim().is_empty() {
            return Err(format!(
                "display.device is empty: give a framebuffer device such as /dev/fb0, or \
                 \"{MEMORY_DEVICE}\""
            ));
        }
        if (self.width == 0) != (self.height == 0) {
            return Err(format!(
                "display.width = {} and display.height = {} go together: both 0 to ask the \
                 device, or both set",
                self.width, self.height
            ));
        }
        if self.width > MAX_DISPLAY_SIDE || self.height > MAX_DISPLAY_SIDE {
            return Err(format!(
                "display {}x{} is too large (at most {MAX_DISPLAY_SIDE} pixels a side)",
                self.width, self.height
            ));
        }
        if !self.is_memory() && (self.width != 0) != self.format.is_some() {
            return Err(
                "display.width, display.height and display.format go together: set all three to \
                 skip asking the device (e.g. to write into a regular file), or none"
                    .into(),
            );
        }
        Ok(())
    }

    /// The explicit geometry, if the config gives one (always, for "memory").
    fn geometry(&self) -> Option<Geometry> {
        if self.is_memory() {
            let (w, h) = if self.width == 0 {
                MEMORY_DEFAULT_SIZE
            } else {
                (self.width, self.height)
            };
            let format = self.format.unwrap_or(FbPixelFormat::Xrgb8888);
            return Some(Geometry::new(w, h, format));
        }
        match (self.width, self.format) {
            (w, Some(format)) if w != 0 => Some(Geometry::new(w, self.height, format)),
            _ => None,
        }
    }
}

/// The display as a sink: draws each event with [`draw_event`] and presents it, at most once per
/// `min_interval_ms`. An event inside the interval is kept, replacing any older one kept (counted
/// in [`DisplaySink::skipped`], not an error), and drawn by the first event after the interval or
/// by `flush`. Drawing happens on the sink thread: a few milliseconds for a small display.
#[derive(Debug)]
pub struct DisplaySink {
    framebuffer: Framebuffer,
    device: Option<FramebufferDevice>,
    label: String,
    min_interval: Duration,
    last_draw: Option<Instant>,
    pending: Option<MaskEvent>,
    drawn: u64,
    skipped: u64,
}

impl DisplaySink {
    /// Opens the display of `config` (validated here) and clears it to black.
    pub fn open(config: &DisplayConfig) -> Result<Self, String> {
        config.validate()?;
        let explicit = config.geometry();
        let (framebuffer, device) = if config.is_memory() {
            let geometry = explicit.expect("memory has a geometry");
            (Framebuffer::with_geometry(&geometry)?, None)
        } else {
            let mut device = FramebufferDevice::open(Path::new(&config.device), explicit)?;
            let framebuffer = device.framebuffer();
            device
                .present(&framebuffer)
                .map_err(|e| format!("clearing {}: {e}", config.device))?;
            (framebuffer, Some(device))
        };
        let label = format!("{} {}", config.device, framebuffer.geometry());
        log::info!("display: {label}");
        Ok(DisplaySink {
            framebuffer,
            device,
            label,
            min_interval: Duration::from_millis(config.min_interval_ms),
            last_draw: None,
            pending: None,
            drawn: 0,
            skipped: 0,
        })
    }

    /// What is drawn now.
    pub fn framebuffer(&self) -> &Framebuffer {
        &self.framebuffer
    }

    /// The device and its geometry, for logs ("/dev/fb1 480x320 rgb565 (960 bytes a row)").
    pub fn describe(&self) -> &str {
        &self.label
    }

    /// Events drawn since the start.
    pub fn drawn(&self) -> u64 {
        self.drawn
    }

    /// Events never drawn because a newer one replaced them within the redraw interval.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    fn emit_at(&mut self, event: &MaskEvent, now: Instant) -> Result<(), SinkError> {
        let due = self
            .last_draw
            .is_none_or(|last| now.saturating_duration_since(last) >= self.min_interval);
        if self.pending.take().is_some() {
            self.skipped += 1;
        }
        if due {
            self.redraw(event, now)
        } else {
            self.pending = Some(event.clone());
            Ok(())
        }
    }

    fn redraw(&mut self, event: &MaskEvent, now: Instant) -> Result<(), SinkError> {
        draw_event(&mut self.framebuffer, event);
        self.last_draw = Some(now);
        self.drawn += 1;
        match &mut self.device {
            Some(device) => device.present(&self.framebuffer).map_err(|e| {
                SinkError::new(
                    "display",
                    format!("writing to {}: {e}", device.path().display()),
                )
            }),
            None => Ok(()),
        }
    }
}

impl Sink for DisplaySink {
    fn name(&self) -> &str {
        "display"
    }

    fn emit(&mut self, event: &MaskEvent) -> Result<(), SinkError> {
        self.emit_at(event, Instant::now())
    }

    /// The display draws the event; the record is not used.
    fn emit_line(&mut self, event: &MaskEvent, _line: &[u8]) -> Result<(), SinkError> {
        self.emit_at(event, Instant::now())
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        match self.pending.take() {
            Some(event) => self.redraw(&event, Instant::now()),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    use std::time::SystemTime;

    use std::path::PathBuf;

    use std::io;

    use embedded_graphics::geometry::{Point, Size};
    use embedded_graphics::pixelcolor::Rgb888;
    use embedded_graphics::prelude::{DrawTarget, Pixel, RgbColor};
    use embedded_graphics::primitives::Rectangle;
    use image::RgbImage;

    use super::fbdev::{pixel_format, FbBitfield, FbFixScreeninfo, FbVarScreeninfo};
    use super::*;
    use crate::overlay::{FOREGROUND_COLOR, MASK_COLORS};
    use crate::postprocess::Mask;
    use crate::prompt::Prompt;
    use crate::service::event::{EventMask, PromptOrigin};

    const FORMATS: [FbPixelFormat; 3] = [
        FbPixelFormat::Rgb565,
        FbPixelFormat::Xrgb8888,
        FbPixelFormat::Rgb888,
    ];

    /// A path in the temp directory, removed on drop.
    struct TempPath(PathBuf);

    impl TempPath {
        fn new(name: &str) -> Self {
            static COUNTER: AtomicU32 = AtomicU32::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            TempPath(
                std::env::temp_dir()
                    .join(format!("samrt-display-{}-{n}-{name}", std::process::id())),
            )
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn packed(format: FbPixelFormat, color: Rgb888) -> Vec<u8> {
        let mut out = vec![0; format.bytes_per_pixel()];
        format.pack(color, &mut out);
        out
    }

    fn rgb(c: Rgb888) -> [u8; 3] {
        [c.r(), c.g(), c.b()]
    }

    #[test]
    fn rgb565_bit_layout() {
        let f = FbPixelFormat::Rgb565;
        assert_eq!(packed(f, Rgb888::new(255, 0, 0)), [0x00, 0xf8]);
        assert_eq!(packed(f, Rgb888::new(0, 255, 0)), [0xe0, 0x07]);
        assert_eq!(packed(f, Rgb888::new(0, 0, 255)), [0x1f, 0x00]);
        assert_eq!(packed(f, Rgb888::WHITE), [0xff, 0xff]);
        // r 0x12 >> 3 = 2, g 0x34 >> 2 = 13, b 0x56 >> 3 = 10: 2 << 11 | 13 << 5 | 10 = 0x11aa.
        assert_eq!(packed(f, Rgb888::new(0x12, 0x34, 0x56)), [0xaa, 0x11]);
        assert_eq!(rgb(f.unpack(&[0x00, 0xf8])), [255, 0, 0]);
        assert_eq!(rgb(f.unpack(&[0xe0, 0x07])), [0, 255, 0]);
        assert_eq!(rgb(f.unpack(&[0x1f, 0x00])), [0, 0, 255]);
        // Every 16-bit value survives unpack then pack.
        for v in 0..=u16::MAX {
            let bytes = v.to_le_bytes();
            assert_eq!(packed(f, f.unpack(&bytes)), bytes, "{v:#06x}");
        }
    }

    #[test]
    fn rgb888_and_xrgb8888_layout_and_round_trip() {
        let c = Rgb888::new(0x12, 0x34, 0x56);
        assert_eq!(packed(FbPixelFormat::Xrgb8888, c), [0x56, 0x34, 0x12, 0xff]);
        assert_eq!(packed(FbPixelFormat::Rgb888, c), [0x56, 0x34, 0x12]);
        for f in [FbPixelFormat::Xrgb8888, FbPixelFormat::Rgb888] {
            for v in (0..=255u8).step_by(5) {
                let c = Rgb888::new(v, 255 - v, v / 2);
                assert_eq!(f.unpack(&packed(f, c)), c);
            }
        }
    }

    #[test]
    fn framebuffer_draws_and_reads_back_every_format() {
        let c = Rgb888::new(200, 100, 50);
        for format in FORMATS {
            let mut fb = Framebuffer::new(5, 4, format);
            assert_eq!(fb.bytes().len(), 5 * 4 * format.bytes_per_pixel());
            assert_eq!(fb.pixel(0, 0), Some(Rgb888::BLACK));
            let Ok(()) = fb.draw_iter([Pixel(Point::new(3, 2), c)]);
            let expected = format.unpack(&packed(format, c));
            assert_eq!(fb.pixel(3, 2), Some(expected), "{format}");
            let at = 2 * fb.stride_bytes() + 3 * format.bytes_per_pixel();
            assert_eq!(
                &fb.bytes()[at..at + format.bytes_per_pixel()],
                packed(format, c)
            );
            assert_eq!(fb.pixel(2, 2), Some(Rgb888::BLACK));
        }
        // RGB565 keeps the high bits: 200 = 0b11001_000 -> 0b11001_110 = 206.
        let mut fb = Framebuffer::new(1, 1, FbPixelFormat::Rgb565);
        let Ok(()) = fb.draw_iter([Pixel(Point::zero(), c)]);
        assert_eq!(fb.pixel(0, 0), Some(Rgb888::new(206, 101, 49)));
    }

    #[test]
    fn drawing_is_clipped_and_row_padding_untouched() {
        let geometry = Geometry {
            width: 4,
            height: 3,
            format: FbPixelFormat::Rgb888,
            stride_bytes: 16,
        };
        let mut fb = Framebuffer::with_geometry(&geometry).unwrap();
        assert_eq!(fb.bytes().len(), 48);
        let before = fb.bytes().to_vec();
        let red = Rgb888::RED;
        let outside = [(-1, 0), (0, -1), (4, 0), (0, 3), (i32::MAX, i32::MAX)];
        let Ok(()) = fb.draw_iter(outside.map(|(x, y)| Pixel(Point::new(x, y), red)));
        assert_eq!(fb.bytes(), before);
        assert_eq!(fb.pixel(4, 0), None);
        assert_eq!(fb.pixel(0, 3), None);

        let Ok(()) = fb.fill_solid(&Rectangle::new(Point::new(2, 1), Size::new(10, 10)), red);
        for y in 0..3 {
            for x in 0..4 {
                let want = if x >= 2 && y >= 1 { red } else { Rgb888::BLACK };
                assert_eq!(fb.pixel(x, y), Some(want), "({x}, {y})");
            }
            // Bytes 12..16 of every row are padding.
            assert_eq!(&fb.bytes()[y as usize * 16 + 12..][..4], [0; 4]);
        }
        let Ok(()) = fb.fill_solid(&Rectangle::new(Point::new(-5, -5), Size::new(3, 3)), red);
        assert_eq!(fb.pixel(0, 0), Some(Rgb888::BLACK));
        assert!(Framebuffer::with_geometry(&Geometry {
            stride_bytes: 11,
            ..geometry
        })
        .is_err());
    }

    const FRAME_COLOR: [u8; 3] = [200, 60, 40];

    /// A 40x20 frame of one colour with a mask over x 10..20, y 5..15 and a point at (35, 15).
    fn event() -> MaskEvent {
        let (w, h) = (40, 20);
        let mut data = vec![false; w * h];
        for y in 5..15 {
            for x in 10..20 {
                data[y * w + x] = true;
            }
        }
        let mask = Mask {
            width: w,
            height: h,
            data,
        };
        MaskEvent {
            id: 7,
            frame: 3,
            frame_origin: "test".into(),
            origin: PromptOrigin::Button,
            prompt: Some(Prompt::point(35.0, 15.0)),
            masks: vec![EventMask::new(mask, 0.9, 0.95)],
            latency_ms: 42.0,
            time: SystemTime::now(),
            image: Arc::new(RgbImage::from_pixel(
                w as u32,
                h as u32,
                image::Rgb(FRAME_COLOR),
            )),
        }
    }

    #[test]
    fn draw_event_letterboxes_tints_outlines_and_labels() {
        let mut fb = Framebuffer::new(64, 64, FbPixelFormat::Xrgb8888);
        let Ok(()) = fb.clear(Rgb888::new(1, 2, 3));
        draw_event(&mut fb, &event());
        // A 2:1 frame on a square display: 64x32 from row 16; rows 0..16 and 48..64 are black
        // (away from the status text in the top-left corner).
        for (x, y) in [(0, 63), (32, 50), (63, 63), (63, 15), (40, 48)] {
            assert_eq!(fb.pixel(x, y), Some(Rgb888::BLACK), "letterbox ({x}, {y})");
        }
        // Display x maps to frame (2x + 1) * 40 / 128, y to (2(y - 16) + 1) * 20 / 64.
        let frame = FRAME_COLOR;
        let tint = rgb(MASK_COLORS[0]);
        // Frame (15, 10), well inside the mask: blended toward the tint in every channel.
        let inside = rgb(fb.pixel(24, 32).unwrap());
        assert_eq!(inside, rgb(blend(Rgb888::new(200, 60, 40), MASK_COLORS[0])));
        for c in 0..3 {
            assert!(
                inside[c].abs_diff(tint[c]) < frame[c].abs_diff(tint[c]),
                "{inside:?}"
            );
        }
        // Display x 16 is the first column on frame x 10: the mask's outline, full colour.
        assert_eq!(rgb(fb.pixel(16, 32).unwrap()), tint);
        assert_ne!(rgb(fb.pixel(15, 32).unwrap()), tint);
        // Frame (35, 3): outside the mask, the frame's colour exactly.
        assert_eq!(rgb(fb.pixel(56, 21).unwrap()), frame);
        assert_eq!(rgb(fb.pixel(15, 32).unwrap()), frame);
        // The point (35, 15) lands on display (56, 40): a green marker.
        assert_eq!(fb.pixel(56, 40), Some(FOREGROUND_COLOR));
        // The status text, white on black, in the top-left corner.
        assert_eq!(status_text(&event()), "button 0.90 42ms");
        let white = (2..60)
            .flat_map(|x| (2..12).map(move |y| (x, y)))
            .filter(|&(x, y)| fb.pixel(x, y) == Some(Rgb888::WHITE))
            .count();
        assert!(white > 20, "{white} white pixels of text");
    }

    #[test]
    fn draw_event_pillarboxes_a_tall_frame_in_every_format() {
        let mut tall = event();
        tall.image = Arc::new(RgbImage::from_pixel(10, 40, image::Rgb(FRAME_COLOR)));
        tall.masks.clear();
        tall.prompt = None;
        for format in FORMATS {
            let mut fb = Framebuffer::new(40, 80, format);
            let Ok(()) = fb.clear(Rgb888::WHITE);
            draw_event(&mut fb, &tall);
            // 10x40 on 40x80: 20x80 from column 10.
            let frame = format.unpack(&packed(format, Rgb888::new(200, 60, 40)));
            for y in [20, 79] {
                assert_eq!(fb.pixel(9, y), Some(Rgb888::BLACK), "{format}");
                assert_eq!(fb.pixel(10, y), Some(frame), "{format}");
                assert_eq!(fb.pixel(29, y), Some(frame), "{format}");
                assert_eq!(fb.pixel(30, y), Some(Rgb888::BLACK), "{format}");
            }
        }
        // A frame smaller than the display is scaled up; an empty frame leaves it black.
        let mut fb = Framebuffer::new(8, 8, FbPixelFormat::Rgb888);
        tall.image = Arc::new(RgbImage::new(0, 0));
        draw_event(&mut fb, &tall);
        assert!(fb.bytes().iter().all(|&b| b == 0 || b == 0xff));
    }

    #[test]
    fn viewport_fits_and_centres() {
        let v = Viewport::fit(1920, 1080, 480, 320).unwrap();
        assert_eq!((v.x, v.y, v.width, v.height), (0, 25, 480, 270));
        let v = Viewport::fit(480, 640, 800, 480).unwrap();
        assert_eq!((v.x, v.y, v.width, v.height), (220, 0, 360, 480));
        assert_eq!(Viewport::fit(0, 10, 800, 480), None);
        assert_eq!(sample_map(4, 2), [0, 0, 1, 1]);
        assert_eq!(sample_map(2, 4), [1, 3]);
        assert_eq!(display_range(&[0, 0, 1, 1, 2, 2], 1, 1), 2..4);
    }

    #[test]
    fn device_present_writes_the_whole_buffer() {
        let temp = TempPath::new("fb");
        std::fs::write(&temp.0, b"").unwrap();
        let geometry = Geometry {
            width: 6,
            height: 4,
            format: FbPixelFormat::Rgb565,
            stride_bytes: 16,
        };
        let mut device = FramebufferDevice::open(&temp.0, Some(geometry)).unwrap();
        assert_eq!(device.geometry(), geometry);
        let mut fb = device.framebuffer();
        draw_event(&mut fb, &event());
        device.present(&fb).unwrap();
        assert_eq!(std::fs::read(&temp.0).unwrap(), fb.bytes());
        assert_eq!(fb.bytes().len(), 64);

        let wrong = Framebuffer::new(6, 4, FbPixelFormat::Rgb565);
        let err = device.present(&wrong).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn opening_a_missing_device_says_what_to_check() {
        let temp = TempPath::new("missing");
        let err = FramebufferDevice::open(&temp.0, None).unwrap_err();
        assert!(err.starts_with("no framebuffer at "), "{err}");
        assert!(
            err.contains("config.txt") && err.contains("ls /dev/fb*"),
            "{err}"
        );
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        let err = open_error(Path::new("/dev/fb1"), &denied);
        assert!(err.contains("`video` group"), "{err}");
    }

    #[test]
    fn a_regular_file_without_geometry_is_not_a_framebuffer() {
        let temp = TempPath::new("plain");
        std::fs::write(&temp.0, [0u8; 64]).unwrap();
        let err = FramebufferDevice::open(&temp.0, None).unwrap_err();
        assert!(err.contains("is not a framebuffer device"), "{err}");
        assert!(err.contains("display.format"), "{err}");
    }

    #[test]
    fn screeninfo_layout_and_formats() {
        assert_eq!(std::mem::size_of::<FbVarScreeninfo>(), 160);
        #[cfg(target_pointer_width = "64")]
        assert_eq!(std::mem::size_of::<FbFixScreeninfo>(), 80);
        #[cfg(target_pointer_width = "32")]
        assert_eq!(std::mem::size_of::<FbFixScreeninfo>(), 68);

        let bits = |offset, length| FbBitfield {
            offset,
            length,
            msb_right: 0,
        };
        let var = |bpp, r, g, b| FbVarScreeninfo {
            bits_per_pixel: bpp,
            red: r,
            green: g,
            blue: b,
            ..Default::default()
        };
        let rgb565 = var(16, bits(11, 5), bits(5, 6), bits(0, 5));
        assert_eq!(pixel_format(&rgb565), Ok(FbPixelFormat::Rgb565));
        let xrgb = var(32, bits(16, 8), bits(8, 8), bits(0, 8));
        assert_eq!(pixel_format(&xrgb), Ok(FbPixelFormat::Xrgb8888));
        let rgb888 = var(24, bits(16, 8), bits(8, 8), bits(0, 8));
        assert_eq!(pixel_format(&rgb888), Ok(FbPixelFormat::Rgb888));
        let bgr = var(32, bits(0, 8), bits(8, 8), bits(16, 8));
        let err = pixel_format(&bgr).unwrap_err();
        assert!(
            err.starts_with("unsupported pixel format: 32 bits"),
            "{err}"
        );
        assert!(pixel_format(&var(8, bits(0, 8), bits(0, 8), bits(0, 8))).is_err());
    }

    #[test]
    fn config_defaults_parsing_and_validation() {
        let config = DisplayConfig::default();
        assert!(!config.enabled);
        assert_eq!(config.device, "/dev/fb0");
        assert_eq!((config.width, config.height, config.format), (0, 0, None));
        assert_eq!(config.min_interval_ms, 100);
        config.validate().unwrap();

        let parsed: DisplayConfig = toml::from_str(
            "enabled = true\ndevice = \"/dev/fb1\"\nwidth = 480\nheight = 320\nformat = \"rgb565\"",
        )
        .unwrap();
        assert_eq!(parsed.format, Some(FbPixelFormat::Rgb565));
        assert_eq!(parsed.min_interval_ms, 100);
        parsed.validate().unwrap();
        assert!(toml::from_str::<DisplayConfig>("format = \"bgr565\"").is_err());
        let round_trip: DisplayConfig = toml::from_str(&toml::to_string(&parsed).unwrap()).unwrap();
        assert_eq!(round_trip, parsed);

        let bad = |c: DisplayConfig| c.validate().unwrap_err();
        assert!(bad(DisplayConfig {
            device: " ".into(),
            ..Default::default()
        })
        .contains("display.device is empty"));
        assert!(bad(DisplayConfig {
            width: 480,
            ..Default::default()
        })
        .contains("go together"));
        assert!(bad(DisplayConfig {
            width: 480,
            height: 320,
            ..Default::default()
        })
        .contains("display.format go together"));
        assert!(bad(DisplayConfig {
            format: Some(FbPixelFormat::Rgb565),
            ..Default::default()
        })
        .contains("display.format go together"));
        assert!(bad(DisplayConfig {
            device: MEMORY_DEVICE.into(),
            width: 100_000,
            height: 10,
            ..Default::default()
        })
        .contains("too large"));
        // "memory" needs nothing else.
        let memory = DisplayConfig {
            device: MEMORY_DEVICE.into(),
            ..Default::default()
        };
        memory.validate().unwrap();
        let sink = DisplaySink::open(&memory).unwrap();
        assert_eq!(
            sink.framebuffer().geometry(),
            Geometry {
                width: 640,
                height: 480,
                format: FbPixelFormat::Xrgb8888,
                stride_bytes: 2560
            }
        );
    }

    #[test]
    fn sink_rate_limits_newest_event_wins() {
        let config = DisplayConfig {
            enabled: true,
            device: MEMORY_DEVICE.into(),
            width: 64,
            height: 64,
            ..Default::default()
        };
        let mut sink = DisplaySink::open(&config).unwrap();
        assert_eq!(sink.name(), "display");
        let blank = sink.framebuffer().clone();
        let t0 = Instant::now();
        let first = event();
        let mut second = event();
        second.image = Arc::new(RgbImage::from_pixel(40, 20, image::Rgb([0, 90, 0])));
        let mut third = event();
        third.image = Arc::new(RgbImage::from_pixel(40, 20, image::Rgb([0, 0, 90])));
        let at = |ms| t0 + Duration::from_millis(ms);
        let colour = |sink: &DisplaySink| rgb(sink.framebuffer().pixel(56, 21).unwrap());

        sink.emit_at(&first, at(0)).unwrap();
        assert_ne!(sink.framebuffer(), &blank);
        assert_eq!(colour(&sink), FRAME_COLOR);
        // Within 100 ms: kept, not drawn; the third replaces the second.
        sink.emit_at(&second, at(10)).unwrap();
        sink.emit_at(&third, at(20)).unwrap();
        assert_eq!((sink.drawn(), sink.skipped()), (1, 1));
        assert_eq!(colour(&sink), FRAME_COLOR);
        // Shutdown draws the one kept.
        sink.flush().unwrap();
        assert_eq!((sink.drawn(), sink.skipped()), (2, 1));
        assert_eq!(colour(&sink), [0, 0, 90]);
        sink.flush().unwrap();
        assert_eq!(sink.drawn(), 2);
        // After the interval the next event draws at once, the kept one is dropped.
        let last = sink.last_draw.unwrap();
        sink.emit_at(&second, last + Duration::from_millis(50))
            .unwrap();
        sink.emit_at(&first, last + Duration::from_millis(100))
            .unwrap();
        assert_eq!((sink.drawn(), sink.skipped()), (3, 2));
        assert_eq!(colour(&sink), FRAME_COLOR);
        assert_eq!(sink.dropped(), 0);
    }

    #[test]
    fn sink_presents_to_a_file_and_reports_write_errors() {
        let temp = TempPath::new("sink");
        std::fs::write(&temp.0, b"stale").unwrap();
        let config = DisplayConfig {
            enabled: true,
            device: temp.0.to_str().unwrap().into(),
            width: 48,
            height: 32,
            format: Some(FbPixelFormat::Rgb565),
            min_interval_ms: 0,
        };
        let mut sink = DisplaySink::open(&config).unwrap();
        // Opening clears the display.
        assert_eq!(std::fs::read(&temp.0).unwrap(), vec![0; 48 * 32 * 2]);
        sink.emit(&event()).unwrap();
        sink.emit(&event()).unwrap();
        assert_eq!(sink.drawn(), 2);
        assert_eq!(std::fs::read(&temp.0).unwrap(), sink.framebuffer().bytes());

        // A device that refuses writes: an error for this event, the sink carries on.
        if cfg!(target_os = "linux") && Path::new("/dev/full").exists() {
            let mut full = FramebufferDevice::open(
                Path::new("/dev/full"),
                Some(Geometry::new(48, 32, FbPixelFormat::Rgb565)),
            )
            .unwrap();
            assert!(full.present(sink.framebuffer()).is_err());
            sink.device = Some(full);
            let err = sink.emit(&event()).unwrap_err();
            assert_eq!(err.sink, "display");
            assert!(err.reason.contains("/dev/full"), "{err}");
            assert_eq!(sink.drawn(), 3);
        }
    }
}
