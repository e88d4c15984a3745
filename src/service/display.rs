//! The overlay on a display: an SPI or HDMI screen behind a Linux framebuffer device (`/dev/fbN`),
//! drawn with embedded-graphics.
//!
//! - [`Framebuffer`] is an in-memory picture in the device's pixel format (RGB565, XRGB8888 or
//!   RGB888, little-endian as fbdev stores them) and an embedded-graphics [`DrawTarget`].
//! - [`draw_event`] draws one [`MaskEvent`] into it: the frame scaled to fit (letterboxed), the
//!   masks tinted and outlined, the prompts marked, a status line in the top-left corner.
//! - [`FramebufferDevice`] asks the kernel for the display's geometry and writes whole pictures to
//!   it (or to a regular file, given the geometry).
//! - [`DisplaySink`] is the [`Sink`] that ties them together, at most one redraw per
//!   [`DisplayConfig::min_interval_ms`].

use std::convert::Infallible;
use std::fmt;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use embedded_graphics::geometry::{Dimensions, OriginDimensions, Point, Size};
use embedded_graphics::mono_font::ascii::{FONT_10X20, FONT_6X10};
use embedded_graphics::mono_font::MonoTextStyleBuilder;
use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::prelude::{DrawTarget, Pixel, Primitive, RgbColor};
use embedded_graphics::primitives::{Circle, PrimitiveStyleBuilder, Rectangle};
use embedded_graphics::text::{Baseline, Text};
use embedded_graphics::Drawable;
use serde::{Deserialize, Serialize};

use super::sink::{MaskEvent, PromptOrigin, Sink, SinkError};
use crate::overlay::{on_outline, point_marker_style, FOREGROUND_COLOR, MASK_COLORS, MASK_OPACITY};
use crate::postprocess::Mask;

/// The value of [`DisplayConfig::device`] that draws into memory and presents nothing.
pub const MEMORY_DEVICE: &str = "memory";
/// Size of the in-memory display when [`DisplayConfig::width`] / `height` are 0.
pub const MEMORY_DEFAULT_SIZE: (u32, u32) = (640, 480);
/// Largest width or height accepted in a [`DisplayConfig`].
pub const MAX_DISPLAY_SIDE: u32 = 8192;

/// How a framebuffer stores a pixel. All three are little-endian with red in the high bits, the
/// layouts fbdev drivers report with `red.offset` > `blue.offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FbPixelFormat {
    /// 16 bits: red in bits 11..16, green in 5..11, blue in 0..5, stored low byte first. Most SPI
    /// displays (fbtft, `dtoverlay=piscreen`, ...) and the Pi's HDMI framebuffer at its default
    /// `framebuffer_depth=16`.
    Rgb565,
    /// 32 bits: bytes blue, green, red, then one unused byte (written as 0xff, opaque for drivers
    /// that read it as alpha). HDMI framebuffers at depth 32.
    Xrgb8888,
    /// 24 bits: bytes blue, green, red.
    Rgb888,
}

impl FbPixelFormat {
    /// Bytes one pixel takes.
    pub fn bytes_per_pixel(self) -> usize {
        match self {
            FbPixelFormat::Rgb565 => 2,
            FbPixelFormat::Xrgb8888 => 4,
            FbPixelFormat::Rgb888 => 3,
        }
    }

