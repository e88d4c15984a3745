//! The in-memory picture in the display's pixel format, an embedded-graphics draw target.

use std::convert::Infallible;
use std::fmt;

use embedded_graphics::geometry::{Dimensions, OriginDimensions, Size};
use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::prelude::{DrawTarget, Pixel, RgbColor};
use embedded_graphics::primitives::Rectangle;
use serde::{Deserialize, Serialize};

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
    pub(super) fn pack(self, color: Rgb888, out: &mut [u8]) {
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
    pub(super) fn unpack(self, bytes: &[u8]) -> Rgb888 {
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
    pub(super) fn resolve(&self) -> Result<(Geometry, usize), String> {
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

/// A picture in a framebuffer's pixel format, in memory: what [`draw_event`](super::draw_event) draws into and
/// [`FramebufferDevice::present`](super::FramebufferDevice::present) writes out. An embedded-graphics draw target; pixels outside
/// it are clipped. Padding bytes at the end of rows stay 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Framebuffer {
    pub(super) width: u32,
    pub(super) height: u32,
    pub(super) stride_bytes: usize,
    pub(super) format: FbPixelFormat,
    pub(super) buffer: Vec<u8>,
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

    pub(super) fn offset(&self, x: u32, y: u32) -> Option<usize> {
        (x < self.width && y < self.height)
            .then(|| y as usize * self.stride_bytes + x as usize * self.format.bytes_per_pixel())
    }

    /// The bytes of `len` pixels of row `y` from column `x` (in bounds: the caller clips).
    pub(super) fn span_mut(&mut self, x: u32, y: u32, len: usize) -> &mut [u8] {
        let bpp = self.format.bytes_per_pixel();
        let start = y as usize * self.stride_bytes + x as usize * bpp;
        &mut self.buffer[start..start + len * bpp]
    }

    /// Packs `colors` into row `y` from column `x` (in bounds: the caller clips).
    pub(super) fn write_span(&mut self, x: u32, y: u32, colors: &[Rgb888]) {
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