    /// The name used in the config (`"rgb565"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            FbPixelFormat::Rgb565 => "rgb565",
            FbPixelFormat::Xrgb8888 => "xrgb8888",
            FbPixelFormat::Rgb888 => "rgb888",
        }
    }

    /// Writes `color` into `out` (exactly [`Self::bytes_per_pixel`] bytes).
    fn pack(self, color: Rgb888, out: &mut [u8]) {
        let (r, g, b) = (color.r(), color.g(), color.b());
        match self {
            FbPixelFormat::Rgb565 => {
                let v = (u16::from(r >> 3) << 11) | (u16::from(g >> 2) << 5) | u16::from(b >> 3);
                out.copy_from_slice(&v.to_le_bytes());
            }
            FbPixelFormat::Xrgb8888 => out.copy_from_slice(&[b, g, r, 0xff]),
            FbPixelFormat::Rgb888 => out.copy_from_slice(&[b, g, r]),
        }
    }

    /// Reads the pixel at the start of `bytes`. RGB565 channels are widened by repeating their
    /// high bits (31 → 255, 0 → 0), so packing an unpacked pixel gives the same bytes back.
    fn unpack(self, bytes: &[u8]) -> Rgb888 {
        match self {
            FbPixelFormat::Rgb565 => {
                let v = u16::from_le_bytes([bytes[0], bytes[1]]);
                let r = ((v >> 11) & 0x1f) as u8;
                let g = ((v >> 5) & 0x3f) as u8;
                let b = (v & 0x1f) as u8;
                Rgb888::new(
                    (r << 3) | (r >> 2),
                    (g << 2) | (g >> 4),
                    (b << 3) | (b >> 2),
                )
            }
            FbPixelFormat::Xrgb8888 | FbPixelFormat::Rgb888 => {
                Rgb888::new(bytes[2], bytes[1], bytes[0])
            }
        }
    }
}

impl fmt::Display for FbPixelFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The shape of a framebuffer's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Visible pixels per row.
    pub width: u32,
    /// Visible rows.
    pub height: u32,
    pub format: FbPixelFormat,
    /// Bytes from the start of one row to the next (the driver's `line_length`, which may include
    /// padding); 0 means rows are packed: `width * bytes_per_pixel`.
    pub stride_bytes: usize,
}

impl Geometry {
    /// A geometry with packed rows.
    pub fn new(width: u32, height: u32, format: FbPixelFormat) -> Self {
        Geometry {
            width,
            height,
            format,
            stride_bytes: 0,
        }
    }

    /// The stride resolved (0 replaced by the packed row size) and checked, with the total size.
    fn resolve(&self) -> Result<(Geometry, usize), String> {
        let row = (self.width as usize)
            .checked_mul(self.format.bytes_per_pixel())
            .ok_or_else(|| format!("a {}-pixel row does not fit in memory", self.width))?;
        let stride = if self.stride_bytes == 0 {
            row
        } else {
            self.stride_bytes
        };
        if stride < row {
            return Err(format!(
                "a row stride of {stride} bytes is shorter than {} {} pixels ({row} bytes)",
                self.width, self.format
            ));
        }
        let total = stride.checked_mul(self.height as usize).ok_or_else(|| {
            format!(
                "a {}x{} framebuffer does not fit in memory",
                self.width, self.height
            )
        })?;
        let resolved = Geometry {
            stride_bytes: stride,
            ..*self
        };
        Ok((resolved, total))
    }
}

impl fmt::Display for Geometry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}x{} {} ({} bytes a row)",
            self.width, self.height, self.format, self.stride_bytes
        )
    }
}

/// A picture in a framebuffer's pixel format, in memory: what [`draw_event`] draws into and
/// [`FramebufferDevice::present`] writes out. An embedded-graphics draw target; pixels outside
/// it are clipped. Padding bytes at the end of rows stay 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Framebuffer {
    width: u32,
    height: u32,
    stride_bytes: usize,
    format: FbPixelFormat,
    buffer: Vec<u8>,
}

impl Framebuffer {
    /// A black framebuffer with packed rows.
    ///
    /// # Panics
    /// If `width * height * bytes_per_pixel` overflows `usize`.
    pub fn new(width: u32, height: u32, format: FbPixelFormat) -> Self {
        Self::with_geometry(&Geometry::new(width, height, format))
            .unwrap_or_else(|e| panic!("Framebuffer::new: {e}"))
    }

    /// A black framebuffer of that geometry (its stride may include padding).
    pub fn with_geometry(geometry: &Geometry) -> Result<Self, String> {
        let (g, total) = geometry.resolve()?;
        let mut fb = Framebuffer {
            width: g.width,
            height: g.height,
            stride_bytes: g.stride_bytes,
            format: g.format,
            buffer: vec![0; total],
        };
        let Ok(()) = fb.clear(Rgb888::BLACK);
        Ok(fb)
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    /// Bytes from one row to the next.
    pub fn stride_bytes(&self) -> usize {
        self.stride_bytes
    }

    pub fn format(&self) -> FbPixelFormat {
        self.format
    }

    /// The geometry, stride resolved.
    pub fn geometry(&self) -> Geometry {
        Geometry {
            width: self.width,
            height: self.height,
            format: self.format,
            stride_bytes: self.stride_bytes,
        }
    }

    /// The colour at (x, y), unpacked from the pixel format; `None` outside.
    pub fn pixel(&self, x: u32, y: u32) -> Option<Rgb888> {
        let at = self.offset(x, y)?;
        Some(self.format.unpack(&self.buffer[at..]))
    }

    /// The raw memory, `stride_bytes * height` bytes, as the device takes it.
    pub fn bytes(&self) -> &[u8] {
        &self.buffer
    }

    fn offset(&self, x: u32, y: u32) -> Option<usize> {
        (x < self.width && y < self.height)
            .then(|| y as usize * self.stride_bytes + x as usize * self.format.bytes_per_pixel())
    }

    /// The bytes of `len` pixels of row `y` from column `x` (in bounds: the caller clips).
    fn span_mut(&mut self, x: u32, y: u32, len: usize) -> &mut [u8] {
        let bpp = self.format.bytes_per_pixel();
        let start = y as usize * self.stride_bytes + x as usize * bpp;
        &mut self.buffer[start..start + len * bpp]
    }

    /// Packs `colors` into row `y` from column `x` (in bounds: the caller clips).
    fn write_span(&mut self, x: u32, y: u32, colors: &[Rgb888]) {
        let format = self.format;
        let bpp = format.bytes_per_pixel();
        let span = self.span_mut(x, y, colors.len());
        for (out, &color) in span.chunks_exact_mut(bpp).zip(colors) {
            format.pack(color, out);
        }
    }
}

impl OriginDimensions for Framebuffer {
    fn size(&self) -> Size {
        Size::new(self.width, self.height)
    }
}

impl DrawTarget for Framebuffer {
    type Color = Rgb888;
    type Error = Infallible;

    fn draw_iter<I>(&mut self, pixels: I) -> Result<(), Self::Error>
    where
        I: IntoIterator<Item = Pixel<Self::Color>>,
    {
        let bpp = self.format.bytes_per_pixel();
        for Pixel(p, color) in pixels {
            if p.x < 0 || p.y < 0 {
                continue;
            }
            if let Some(at) = self.offset(p.x as u32, p.y as u32) {
                self.format.pack(color, &mut self.buffer[at..at + bpp]);
            }
        }
        Ok(())
    }

    fn fill_solid(&mut self, area: &Rectangle, color: Self::Color) -> Result<(), Self::Error> {
        let area = area.intersection(&self.bounding_box());
        if area.is_zero_sized() {
            return Ok(());
        }
        let bpp = self.format.bytes_per_pixel();
        let mut packed = [0u8; 4];
        self.format.pack(color, &mut packed[..bpp]);
        let (x, width) = (area.top_left.x as u32, area.size.width as usize);
        for y in area.rows() {
            for out in self.span_mut(x, y as u32, width).chunks_exact_mut(bpp) {
                out.copy_from_slice(&packed[..bpp]);
            }
        }
        Ok(())
    }
}

/// Where the frame lands on the display: the largest rectangle of the frame's aspect ratio that
/// fits, centred.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Viewport {
    x: u32,
    y: u32,
    width: u32,
    height: u32,
    frame_width: u32,
    frame_height: u32,
}

impl Viewport {
    /// `None` for an empty frame or display.
    fn fit(frame_width: u32, frame_height: u32, width: u32, height: u32) -> Option<Self> {
        if frame_width == 0 || frame_height == 0 || width == 0 || height == 0 {
            return None;
        }
        let (fw, fh, w, h) = (
            u64::from(frame_width),
            u64::from(frame_height),
            u64::from(width),
            u64::from(height),
        );
        let (vw, vh) = if fw * h >= fh * w {
            (w, ((fh * w + fw / 2) / fw).clamp(1, h))
        } else {
            (((fw * h + fh / 2) / fh).clamp(1, w), h)
        };
        Some(Viewport {
            x: ((w - vw) / 2) as u32,
            y: ((h - vh) / 2) as u32,
            width: vw as u32,
            height: vh as u32,
            frame_width,
            frame_height,
        })
    }

    /// A point in frame pixels, on the display.
    fn to_display(self, x: f64, y: f64) -> Point {
        let sx = f64::from(self.width) / f64::from(self.frame_width);
        let sy = f64::from(self.height) / f64::from(self.frame_height);
        Point::new(
            (f64::from(self.x) + x * sx).round() as i32,
            (f64::from(self.y) + y * sy).round() as i32,
        )
    }
}

/// For each of `dst` display pixels, the source pixel (of `src`) under its centre: nearest
/// neighbour sampling.
fn sample_map(dst: u32, src: usize) -> Vec<usize> {
    let (dst, src64) = (dst as u64, src as u64);
    (0..dst)
        .map(|i| (((2 * i + 1) * src64 / (2 * dst)) as usize).min(src.saturating_sub(1)))
        .collect()
}

/// The display pixels whose source pixel lies in `lo..=hi` (the map is non-decreasing).
fn display_range(map: &[usize], lo: usize, hi: usize) -> Range<usize> {
    map.partition_point(|&s| s < lo)..map.partition_point(|&s| s <= hi)
}

/// One mask resampled to the viewport.
struct MaskView<'a> {
    mask: &'a Mask,
    cols: Vec<usize>,
    rows: Vec<usize>,
    /// Viewport columns and rows that can be inside (from the mask's bounding box).
    x_range: Range<usize>,
    y_range: Range<usize>,
    color: Rgb888,
}

impl<'a> MaskView<'a> {
    /// `None` for an empty or malformed mask. `bbox` is `[x, y, w, h]` with inclusive extents
    /// (`x..=x + w`), as [`Mask::bbox_xywh`] gives it.
    fn new(mask: &'a Mask, bbox: [u32; 4], color: Rgb888, view: &Viewport) -> Option<Self> {
        if mask.width == 0 || mask.height == 0 || mask.data.len() != mask.width * mask.height {
            return None;
        }
        let cols = sample_map(view.width, mask.width);
        let rows = sample_map(view.height, mask.height);
        let [bx, by, bw, bh] = bbox.map(|v| v as usize);
        let x_range = display_range(&cols, bx, (bx + bw).min(mask.width - 1));
        let y_range = display_range(&rows, by, (by + bh).min(mask.height - 1));
        Some(MaskView {
            mask,
            cols,
            rows,
            x_range,
            y_range,
            color,
        })
    }

    fn inside(&self, x: usize, y: usize) -> bool {
        self.mask.data[self.rows[y] * self.mask.width + self.cols[x]]
    }

    /// Whether an inside pixel is on the outline: next to an outside pixel or the frame's edge,
    /// in display pixels (so the outline stays one display pixel wide at any scale).
    fn on_edge(&self, x: usize, y: usize) -> bool {
        on_outline(x, y, self.cols.len(), self.rows.len(), |x, y| {
            self.inside(x, y)
        })
    }
}

/// `over` blended onto `under` at `MASK_OPACITY`, as [`crate::overlay::ImageCanvas`] blends.
fn blend(under: Rgb888, over: Rgb888) -> Rgb888 {
    let a = u16::from(MASK_OPACITY);
    let mix = |d: u8, s: u8| ((u16::from(s) * a + u16::from(d) * (255 - a) + 127) / 255) as u8;
    Rgb888::new(
        mix(under.r(), over.r()),
        mix(under.g(), over.g()),
        mix(under.b(), over.b()),
    )
}

/// Draws one event over the whole framebuffer:
///
/// - the frame scaled to the largest size that fits with its aspect ratio kept, centred, the
///   rest black (letterbox or pillarbox). Scaling is nearest neighbour: one source lookup per
///   display pixel, crisp mask edges, no filtering cost on a Pi;
/// - each mask tinted with [`MASK_COLORS`] at [`MASK_OPACITY`] and outlined in its full colour,
///   in display pixels (the same look as [`crate::overlay::draw_overlay`], but the outline stays
///   visible when the frame is shrunk);
/// - the prompt's points (green foreground, red background) and box;
/// - a status line in the top-left corner: the prompt's source, its detector label, the best
///   predicted IoU, the number of masks when not one, the latency.
///
/// Cost: one pass over the display pixels, plus, per mask, the display pixels of its bounding
/// box; nothing proportional to the frame's size.
pub fn draw_event(fb: &mut Framebuffer, event: &MaskEvent) {
    let image = &*event.image;
    let Some(view) = Viewport::fit(image.width(), image.height(), fb.width, fb.height) else {
        let Ok(()) = fb.clear(Rgb888::BLACK);
        draw_status(fb, event);
        return;
    };
    // Letterbox: the bands above, below, left and right of the viewport.
    let (vx, vy, vw, vh) = (view.x, view.y, view.width, view.height);
    let bands = [
        Rectangle::new(Point::zero(), Size::new(fb.width, vy)),
        Rectangle::new(
            Point::new(0, (vy + vh) as i32),
            Size::new(fb.width, fb.height - vy - vh),
        ),
        Rectangle::new(Point::new(0, vy as i32), Size::new(vx, vh)),
        Rectangle::new(
            Point::new((vx + vw) as i32, vy as i32),
            Size::new(fb.width - vx - vw, vh),
        ),
    ];
    for band in &bands {
        let Ok(()) = fb.fill_solid(band, Rgb888::BLACK);
    }

    let (iw, ih) = (image.width() as usize, image.height() as usize);
    let raw = image.as_raw();
    let src_cols: Vec<usize> = sample_map(vw, iw).into_iter().map(|x| 3 * x).collect();
    let src_rows = sample_map(vh, ih);
    let views: Vec<MaskView> = event
        .masks
        .iter()
        .enumerate()
        .filter(|(_, m)| m.area > 0)
        .filter_map(|(i, m)| {
            MaskView::new(&m.mask, m.bbox, MASK_COLORS[i % MASK_COLORS.len()], &view)
        })
        .collect();

    let mut row = vec![Rgb888::BLACK; vw as usize];
    for (y, &sy) in src_rows.iter().enumerate() {
        let src = &raw[sy * iw * 3..(sy + 1) * iw * 3];
        for (out, &sx) in row.iter_mut().zip(&src_cols) {
            *out = Rgb888::new(src[sx], src[sx + 1], src[sx + 2]);
        }
        for mv in views.iter().filter(|mv| mv.y_range.contains(&y)) {
            for x in mv.x_range.clone() {
                if mv.inside(x, y) {
                    row[x] = if mv.on_edge(x, y) {
                        mv.color
                    } else {
                        blend(row[x], mv.color)
                    };
                }
            }
        }
        fb.write_span(vx, vy + y as u32, &row);
    }

    draw_prompts(fb, &view, event);
    draw_status(fb, event);
}

fn draw_prompts(fb: &mut Framebuffer, view: &Viewport, event: &MaskEvent) {
    let Some(prompt) = &event.prompt else {
        return;
    };
    let short_side = view.width.min(view.height);
    let radius = (short_side / 80).max(3);
    let stroke = (short_side / 300).max(1);
    if let Some(b) = prompt.bbox {
        let style = PrimitiveStyleBuilder::new()
            .stroke_color(FOREGROUND_COLOR)
            .stroke_width(stroke)
            .build();
        let Ok(()) =
            Rectangle::with_corners(view.to_display(b.x0, b.y0), view.to_display(b.x1, b.y1))
                .into_styled(style)
                .draw(fb);
    }
    for p in &prompt.points {
        let style = point_marker_style(p.label, stroke);
        let Ok(()) = Circle::with_center(view.to_display(p.x, p.y), 2 * radius + 1)
            .into_styled(style)
            .draw(fb);
    }
}

/// The status line: `"detector person 0.93 3 masks 84ms"`.
fn status_text(event: &MaskEvent) -> String {
    let mut text = event.origin.kind().to_string();
    if let PromptOrigin::Detector { label: Some(label) } = &event.origin {
        text.push(' ');
        text.push_str(label);
    }
    let best = event.masks.iter().map(|m| m.score).fold(f32::NAN, f32::max);
    match event.masks.len() {
        0 => text.push_str(" no mask"),
        1 => text.push_str(&format!(" {best:.2}")),
        n => text.push_str(&format!(" {best:.2} {n} masks")),
    }
    text.push_str(&format!(" {:.0}ms", event.latency_ms));
    text
}

fn draw_status(fb: &mut Framebuffer, event: &MaskEvent) {
    let font = if fb.width >= 1024 {
        &FONT_10X20
    } else {
        &FONT_6X10
    };
    let style = MonoTextStyleBuilder::new()
        .font(font)
        .text_color(Rgb888::WHITE)
        .background_color(Rgb888::BLACK)
        .build();
    let Ok(_) =
        Text::with_baseline(&status_text(event), Point::new(2, 2), style, Baseline::Top).draw(fb);
}

/// A clear message for a framebuffer that could not be opened.
fn open_error(path: &Path, error: &io::Error) -> String {
    let path = path.display();
    match error.kind() {
        io::ErrorKind::NotFound => format!(
            "no framebuffer at {path}: enable the display's overlay in config.txt (e.g. \
             dtoverlay=... for an SPI display) / check `ls /dev/fb*`"
        ),
        io::ErrorKind::PermissionDenied => format!(
            "cannot open {path} for writing: permission denied: add the user to the `video` \
             group (sudo usermod -aG video $USER, then log in again)"
        ),
        _ => format!("cannot open {path}: {error}"),
    }
}

/// The fbdev interface: `<linux/fb.h>` structs and ioctls. Only Linux asks a device; elsewhere
/// the structs are only used by the tests.
#[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
mod fbdev {
    use std::fs::File;
    use std::io;
    use std::path::Path;

    use super::{FbPixelFormat, Geometry};

    /// `struct fb_bitfield` of `<linux/fb.h>`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub(super) struct FbBitfield {
        pub(super) offset: u32,
        pub(super) length: u32,
        pub(super) msb_right: u32,
    }

    /// `struct fb_var_screeninfo` of `<linux/fb.h>` (160 bytes).
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub(super) struct FbVarScreeninfo {
        pub(super) xres: u32,
        pub(super) yres: u32,
        pub(super) xres_virtual: u32,
        pub(super) yres_virtual: u32,
        pub(super) xoffset: u32,
        pub(super) yoffset: u32,
        pub(super) bits_per_pixel: u32,
        pub(super) grayscale: u32,
        pub(super) red: FbBitfield,
        pub(super) green: FbBitfield,
        pub(super) blue: FbBitfield,
        pub(super) transp: FbBitfield,
        pub(super) nonstd: u32,
        pub(super) activate: u32,
        pub(super) height: u32,
        pub(super) width: u32,
        pub(super) accel_flags: u32,
        pub(super) pixclock: u32,
        pub(super) left_margin: u32,
        pub(super) right_margin: u32,
        pub(super) upper_margin: u32,
        pub(super) lower_margin: u32,
        pub(super) hsync_len: u32,
        pub(super) vsync_len: u32,
        pub(super) sync: u32,
        pub(super) vmode: u32,
        pub(super) rotate: u32,
        pub(super) colorspace: u32,
        pub(super) reserved: [u32; 4],
    }

    /// `struct fb_fix_screeninfo` of `<linux/fb.h>` (80 bytes on 64-bit targets, 68 on 32-bit).
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub(super) struct FbFixScreeninfo {
        pub(super) id: [u8; 16],
        pub(super) smem_start: libc::c_ulong,
        pub(super) smem_len: u32,
        pub(super) type_: u32,
        pub(super) type_aux: u32,
        pub(super) visual: u32,
        pub(super) xpanstep: u16,
        pub(super) ypanstep: u16,
        pub(super) ywrapstep: u16,
        pub(super) line_length: u32,
        pub(super) mmio_start: libc::c_ulong,
        pub(super) mmio_len: u32,
        pub(super) accel: u32,
        pub(super) capabilities: u16,
        pub(super) reserved: [u16; 2],
    }

    /// `FBIOGET_VSCREENINFO` of `<linux/fb.h>`.
    const FBIOGET_VSCREENINFO: u32 = 0x4600;
    /// `FBIOGET_FSCREENINFO` of `<linux/fb.h>`.
    const FBIOGET_FSCREENINFO: u32 = 0x4602;
    /// `FB_TYPE_PACKED_PIXELS` of `<linux/fb.h>`.
    const FB_TYPE_PACKED_PIXELS: u32 = 0;

    /// The pixel format a driver reports, if it is one we draw.
    pub(super) fn pixel_format(var: &FbVarScreeninfo) -> Result<FbPixelFormat, String> {
        let channels = |r: (u32, u32), g: (u32, u32), b: (u32, u32)| {
            (var.red.offset, var.red.length) == r
                && (var.green.offset, var.green.length) == g
                && (var.blue.offset, var.blue.length) == b
                && var.red.msb_right == 0
                && var.green.msb_right == 0
                && var.blue.msb_right == 0
        };
        let format = match var.bits_per_pixel {
            16 if channels((11, 5), (5, 6), (0, 5)) => Some(FbPixelFormat::Rgb565),
            24 if channels((16, 8), (8, 8), (0, 8)) => Some(FbPixelFormat::Rgb888),
            32 if channels((16, 8), (8, 8), (0, 8)) => Some(FbPixelFormat::Xrgb8888),
            _ => None,
        };
        format.ok_or_else(|| {
            format!(
                "unsupported pixel format: {} bits per pixel, red {} bits at bit {}, green {} at {}, \
                 blue {} at {}; supported: rgb565 (16 bits), rgb888 (24), xrgb8888 (32), red in the \
                 high bits (on a Pi, set framebuffer_depth=16 or 32 in config.txt)",
                var.bits_per_pixel,
                var.red.length,
                var.red.offset,
                var.green.length,
                var.green.offset,
                var.blue.length,
                var.blue.offset
            )
        })
    }

    /// A message for a failed framebuffer ioctl.
    fn ioctl_error(path: &Path, request: &str, error: &io::Error) -> String {
        let path = path.display();
        if error.raw_os_error() == Some(libc::ENOTTY) || error.raw_os_error() == Some(libc::EINVAL)
        {
            format!(
                "{path} is not a framebuffer device ({request}: {error}); to write into a regular \
                 file, give display.width, display.height and display.format"
            )
        } else {
            format!("{request} on {path}: {error}")
        }
    }

    /// The geometry the driver reports, and the byte offset of the visible (panned) area.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    pub(super) fn query_geometry(file: &File, path: &Path) -> Result<(Geometry, u64), String> {
        use std::os::fd::AsRawFd;

        let fd = file.as_raw_fd();
        let mut var = FbVarScreeninfo::default();
        // SAFETY: FBIOGET_VSCREENINFO writes one `struct fb_var_screeninfo` through its argument;
        // `var` is that struct (repr(C), laid out as in <linux/fb.h>) and outlives the call. Any other
        // file answers ENOTTY (or EINVAL) without writing.
        let rc = unsafe {
            libc::ioctl(
                fd,
                FBIOGET_VSCREENINFO as _,
                &mut var as *mut FbVarScreeninfo,
            )
        };
        if rc != 0 {
            let error = io::Error::last_os_error();
            return Err(ioctl_error(path, "FBIOGET_VSCREENINFO", &error));
        }
        let mut fix = FbFixScreeninfo::default();
        // SAFETY: as above, for FBIOGET_FSCREENINFO and `struct fb_fix_screeninfo`.
        let rc = unsafe {
            libc::ioctl(
                fd,
                FBIOGET_FSCREENINFO as _,
                &mut fix as *mut FbFixScreeninfo,
            )
        };
        if rc != 0 {
            let error = io::Error::last_os_error();
            return Err(ioctl_error(path, "FBIOGET_FSCREENINFO", &error));
        }
        let show = path.display();
        if fix.type_ != FB_TYPE_PACKED_PIXELS {
            return Err(format!(
                "{show}: unsupported framebuffer type {} (only packed pixels are drawn)",
                fix.type_
            ));
        }
        let format = pixel_format(&var).map_err(|e| format!("{show}: {e}"))?;
        if var.xres == 0 || var.yres == 0 {
            return Err(format!(
                "{show} reports a {}x{} display",
                var.xres, var.yres
            ));
        }
        let geometry = Geometry {
            width: var.xres,
            height: var.yres,
            format,
            stride_bytes: fix.line_length as usize,
        };
        let (geometry, total) = geometry.resolve().map_err(|e| format!("{show}: {e}"))?;
        let offset = u64::from(var.yoffset) * geometry.stride_bytes as u64
            + u64::from(var.xoffset) * format.bytes_per_pixel() as u64;
        if fix.smem_len != 0 && offset + total as u64 > u64::from(fix.smem_len) {
            return Err(format!(
                "{show}: {geometry} at offset {offset} does not fit its {} bytes of memory",
                fix.smem_len
            ));
        }
        Ok((geometry, offset))
    }

    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    pub(super) fn query_geometry(_file: &File, path: &Path) -> Result<(Geometry, u64), String> {
        Err(format!(
            "{}: asking a framebuffer for its geometry needs Linux; give display.width, \
             display.height and display.format",
            path.display()
        ))
    }
}

/// A framebuffer device (`/dev/fbN`), or a regular file given an explicit geometry.
#[derive(Debug)]
pub struct FramebufferDevice {
    file: File,
    path: PathBuf,
    geometry: Geometry,
    /// Where the visible area starts (panning); 0 for an explicit geometry.
    offset: u64,
}

impl FramebufferDevice {
    /// Opens `path` read-write. Without `geometry` the driver is asked (FBIOGET_VSCREENINFO,
    /// FBIOGET_FSCREENINFO), which fails clearly on anything but a framebuffer of a supported
    /// pixel format; with it, the file is taken as that geometry from offset 0, which also lets a
    /// regular file stand in for a device.
    pub fn open(path: &Path, geometry: Option<Geometry>) -> Result<Self, String> {
        let file = File::options()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| open_error(path, &e))?;
        let (geometry, offset) = match geometry {
            Some(g) => {
                let (g, _) = g
                    .resolve()
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                (g, 0)
            }
            None => fbdev::query_geometry(&file, path)?,
        };
        Ok(FramebufferDevice {
            file,
            path: path.to_path_buf(),
            geometry,
            offset,
        })
    }

    /// The geometry, stride resolved.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A black in-memory framebuffer of the device's geometry.
    pub fn framebuffer(&self) -> Framebuffer {
        Framebuffer::with_geometry(&self.geometry).expect("the geometry was checked at open")
    }

    /// Writes the whole picture (one `pwrite` of `stride * height` bytes). `fb` must have the
    /// device's geometry.
    pub fn present(&mut self, fb: &Framebuffer) -> io::Result<()> {
        if fb.geometry() != self.geometry {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "framebuffer is {}, {} is {}",
                    fb.geometry(),
                    self.path.display(),
                    self.geometry
                ),
            ));
        }
        write_all_at(&self.file, fb.bytes(), self.offset)
    }
}

#[cfg(unix)]
fn write_all_at(file: &File, bytes: &[u8], offset: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(bytes, offset)
}

#[cfg(not(unix))]
fn write_all_at(mut file: &File, bytes: &[u8], offset: u64) -> io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    file.seek(SeekFrom::Start(offset))?;
    file.write_all(bytes)
}

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
    #[serde(with = "super::config::empty_is_none")]
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

    use image::RgbImage;

    use super::fbdev::{pixel_format, FbBitfield, FbFixScreeninfo, FbVarScreeninfo};
    use super::*;
    use crate::prompt::Prompt;
    use crate::service::sink::EventMask;

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
