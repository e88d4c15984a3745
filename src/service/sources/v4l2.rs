//! The V4L2 camera source (`[source] kind = "v4l2"`): USB webcams and other Video4Linux2 capture
//! devices, read through mmap streaming I/O.
//!
//! Opening a camera enumerates its pixel formats and picks one ([`choose_format`]: MJPEG if the
//! camera offers it, else YUYV, unless the config names one), asks for the configured size and
//! frame rate and logs what the driver actually set (drivers round both to what the hardware can
//! do). Each [`FrameSource::next_frame`] waits for a filled buffer, copies its `bytesused` bytes out
//! of the mapping (device memory can be uncached, so reading it pixel by pixel would be slow) and
//! converts them to RGB: MJPEG with libjpeg-turbo, as every JPEG in samrt is decoded
//! ([`mjpeg_to_rgb`]), YUYV with BT.601 limited-range integer arithmetic ([`yuyv_to_rgb`]).
//!
//! Frames already waiting in the driver's queue when a frame is dequeued are skipped, so that a
//! slow consumer gets the newest frame rather than one that is several frames old; skipped frames
//! count as dropped. Frames the driver itself lost show up as gaps in its sequence numbers
//! ([`SequenceTracker`]). Both are reported in [`CapturedFrame::dropped_before`].
//!
//! A camera that is unplugged, fails with an I/O error or sends nothing for several seconds gives
//! [`SourceError::Disconnected`] and its device is closed at once (a device node kept open keeps its
//! number, and the replugged camera would come back under another one); the capture thread then
//! calls [`FrameSource::reconnect`] with backoff. A frame that cannot be decoded, or that the driver
//! flags as corrupt, gives [`SourceError::Corrupt`] and the stream goes on.
//!
//! The device backend needs the `v4l2` cargo feature (bindgen, so libclang). Without it
//! [`V4l2Source::open`] fails with an error that says how to rebuild; the configuration, the pixel
//! conversions and the format negotiation are compiled and tested either way.

use std::fmt;
use std::io;

use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::{CapturedFrame, FrameSource, SourceError};

/// The pixel format asked of the camera (`format` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PixelFormatChoice {
    /// MJPEG if the camera offers it, else YUYV.
    #[default]
    Auto,
    /// Motion JPEG (`MJPG`, or `JPEG` on some drivers).
    Mjpeg,
    /// Uncompressed YUV 4:2:2 (`YUYV`).
    Yuyv,
}

impl fmt::Display for PixelFormatChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PixelFormatChoice::Auto => "auto",
            PixelFormatChoice::Mjpeg => "mjpeg",
            PixelFormatChoice::Yuyv => "yuyv",
        })
    }
}

/// A V4L2 camera.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct V4l2Config {
    /// The camera's device node. `/dev/video0` is the first camera the system found; a USB webcam
    /// usually also has a second node (e.g. `/dev/video1`) that carries metadata and cannot
    /// capture. A name under `/dev/v4l/by-id/` stays the same when the camera is plugged into
    /// another port. `v4l2-ctl --list-devices` lists the cameras.
    pub device: String,
    /// Frame width in pixels to ask for. The driver picks the nearest size the camera supports and
    /// the size it set is logged at startup; `v4l2-ctl -d /dev/video0 --list-formats-ext` lists
    /// the sizes of each format. YUYV needs an even width.
    pub width: u32,
    /// Frame height in pixels to ask for (rounded by the driver like `width`).
    pub height: u32,
    /// Frames per second to ask for. The driver picks the nearest rate it supports and the rate
    /// it set is logged; many webcams go slower in dim light, when auto exposure needs longer
    /// exposures.
    pub fps: u32,
    /// Pixel format: `"auto"` (MJPEG if the camera offers it, else YUYV), `"mjpeg"` or `"yuyv"`.
    /// Over USB 2 MJPEG reaches larger sizes and higher rates; YUYV is uncompressed (no JPEG
    /// artefacts, less CPU) but USB 2 bandwidth limits it to about 640x480 at 30 fps or 1280x720
    /// at 10 fps.
    pub format: PixelFormatChoice,
    /// Buffers the driver captures into, 2 to 32. One is held while a frame is copied out and the
    /// driver fills the others meanwhile, so more buffers ride out longer stalls without the
    /// driver dropping frames; frames that queue up are skipped (newest frame wins), so more
    /// buffers do not add latency. Each costs one frame of memory (600 KiB for 640x480 YUYV).
    pub buffers: u32,
}

impl Default for V4l2Config {
    fn default() -> Self {
        V4l2Config {
            device: "/dev/video0".into(),
            width: 640,
            height: 480,
            fps: 15,
            format: PixelFormatChoice::Auto,
            buffers: 4,
        }
    }
}

/// The largest width or height accepted in the config.
const MAX_DIMENSION: u32 = 16384;
/// The highest frame rate accepted in the config.
const MAX_FPS: u32 = 1000;
/// The buffer counts accepted in the config (32 is V4L2's traditional maximum per queue).
const BUFFERS: std::ops::RangeInclusive<u32> = 2..=32;

impl V4l2Config {
    /// Checks the settings, with the reason for any that cannot work.
    pub fn validate(&self) -> Result<(), String> {
        if self.device.trim().is_empty() {
            return Err("device must name a device node, e.g. \"/dev/video0\"".into());
        }
        for (name, value) in [("width", self.width), ("height", self.height)] {
            if !(1..=MAX_DIMENSION).contains(&value) {
                return Err(format!(
                    "{name} must be between 1 and {MAX_DIMENSION} pixels, got {value}"
                ));
            }
        }
        if self.format == PixelFormatChoice::Yuyv && !self.width.is_multiple_of(2) {
            return Err(format!(
                "format \"yuyv\" needs an even width (two pixels share their colour), got {}",
                self.width
            ));
        }
        if !(1..=MAX_FPS).contains(&self.fps) {
            return Err(format!(
                "fps must be between 1 and {MAX_FPS}, got {}",
                self.fps
            ));
        }
        if !BUFFERS.contains(&self.buffers) {
            return Err(format!(
                "buffers must be between {} and {}, got {}",
                BUFFERS.start(),
                BUFFERS.end(),
                self.buffers
            ));
        }
        Ok(())
    }
}

/// A pixel format samrt reads from cameras.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelFormat {
    /// Motion JPEG, fourcc `MJPG`: one JPEG image per frame.
    Mjpeg,
    /// Fourcc `JPEG`: what some drivers call the same thing.
    Jpeg,
    /// YUV 4:2:2, fourcc `YUYV`: Y0 Cb Y1 Cr for each pair of pixels.
    Yuyv,
}

impl PixelFormat {
    /// The formats samrt reads, in the order `format = "auto"` prefers them.
    pub const PREFERENCE: [PixelFormat; 3] =
        [PixelFormat::Mjpeg, PixelFormat::Jpeg, PixelFormat::Yuyv];

    /// The V4L2 four-character code.
    pub const fn fourcc(self) -> [u8; 4] {
        match self {
            PixelFormat::Mjpeg => *b"MJPG",
            PixelFormat::Jpeg => *b"JPEG",
            PixelFormat::Yuyv => *b"YUYV",
        }
    }

    /// The config choice that selects this format.
    pub const fn choice(self) -> PixelFormatChoice {
        match self {
            PixelFormat::Mjpeg | PixelFormat::Jpeg => PixelFormatChoice::Mjpeg,
            PixelFormat::Yuyv => PixelFormatChoice::Yuyv,
        }
    }

    /// The format of a four-character code, if samrt reads it.
    pub fn from_fourcc(code: [u8; 4]) -> Option<PixelFormat> {
        Self::PREFERENCE.into_iter().find(|f| f.fourcc() == code)
    }

    /// Converts one frame (`bytesused` bytes of a buffer) to RGB. `stride` (bytes per row) is
    /// only used by YUYV; JPEG frames carry their own size.
    pub fn to_rgb(
        self,
        data: &[u8],
        width: u32,
        height: u32,
        stride: u32,
    ) -> Result<RgbImage, SourceError> {
        match self {
            PixelFormat::Mjpeg | PixelFormat::Jpeg => mjpeg_to_rgb(data),
            PixelFormat::Yuyv => yuyv_to_rgb(data, width, height, stride),
        }
    }
}

impl fmt::Display for PixelFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&fourcc_name(self.fourcc()))
    }
}

/// A four-character code as text: `"MJPG"`, `"Y16"` (trailing spaces dropped), or `0x…` in hex
/// when it is not printable ASCII.
pub fn fourcc_name(code: [u8; 4]) -> String {
    if code.iter().all(|b| b.is_ascii_graphic() || *b == b' ') && code[0] != b' ' {
        String::from_utf8_lossy(&code).trim_end().to_string()
    } else {
        format!("0x{:08x}", u32::from_le_bytes(code))
    }
}

/// Picks the pixel format to capture in from those the camera offers (V4L2 fourccs, in the
/// driver's order). `Auto` prefers MJPEG (`MJPG`, then `JPEG`) and then YUYV; an explicit choice
/// takes only that format. The error says what the camera offers and what samrt reads.
pub fn choose_format(
    offered: &[[u8; 4]],
    choice: PixelFormatChoice,
) -> Result<PixelFormat, String> {
    let wanted = |f: &PixelFormat| choice == PixelFormatChoice::Auto || f.choice() == choice;
    if let Some(format) = PixelFormat::PREFERENCE
        .into_iter()
        .filter(wanted)
        .find(|f| offered.contains(&f.fourcc()))
    {
        return Ok(format);
    }
    let offers = if offered.is_empty() {
        "no capture formats at all".to_string()
    } else {
        let mut names: Vec<String> = Vec::new();
        for code in offered {
            let name = fourcc_name(*code);
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names.join(", ")
    };
    let readable: Vec<PixelFormatChoice> = PixelFormat::PREFERENCE
        .into_iter()
        .filter(|f| offered.contains(&f.fourcc()))
        .map(PixelFormat::choice)
        .collect();
    Err(match choice {
        PixelFormatChoice::Auto => {
            format!("the camera offers {offers}; samrt reads only MJPEG (MJPG or JPEG) and YUYV")
        }
        PixelFormatChoice::Mjpeg | PixelFormatChoice::Yuyv => {
            let name = if choice == PixelFormatChoice::Mjpeg {
                "MJPEG (MJPG or JPEG)"
            } else {
                "YUYV"
            };
            let hint = match readable.first() {
                Some(other) => format!("; set format = \"{other}\" or \"auto\""),
                None => "; samrt reads only MJPEG (MJPG or JPEG) and YUYV".to_string(),
            };
            format!(
                "format = \"{choice}\" but the camera does not offer {name}, only {offers}{hint}"
            )
        }
    })
}

// BT.601 limited range ("studio swing": Y in 16..=235, Cb and Cr in 16..=240 around 128) to
// full-range RGB, in 16.16 fixed point with FFmpeg's coefficients (libswscale's
// `ff_yuv2rgb_coeffs[SWS_CS_ITU601]` and its luma gain 255/219):
//   R = 1.164 (Y - 16) + 1.596 (Cr - 128)
//   G = 1.164 (Y - 16) - 0.392 (Cb - 128) - 0.813 (Cr - 128)
//   B = 1.164 (Y - 16) + 2.017 (Cb - 128)
// rounded to nearest and clamped to 0..=255. Within 1 of the exact (floating point) conversion.
const Y_GAIN: i32 = 76309; // 255/219 * 65536
const CR_TO_R: i32 = 104597; // 1.402 * 255/224 * 65536
const CB_TO_B: i32 = 132201; // 1.772 * 255/224 * 65536
const CB_TO_G: i32 = 25675; // 0.344136 * 255/224 * 65536
const CR_TO_G: i32 = 53279; // 0.714136 * 255/224 * 65536
const ROUND: i32 = 1 << 15;

#[inline]
fn clamp_u8(value: i32) -> u8 {
    (value >> 16).clamp(0, 255) as u8
}

/// The chroma terms shared by two pixels: (red, green, blue) offsets, plus rounding.
#[inline]
fn chroma_terms(cb: u8, cr: u8) -> (i32, i32, i32) {
    let cb = i32::from(cb) - 128;
    let cr = i32::from(cr) - 128;
    (
        CR_TO_R * cr + ROUND,
        ROUND - CB_TO_G * cb - CR_TO_G * cr,
        CB_TO_B * cb + ROUND,
    )
}

#[inline]
fn put_pixel(out: &mut [u8], y: u8, (r, g, b): (i32, i32, i32)) {
    let luma = Y_GAIN * (i32::from(y) - 16);
    out[0] = clamp_u8(luma + r);
    out[1] = clamp_u8(luma + g);
    out[2] = clamp_u8(luma + b);
}

/// Converts a YUYV (YUV 4:2:2, bytes Y0 Cb Y1 Cr per pair of pixels) frame to RGB, as BT.601
/// limited-range video: Y 16 is black, 235 white. `stride` is the driver's bytes per line
/// (`bytesperline`, at least `2 * width`); the last row may stop right after its pixels. Each
/// pair of pixels shares its chroma (no interpolation, as libv4lconvert and FFmpeg do by default).
/// Errors (odd or zero size, short buffer) are [`SourceError::Corrupt`].
pub fn yuyv_to_rgb(
    data: &[u8],
    width: u32,
    height: u32,
    stride: u32,
) -> Result<RgbImage, SourceError> {
    let corrupt = |reason: String| Err(SourceError::Corrupt(reason));
    if width == 0 || height == 0 {
        return corrupt(format!("YUYV frame of size {width}x{height} has no pixels"));
    }
    if !width.is_multiple_of(2) {
        return corrupt(format!(
            "YUYV frame has an odd width {width} (pixels come in pairs)"
        ));
    }
    // Sizes in u64 first: they cannot overflow there, and once the buffer is known to hold
    // `needed` bytes they fit in usize.
    let row_bytes = u64::from(width) * 2;
    if u64::from(stride) < row_bytes {
        return corrupt(format!(
            "YUYV stride of {stride} bytes is less than the {row_bytes} bytes of a {width}-pixel row"
        ));
    }
    let needed = u64::from(stride) * u64::from(height - 1) + row_bytes;
    if (data.len() as u64) < needed {
        return corrupt(format!(
            "short YUYV frame: {} bytes, a {width}x{height} frame with {stride} bytes per row needs {needed}",
            data.len()
        ));
    }
    let (w, h, stride, row_bytes) = (
        width as usize,
        height as usize,
        stride as usize,
        row_bytes as usize,
    );
    let Some(out_len) = (w * 3).checked_mul(h) else {
        return corrupt(format!("YUYV frame size {width}x{height} is too large"));
    };
    let mut rgb = vec![0u8; out_len];
    for (row, out) in rgb.chunks_exact_mut(w * 3).enumerate() {
        let start = row * stride;
        let line = &data[start..start + row_bytes];
        for (yuyv, pair) in line.chunks_exact(4).zip(out.chunks_exact_mut(6)) {
            let terms = chroma_terms(yuyv[1], yuyv[3]);
            put_pixel(&mut pair[..3], yuyv[0], terms);
            put_pixel(&mut pair[3..], yuyv[2], terms);
        }
    }
    Ok(RgbImage::from_raw(width, height, rgb).expect("the buffer has width * height * 3 bytes"))
}

/// Decodes an MJPEG frame (one JPEG image) to RGB with libjpeg-turbo, exactly as samrt decodes
/// JPEG files (see [`crate::jpeg`]). Frames without Huffman tables, as many webcams send them
/// (MJPEG streams leave out the standard tables of JPEG's Annex K), decode: libjpeg-turbo falls
/// back to those tables when a frame has none. Bytes after the end-of-image marker (drivers pad
/// frames) are ignored. A frame that does not decode, or stops before its last row, is
/// [`SourceError::Corrupt`].
pub fn mjpeg_to_rgb(data: &[u8]) -> Result<RgbImage, SourceError> {
    if data.len() < 4 || data[..2] != [0xFF, 0xD8] {
        return Err(SourceError::Corrupt(format!(
            "MJPEG frame of {} bytes does not start with a JPEG start-of-image marker",
            data.len()
        )));
    }
    let (width, height, pixels) = crate::jpeg::decode_jpeg_rgb(data)
        .map_err(|e| SourceError::Corrupt(format!("MJPEG frame does not decode: {e}")))?;
    RgbImage::from_raw(width, height, pixels).ok_or_else(|| {
        SourceError::Corrupt(format!(
            "MJPEG frame decoded to the wrong number of pixels for {width}x{height}"
        ))
    })
}

/// Counts the frames lost between the frames dequeued, from the driver's sequence numbers (which
/// count every frame the camera sent since streaming started, delivered or not).
///
/// The first frame after [`SequenceTracker::new`] or [`SequenceTracker::reset`] reports no loss.
/// Numbers are compared modulo 2^32, so the wraparound from `u32::MAX` to 0 is a step of one. A
/// number that goes backwards or repeats (the driver restarted streaming, e.g. after a
/// reconnect that did not call `reset`) starts counting afresh from that frame.
#[derive(Debug, Clone, Default)]
pub struct SequenceTracker {
    last: Option<u32>,
    total_dropped: u64,
}

impl SequenceTracker {
    /// A tracker that has seen no frame.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets the last sequence number: the next frame reports no loss. Call when streaming
    /// restarts (the driver counts from 0 again).
    pub fn reset(&mut self) {
        self.last = None;
    }

    /// Takes the sequence number of the next frame dequeued and returns how many frames were
    /// lost just before it.
    pub fn observe(&mut self, sequence: u32) -> u64 {
        let dropped = match self.last {
            None => 0,
            Some(last) => {
                let step = sequence.wrapping_sub(last);
                if step == 0 || step > u32::MAX / 2 {
                    // Repeated or backwards: the driver's count restarted.
                    0
                } else {
                    u64::from(step - 1)
                }
            }
        };
        self.last = Some(sequence);
        self.total_dropped += dropped;
        dropped
    }

    /// Frames lost since the tracker was created (resets do not clear it).
    pub fn total_dropped(&self) -> u64 {
        self.total_dropped
    }
}

/// An error of an operation on the camera as a message that says what to do about it.
#[cfg_attr(not(feature = "v4l2"), allow(dead_code))]
fn device_error(device: &str, action: &str, e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOENT) => {
            format!("no camera at {device} (is it plugged in? `v4l2-ctl --list-devices`)")
        }
        Some(libc::ENODEV | libc::ENXIO) => format!(
            "{device} is gone ({action}: {e}): the camera was unplugged or its driver unloaded \
             (is it plugged in? `v4l2-ctl --list-devices`)"
        ),
        Some(libc::EACCES | libc::EPERM) => format!(
            "permission denied opening {device}: add the user to the `video` group \
             (`sudo usermod -aG video $USER`, then log in again), or under systemd set \
             SupplementaryGroups=video in the service's unit"
        ),
        Some(libc::EBUSY) => format!(
            "{device} is busy ({action}): another program is using the camera \
             (`fuser -v {device}` shows which)"
        ),
        Some(libc::EIO) => format!(
            "{action} on {device} failed with an I/O error: the camera was unplugged or its USB \
             link is failing (cable, or a hub without enough power; see `dmesg`)"
        ),
        // ENOTTY: the kernel's answer to a V4L2 ioctl on another kind of file; ENOSYS: the same
        // under qemu-user, which does not translate V4L2 ioctls (the emulated board tests).
        Some(libc::ENOTTY | libc::ENOSYS) => format!(
            "{device} is not a V4L2 video device ({action}: {e}); `v4l2-ctl --list-devices` \
             lists the cameras"
        ),
        _ => format!("{action} on {device} failed: {e}"),
    }
}

#[cfg(feature = "v4l2")]
mod device {
    use std::io;
    use std::time::{Duration, Instant};

    use v4l::buffer::{Flags as BufferFlags, Type};
    use v4l::capability::Flags as CapFlags;
    use v4l::device::Handle;
    use v4l::framesize::FrameSizeEnum;
    use v4l::io::mmap::Stream as MmapStream;
    use v4l::io::traits::{CaptureStream, Stream as _};
    use v4l::video::capture::Parameters;
    use v4l::video::Capture;
    use v4l::{Device, Format, FourCC};

    use super::{
        choose_format, device_error, CapturedFrame, FrameSource, PixelFormat, SequenceTracker,
        SourceError, V4l2Config,
    };

    /// Shortest wait for a frame before the camera counts as disconnected.
    const MIN_FRAME_TIMEOUT: Duration = Duration::from_secs(5);
    /// Extra time for the first frame (auto exposure, sensor start-up).
    const FIRST_FRAME_EXTRA: Duration = Duration::from_secs(5);

    /// A V4L2 camera, streaming through mmap buffers.
    pub struct V4l2Source {
        config: V4l2Config,
        /// `None` once disconnected, until [`FrameSource::reconnect`] succeeds.
        capture: Option<Session>,
        tracker: SequenceTracker,
        description: String,
    }

    /// An open, negotiated stream.
    struct Session {
        stream: MmapStream<'static>,
        handle: std::sync::Arc<Handle>,
        format: PixelFormat,
        width: u32,
        height: u32,
        stride: u32,
        /// How long a frame may take before the camera counts as gone.
        timeout: Duration,
        /// Whether the first frame has been dequeued (streaming started).
        started: bool,
        /// Frames dequeued at most per `next_frame` (skipping stale ones).
        max_dequeues: u32,
        /// The frame's bytes, copied out of the mapping.
        bytes: Vec<u8>,
    }

    impl V4l2Source {
        /// Opens the camera, negotiates format, size and frame rate, and sets up `buffers`
        /// mmap buffers; streaming starts with the first [`FrameSource::next_frame`].
        pub fn open(config: &V4l2Config) -> Result<Self, SourceError> {
            let (capture, description) = Session::open(config)?;
            Ok(V4l2Source {
                config: config.clone(),
                capture: Some(capture),
                tracker: SequenceTracker::new(),
                description,
            })
        }

        fn close(&mut self) {
            if let Some(capture) = self.capture.take() {
                capture.close(&self.config.device);
            }
        }
    }

    impl Drop for V4l2Source {
        fn drop(&mut self) {
            self.close();
        }
    }

    impl FrameSource for V4l2Source {
        fn describe(&self) -> String {
            if self.capture.is_some() {
                self.description.clone()
            } else {
                format!("{} (disconnected)", self.config.device)
            }
        }

        fn next_frame(&mut self) -> Result<CapturedFrame, SourceError> {
            let device = &self.config.device;
            let Some(capture) = self.capture.as_mut() else {
                return Err(SourceError::Disconnected(format!(
                    "{device} is not open (it was disconnected)"
                )));
            };
            match capture.next_frame(device, &mut self.tracker) {
                Err(SourceError::Disconnected(reason)) => {
                    self.close();
                    Err(SourceError::Disconnected(reason))
                }
                other => other,
            }
        }

        fn reconnect(&mut self) -> Result<(), SourceError> {
            self.close();
            let (capture, description) = Session::open(&self.config)?;
            self.capture = Some(capture);
            self.description = description;
            self.tracker.reset();
            Ok(())
        }
    }

    fn disconnected(device: &str, action: &str, e: &io::Error) -> SourceError {
        SourceError::Disconnected(device_error(device, action, e))
    }

    /// Whether a filled buffer is waiting right now.
    fn frame_waiting(handle: &Handle) -> bool {
        matches!(handle.poll(libc::POLLIN, 0), Ok(n) if n > 0)
    }

    /// Frames per second of a frame interval, if it is one.
    fn interval_fps(interval: v4l::Fraction) -> Option<f64> {
        (interval.numerator > 0 && interval.denominator > 0)
            .then(|| f64::from(interval.denominator) / f64::from(interval.numerator))
    }

    /// The sizes the camera offers in a format, for messages.
    fn frame_sizes(device: &Device, fourcc: FourCC) -> String {
        match device.enum_framesizes(fourcc) {
            Ok(sizes) if !sizes.is_empty() => sizes
                .iter()
                .map(|s| match &s.size {
                    FrameSizeEnum::Discrete(d) => format!("{}x{}", d.width, d.height),
                    FrameSizeEnum::Stepwise(s) => format!(
                        "{}x{} to {}x{}",
                        s.min_width, s.min_height, s.max_width, s.max_height
                    ),
                })
                .collect::<Vec<_>>()
                .join(", "),
            _ => "unknown".into(),
        }
    }

    impl Session {
        fn open(config: &V4l2Config) -> Result<(Session, String), SourceError> {
            let path = config.device.as_str();
            config.validate().map_err(|e| {
                SourceError::Disconnected(format!("invalid settings for camera {path}: {e}"))
            })?;
            let device = Device::with_path(path).map_err(|e| disconnected(path, "open", &e))?;

            let caps = device
                .query_caps()
                .map_err(|e| disconnected(path, "VIDIOC_QUERYCAP", &e))?;
            let flags = caps.capabilities;
            let card = format!("{} ({}, {})", caps.card, caps.driver, caps.bus);
            if !flags.contains(CapFlags::VIDEO_CAPTURE) {
                let why = if flags.contains(CapFlags::VIDEO_CAPTURE_MPLANE) {
                    "it has only the multi-planar capture API, which samrt does not support"
                        .to_string()
                } else if flags.contains(CapFlags::META_CAPTURE) {
                    "it is a metadata node; the camera's video node is usually the other \
                     /dev/video* of the same camera in `v4l2-ctl --list-devices`"
                        .to_string()
                } else {
                    format!("its capabilities are {flags}")
                };
                return Err(SourceError::Disconnected(format!(
                    "{path} ({card}) cannot capture video: {why}"
                )));
            }
            if !flags.contains(CapFlags::STREAMING) {
                return Err(SourceError::Disconnected(format!(
                    "{path} ({card}) does not support streaming I/O, which samrt needs"
                )));
            }

            let offered: Vec<[u8; 4]> = device
                .enum_formats()
                .map_err(|e| disconnected(path, "VIDIOC_ENUM_FMT", &e))?
                .iter()
                .map(|d| d.fourcc.repr)
                .collect();
            let format = choose_format(&offered, config.format)
                .map_err(|e| SourceError::Disconnected(format!("{path} ({card}): {e}")))?;
            let fourcc = FourCC::new(&format.fourcc());

            let wanted = Format::new(config.width, config.height, fourcc);
            let actual = device
                .set_format(&wanted)
                .map_err(|e| disconnected(path, "VIDIOC_S_FMT", &e))?;
            if actual.fourcc != fourcc {
                return Err(SourceError::Disconnected(format!(
                    "{path} ({card}) was asked for {format} but set {}",
                    super::fourcc_name(actual.fourcc.repr)
                )));
            }
            if actual.width == 0 || actual.height == 0 {
                return Err(SourceError::Disconnected(format!(
                    "{path} ({card}) set an empty frame size {}x{}",
                    actual.width, actual.height
                )));
            }
            if (actual.width, actual.height) != (config.width, config.height) {
                log::warn!(
                    "{path}: asked for {}x{}, the driver set {}x{} ({format} sizes: {})",
                    config.width,
                    config.height,
                    actual.width,
                    actual.height,
                    frame_sizes(&device, fourcc)
                );
            }
            let stride = if format == PixelFormat::Yuyv {
                if !actual.width.is_multiple_of(2) {
                    return Err(SourceError::Disconnected(format!(
                        "{path} ({card}) set YUYV with an odd width {}",
                        actual.width
                    )));
                }
                actual.stride.max(actual.width * 2)
            } else {
                actual.stride
            };

            let fps = match device.set_params(&Parameters::with_fps(config.fps)) {
                Ok(params) => interval_fps(params.interval),
                Err(e) => {
                    log::warn!(
                        "{path}: cannot set the frame rate ({}); using the driver's",
                        device_error(path, "VIDIOC_S_PARM", &e)
                    );
                    device
                        .params()
                        .ok()
                        .and_then(|params| interval_fps(params.interval))
                }
            };
            match fps {
                Some(fps) if (fps - f64::from(config.fps)).abs() > 0.5 => log::warn!(
                    "{path}: asked for {} fps, the driver set {fps:.2} fps",
                    config.fps
                ),
                None => log::warn!("{path}: the driver does not report its frame rate"),
                _ => {}
            }

            let mut stream = MmapStream::with_buffers(&device, Type::VideoCapture, config.buffers)
                .map_err(|e| disconnected(path, "requesting mmap buffers", &e))?;
            let interval = Duration::from_secs_f64(1.0 / fps.unwrap_or(1.0).max(0.01));
            let timeout = MIN_FRAME_TIMEOUT.max(interval * 5);
            stream.set_timeout(timeout + FIRST_FRAME_EXTRA);

            let fps_text = fps.map_or_else(|| "? fps".to_string(), |f| format!("{f:.3} fps"));
            let fps_text = fps_text.replace(".000 fps", " fps");
            log::info!(
                "{path}: {card}: capturing {}x{} {format} at {fps_text} into {} buffers",
                actual.width,
                actual.height,
                config.buffers
            );
            let description = format!(
                "{path} {}x{} {format} {fps_text} ({})",
                actual.width, actual.height, caps.card
            );
            let capture = Session {
                handle: stream.handle(),
                stream,
                format,
                width: actual.width,
                height: actual.height,
                stride,
                timeout,
                started: false,
                max_dequeues: config.buffers.max(1),
                bytes: Vec::new(),
            };
            Ok((capture, description))
        }

        /// Waits until the driver has a filled buffer (or fails), retrying after signals.
        /// Called before `next()` once streaming runs, so that a timeout or a signal leaves the
        /// stream usable: `next()` re-queues the previous buffer before it waits, and after a
        /// failed wait it would queue that buffer a second time.
        fn wait_for_frame(&self, device: &str) -> Result<(), SourceError> {
            let deadline = Instant::now() + self.timeout;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
                match self.handle.poll(libc::POLLIN, ms) {
                    Ok(0) => {
                        return Err(SourceError::Disconnected(format!(
                            "no frame from {device} for {:.1} s: the camera stopped sending",
                            self.timeout.as_secs_f64()
                        )))
                    }
                    Ok(_) => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(disconnected(device, "waiting for a frame", &e)),
                }
            }
        }

        fn next_frame(
            &mut self,
            device: &str,
            tracker: &mut SequenceTracker,
        ) -> Result<CapturedFrame, SourceError> {
            if self.started {
                self.wait_for_frame(device)?;
            }
            let mut dropped = 0u64;
            let mut dequeues = 0u32;
            let meta = loop {
                let (data, meta) = CaptureStream::next(&mut self.stream).map_err(|e| {
                    if e.kind() == io::ErrorKind::TimedOut {
                        SourceError::Disconnected(format!(
                            "no first frame from {device} within {:.1} s",
                            (self.timeout + FIRST_FRAME_EXTRA).as_secs_f64()
                        ))
                    } else {
                        disconnected(device, "capturing a frame", &e)
                    }
                })?;
                let meta = *meta;
                self.started = true;
                dropped += tracker.observe(meta.sequence);
                dequeues += 1;
                // A frame is already waiting behind this one: this one is stale, skip it.
                if dequeues < self.max_dequeues && frame_waiting(&self.handle) {
                    dropped += 1;
                    continue;
                }
                let used = (meta.bytesused as usize).min(data.len());
                self.bytes.clear();
                self.bytes.extend_from_slice(&data[..used]);
                break meta;
            };
            if meta.flags.contains(BufferFlags::ERROR) {
                return Err(SourceError::Corrupt(format!(
                    "{device} flagged frame {} as corrupt (V4L2_BUF_FLAG_ERROR)",
                    meta.sequence
                )));
            }
            if self.bytes.is_empty() {
                return Err(SourceError::Corrupt(format!(
                    "{device} delivered frame {} with no data",
                    meta.sequence
                )));
            }
            let image = self
                .format
                .to_rgb(&self.bytes, self.width, self.height, self.stride)
                .map_err(|e| match e {
                    SourceError::Corrupt(reason) => {
                        SourceError::Corrupt(format!("{device} frame {}: {reason}", meta.sequence))
                    }
                    other => other,
                })?;
            Ok(CapturedFrame {
                image,
                origin: device.to_string(),
                dropped_before: dropped,
            })
        }

        /// Stops streaming and releases the buffers and the device. The v4l crate panics when it
        /// cannot release them for any reason but ENODEV (the camera is gone), so where stopping
        /// fails otherwise they are leaked instead, with a warning.
        fn close(self, device: &str) {
            let Session {
                mut stream, handle, ..
            } = self;
            drop(handle);
            match stream.stop() {
                Ok(()) => drop(stream),
                Err(e) if e.raw_os_error() == Some(libc::ENODEV) => drop(stream),
                Err(e) => {
                    log::warn!(
                        "{device}: stopping the stream failed ({e}); its buffers and file \
                         descriptor stay allocated until samrt exits"
                    );
                    std::mem::forget(stream);
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn open_error(device: &str) -> String {
            let config = V4l2Config {
                device: device.into(),
                ..V4l2Config::default()
            };
            match V4l2Source::open(&config) {
                Err(SourceError::Disconnected(reason)) => reason,
                Err(other) => panic!("expected Disconnected, got {other:?}"),
                Ok(_) => panic!("{device} opened as a camera"),
            }
        }

        #[test]
        fn open_without_a_camera_explains() {
            let missing = open_error("/dev/samrt-no-such-video-device");
            assert_eq!(
                missing,
                "no camera at /dev/samrt-no-such-video-device (is it plugged in? \
                 `v4l2-ctl --list-devices`)"
            );
            let not_v4l2 = open_error("/dev/null");
            assert!(
                not_v4l2.contains("/dev/null is not a V4L2 video device"),
                "{not_v4l2}"
            );
            let invalid = V4l2Source::open(&V4l2Config {
                buffers: 0,
                ..V4l2Config::default()
            });
            assert!(
                matches!(&invalid, Err(SourceError::Disconnected(r)) if r.contains("buffers")),
                "{:?}",
                invalid.err()
            );
        }

        #[test]
        fn the_source_can_move_to_the_capture_thread() {
            fn send<T: Send>() {}
            send::<V4l2Source>();
        }
    }
}

#[cfg(feature = "v4l2")]
pub use device::V4l2Source;

/// The error of [`V4l2Source::open`] in a build without the `v4l2` feature.
#[cfg(not(feature = "v4l2"))]
const NOT_BUILT: &str = "samrt was built without the `v4l2` feature: rebuild with \
                         `cargo build --release --features v4l2` (needs libclang-dev)";

/// A V4L2 camera. This build has no V4L2 support (the `v4l2` cargo feature is off), so
/// [`V4l2Source::open`] always fails and no value of this type exists.
#[cfg(not(feature = "v4l2"))]
pub struct V4l2Source {
    never: std::convert::Infallible,
}

#[cfg(not(feature = "v4l2"))]
impl V4l2Source {
    /// Fails: this build has no V4L2 support. The error says how to rebuild with it.
    pub fn open(config: &V4l2Config) -> Result<Self, SourceError> {
        let _ = config;
        Err(SourceError::Disconnected(NOT_BUILT.into()))
    }
}

#[cfg(not(feature = "v4l2"))]
impl FrameSource for V4l2Source {
    fn describe(&self) -> String {
        match self.never {}
    }

    fn next_frame(&mut self) -> Result<CapturedFrame, SourceError> {
        match self.never {}
    }

    fn reconnect(&mut self) -> Result<(), SourceError> {
        match self.never {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::codecs::jpeg::JpegEncoder;
    use image::{ExtendedColorType, Rgb};

    // ---- configuration ----

    #[test]
    fn config_defaults_and_toml() {
        let default = V4l2Config::default();
        assert_eq!(default.device, "/dev/video0");
        assert_eq!((default.width, default.height, default.fps), (640, 480, 15));
        assert_eq!(default.format, PixelFormatChoice::Auto);
        assert_eq!(default.buffers, 4);
        assert_eq!(default.validate(), Ok(()));

        let empty: V4l2Config = toml::from_str("").unwrap();
        assert_eq!(empty, default);
        let some: V4l2Config =
            toml::from_str("device = \"/dev/video2\"\nformat = \"yuyv\"\nfps = 30").unwrap();
        assert_eq!(some.device, "/dev/video2");
        assert_eq!(some.format, PixelFormatChoice::Yuyv);
        assert_eq!((some.fps, some.width), (30, 640));
        let mjpeg: V4l2Config = toml::from_str("format = \"mjpeg\"").unwrap();
        assert_eq!(mjpeg.format, PixelFormatChoice::Mjpeg);

        let bad_format = toml::from_str::<V4l2Config>("format = \"h264\"").unwrap_err();
        assert!(bad_format.to_string().contains("h264"), "{bad_format}");
        let upper = toml::from_str::<V4l2Config>("format = \"MJPEG\"");
        assert!(upper.is_err());

        let text = toml::to_string(&some).unwrap();
        assert!(text.contains("format = \"yuyv\""), "{text}");
        assert_eq!(toml::from_str::<V4l2Config>(&text).unwrap(), some);
    }

    #[test]
    fn config_validation() {
        let check = |edit: fn(&mut V4l2Config)| {
            let mut config = V4l2Config::default();
            edit(&mut config);
            config.validate()
        };
        assert!(check(|c| c.device = " ".into())
            .unwrap_err()
            .contains("device"));
        assert!(check(|c| c.width = 0).unwrap_err().contains("width"));
        assert!(check(|c| c.height = 20000).unwrap_err().contains("height"));
        assert!(check(|c| c.fps = 0).unwrap_err().contains("fps"));
        assert!(check(|c| c.buffers = 1).unwrap_err().contains("buffers"));
        assert!(check(|c| c.buffers = 33).unwrap_err().contains("buffers"));
        assert_eq!(check(|c| c.buffers = 2), Ok(()));
        assert_eq!(check(|c| c.width = 641), Ok(())); // the driver rounds MJPEG sizes
        let odd = check(|c| {
            c.width = 641;
            c.format = PixelFormatChoice::Yuyv;
        });
        assert!(odd.unwrap_err().contains("even width"));
    }

    // ---- format negotiation ----

    #[test]
    fn auto_prefers_mjpeg_then_yuyv() {
        let choose = |offered: &[&[u8; 4]], choice| {
            let offered: Vec<[u8; 4]> = offered.iter().map(|c| **c).collect();
            choose_format(&offered, choice)
        };
        use PixelFormatChoice::*;
        assert_eq!(choose(&[b"YUYV", b"MJPG"], Auto), Ok(PixelFormat::Mjpeg));
        assert_eq!(choose(&[b"YUYV", b"JPEG"], Auto), Ok(PixelFormat::Jpeg));
        assert_eq!(
            choose(&[b"JPEG", b"MJPG", b"YUYV"], Auto),
            Ok(PixelFormat::Mjpeg)
        );
        assert_eq!(choose(&[b"H264", b"YUYV"], Auto), Ok(PixelFormat::Yuyv));
        assert_eq!(choose(&[b"YUYV", b"MJPG"], Yuyv), Ok(PixelFormat::Yuyv));
        assert_eq!(choose(&[b"YUYV", b"MJPG"], Mjpeg), Ok(PixelFormat::Mjpeg));
        assert_eq!(choose(&[b"JPEG"], Mjpeg), Ok(PixelFormat::Jpeg));
    }

    #[test]
    fn negotiation_errors_list_both_sides() {
        let grey_h264 = [*b"GREY", *b"H264", *b"Y16 ", *b"GREY"];
        let auto = choose_format(&grey_h264, PixelFormatChoice::Auto).unwrap_err();
        assert_eq!(
            auto,
            "the camera offers GREY, H264, Y16; samrt reads only MJPEG (MJPG or JPEG) and YUYV"
        );
        let yuyv = choose_format(&[*b"MJPG", *b"H264"], PixelFormatChoice::Yuyv).unwrap_err();
        assert_eq!(
            yuyv,
            "format = \"yuyv\" but the camera does not offer YUYV, only MJPG, H264; \
             set format = \"mjpeg\" or \"auto\""
        );
        let mjpeg = choose_format(&[*b"YUYV"], PixelFormatChoice::Mjpeg).unwrap_err();
        assert!(mjpeg.contains("does not offer MJPEG"), "{mjpeg}");
        assert!(mjpeg.contains("set format = \"yuyv\""), "{mjpeg}");
        let none = choose_format(&[*b"H264"], PixelFormatChoice::Mjpeg).unwrap_err();
        assert!(none.contains("samrt reads only MJPEG"), "{none}");
        let empty = choose_format(&[], PixelFormatChoice::Auto).unwrap_err();
        assert!(empty.contains("no capture formats"), "{empty}");
    }

    #[test]
    fn fourcc_names() {
        assert_eq!(fourcc_name(*b"MJPG"), "MJPG");
        assert_eq!(fourcc_name(*b"Y16 "), "Y16");
        assert_eq!(fourcc_name([0, 1, 2, 0x80]), "0x80020100");
        assert_eq!(PixelFormat::from_fourcc(*b"YUYV"), Some(PixelFormat::Yuyv));
        assert_eq!(PixelFormat::from_fourcc(*b"NV12"), None);
        assert_eq!(PixelFormat::Jpeg.to_string(), "JPEG");
        assert_eq!(PixelFormat::Jpeg.choice(), PixelFormatChoice::Mjpeg);
    }

    // ---- YUYV ----

    /// A 2x1 YUYV frame of one colour.
    fn yuyv_pixel(y: u8, cb: u8, cr: u8) -> [u8; 3] {
        let rgb = yuyv_to_rgb(&[y, cb, y, cr], 2, 1, 4).unwrap();
        assert_eq!(rgb.get_pixel(0, 0), rgb.get_pixel(1, 0));
        rgb.get_pixel(0, 0).0
    }

    #[test]
    fn yuyv_limited_range_greys() {
        assert_eq!(yuyv_pixel(16, 128, 128), [0, 0, 0]);
        assert_eq!(yuyv_pixel(235, 128, 128), [255, 255, 255]);
        assert_eq!(yuyv_pixel(0, 128, 128), [0, 0, 0]); // below black clamps
        assert_eq!(yuyv_pixel(255, 128, 128), [255, 255, 255]); // above white clamps
        assert_eq!(yuyv_pixel(128, 128, 128), [130, 130, 130]); // 112 * 255/219 = 130.4
        assert_eq!(yuyv_pixel(180, 128, 128), [191, 191, 191]); // 75% white
    }

    #[test]
    fn yuyv_colour_bars() {
        // BT.601 100% colour bars (ITU-R BT.801) in 8-bit YCbCr; 8-bit quantization puts some
        // RGB values one off the ideal 0 and 255, as the exact conversion does too.
        let bars: [([u8; 3], [u8; 3]); 8] = [
            ([235, 128, 128], [255, 255, 255]), // white
            ([210, 16, 146], [255, 255, 0]),    // yellow
            ([170, 166, 16], [1, 255, 255]),    // cyan
            ([145, 54, 34], [0, 255, 1]),       // green
            ([106, 202, 222], [255, 0, 254]),   // magenta
            ([81, 90, 240], [254, 0, 0]),       // red
            ([41, 240, 110], [0, 0, 255]),      // blue
            ([16, 128, 128], [0, 0, 0]),        // black
        ];
        for ([y, cb, cr], rgb) in bars {
            assert_eq!(yuyv_pixel(y, cb, cr), rgb, "Y {y} Cb {cb} Cr {cr}");
        }
        // 75% bars.
        assert_eq!(yuyv_pixel(162, 44, 142), [192, 192, 1]); // yellow
        assert_eq!(yuyv_pixel(65, 100, 212), [191, 0, 1]); // red
        assert_eq!(yuyv_pixel(35, 212, 114), [0, 1, 192]); // blue
    }

    #[test]
    fn yuyv_matches_the_exact_conversion_within_one() {
        let exact = |y: u8, cb: u8, cr: u8| {
            let y = (f64::from(y) - 16.0) * 255.0 / 219.0;
            let cb = (f64::from(cb) - 128.0) * 255.0 / 224.0;
            let cr = (f64::from(cr) - 128.0) * 255.0 / 224.0;
            [
                y + 1.402 * cr,
                y - 0.344136 * cb - 0.714136 * cr,
                y + 1.772 * cb,
            ]
            .map(|v| v.round().clamp(0.0, 255.0) as i32)
        };
        for y in (0..=255u8).step_by(3) {
            for cb in (0..=255u8).step_by(5) {
                for cr in (0..=255u8).step_by(5) {
                    let got = yuyv_pixel(y, cb, cr);
                    let want = exact(y, cb, cr);
                    for c in 0..3 {
                        assert!(
                            (i32::from(got[c]) - want[c]).abs() <= 1,
                            "Y {y} Cb {cb} Cr {cr}: {got:?} vs {want:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn yuyv_pairs_share_chroma_and_rows_follow_the_stride() {
        // 4x2 pixels, 10 bytes per row (2 bytes of padding, 0xEE, that must be skipped); the last
        // row stops right after its pixels.
        #[rustfmt::skip]
        let data = [
            16, 128, 235, 128,   81, 90, 41, 240,   0xEE, 0xEE,
            235, 16, 235, 146,   16, 128, 16, 128,
        ];
        let rgb = yuyv_to_rgb(&data, 4, 2, 10).unwrap();
        assert_eq!((rgb.width(), rgb.height()), (4, 2));
        assert_eq!(rgb.get_pixel(0, 0), &Rgb([0, 0, 0]));
        assert_eq!(rgb.get_pixel(1, 0), &Rgb([255, 255, 255]));
        // Y 81 and 41 with the chroma of red (Cb 90) and Cr 240.
        assert_eq!(
            rgb.get_pixel(2, 0).0,
            yuyv_to_rgb(&[81, 90, 81, 240], 2, 1, 4)
                .unwrap()
                .get_pixel(0, 0)
                .0
        );
        assert_eq!(
            rgb.get_pixel(3, 0).0,
            yuyv_to_rgb(&[41, 90, 41, 240], 2, 1, 4)
                .unwrap()
                .get_pixel(0, 0)
                .0
        );
        assert_eq!(rgb.get_pixel(0, 1).0, yuyv_pixel(235, 16, 146));
        assert_eq!(rgb.get_pixel(3, 1), &Rgb([0, 0, 0]));
        // A whole padded last row is fine too.
        let mut padded = data.to_vec();
        padded.extend_from_slice(&[0xEE, 0xEE]);
        assert_eq!(yuyv_to_rgb(&padded, 4, 2, 10).unwrap(), rgb);
    }

    #[test]
    fn yuyv_bad_frames_are_corrupt() {
        let corrupt = |data: &[u8], w, h, stride| match yuyv_to_rgb(data, w, h, stride) {
            Err(SourceError::Corrupt(reason)) => reason,
            other => panic!("expected Corrupt, got {other:?}"),
        };
        let frame = vec![128u8; 640 * 480 * 2];
        assert!(yuyv_to_rgb(&frame, 640, 480, 1280).is_ok());
        assert!(corrupt(&frame[..frame.len() - 1], 640, 480, 1280).contains("short YUYV frame"));
        assert!(corrupt(&frame, 640, 480, 1282).contains("short YUYV frame"));
        assert!(corrupt(&[], 640, 480, 1280).contains("short YUYV frame: 0 bytes"));
        assert!(corrupt(&frame, 639, 480, 1280).contains("odd width"));
        assert!(corrupt(&frame, 640, 480, 1000).contains("stride"));
        assert!(corrupt(&frame, 0, 480, 1280).contains("no pixels"));
        assert!(corrupt(&frame, 640, 0, 1280).contains("no pixels"));
        assert!(corrupt(&frame, u32::MAX - 1, u32::MAX, u32::MAX).contains("stride"));
        assert!(corrupt(&frame, 1 << 30, u32::MAX, u32::MAX).contains("short YUYV frame"));
    }

    // ---- MJPEG ----

    /// A 64x48 gradient with some detail, encoded by the `image` crate, which writes JPEG's
    /// standard (Annex K) Huffman tables, the ones MJPEG cameras leave out.
    fn test_jpeg() -> Vec<u8> {
        let image = RgbImage::from_fn(64, 48, |x, y| {
            Rgb([(x * 4) as u8, (y * 5) as u8, ((x * y) % 251) as u8])
        });
        let mut bytes = Vec::new();
        JpegEncoder::new_with_quality(&mut bytes, 85)
            .encode(image.as_raw(), 64, 48, ExtendedColorType::Rgb8)
            .unwrap();
        bytes
    }

    /// The JPEG without its DHT (Huffman table) segments, as webcams send MJPEG.
    fn strip_dht(jpeg: &[u8]) -> Vec<u8> {
        assert_eq!(jpeg[..2], [0xFF, 0xD8]);
        let mut out = jpeg[..2].to_vec();
        let mut at = 2;
        loop {
            assert_eq!(jpeg[at], 0xFF, "a marker at {at}");
            let marker = jpeg[at + 1];
            if marker == 0xDA {
                // Start of scan: the entropy-coded data and the rest go as they are.
                out.extend_from_slice(&jpeg[at..]);
                return out;
            }
            let len = usize::from(u16::from_be_bytes([jpeg[at + 2], jpeg[at + 3]]));
            if marker != 0xC4 {
                out.extend_from_slice(&jpeg[at..at + 2 + len]);
            }
            at += 2 + len;
        }
    }

    fn has_dht(jpeg: &[u8]) -> bool {
        jpeg.windows(2).any(|w| w == [0xFF, 0xC4])
    }

    #[test]
    fn mjpeg_decodes_like_samrt_decodes_jpeg_files() {
        let jpeg = test_jpeg();
        let rgb = mjpeg_to_rgb(&jpeg).unwrap();
        assert_eq!((rgb.width(), rgb.height()), (64, 48));
        let (w, h, pixels) = crate::jpeg::decode_jpeg_rgb(&jpeg).unwrap();
        assert_eq!((w, h), (64, 48));
        assert_eq!(rgb.as_raw(), &pixels);
        let file = crate::image_io::decode_rgb(std::path::Path::new("frame.jpg"), &jpeg).unwrap();
        assert_eq!(rgb, file);
        // Drivers pad frames after the end-of-image marker.
        let mut padded = jpeg.clone();
        padded.extend_from_slice(&[0; 100]);
        assert_eq!(mjpeg_to_rgb(&padded).unwrap(), rgb);
    }

    #[test]
    fn mjpeg_without_huffman_tables_decodes_with_the_standard_ones() {
        let jpeg = test_jpeg();
        assert!(has_dht(&jpeg));
        let stripped = strip_dht(&jpeg);
        assert!(!has_dht(&stripped));
        assert!(stripped.len() < jpeg.len() - 400, "4 tables are gone");
        let rgb = mjpeg_to_rgb(&jpeg).unwrap();
        assert_eq!(mjpeg_to_rgb(&stripped).unwrap(), rgb);
        // Not a trivial image: the decode really used the tables.
        assert!(rgb.pixels().any(|p| p.0 != rgb.get_pixel(0, 0).0));
    }

    #[test]
    fn mjpeg_bad_frames_are_corrupt() {
        let corrupt = |data: &[u8]| match mjpeg_to_rgb(data) {
            Err(SourceError::Corrupt(reason)) => reason,
            other => panic!("expected Corrupt, got {other:?}"),
        };
        assert!(corrupt(b"").contains("start-of-image"));
        assert!(corrupt(&[0u8; 4096]).contains("start-of-image"));
        assert!(corrupt(b"\xff\xd8\xff\xe0 garbage garbage").contains("does not decode"));
        let jpeg = test_jpeg();
        let truncated = corrupt(&jpeg[..jpeg.len() * 2 / 3]);
        assert!(truncated.contains("truncated"), "{truncated}");
        let headers_only = corrupt(&jpeg[..jpeg.len() / 10]);
        assert!(headers_only.contains("does not decode"), "{headers_only}");
    }

    // ---- dropped frames ----

    #[test]
    fn sequence_gaps_count_dropped_frames() {
        let mut t = SequenceTracker::new();
        assert_eq!(t.observe(7), 0); // first frame: nothing known before it
        assert_eq!(t.observe(8), 0);
        assert_eq!(t.observe(9), 0);
        assert_eq!(t.observe(12), 2);
        assert_eq!(t.observe(13), 0);
        assert_eq!(t.observe(1013), 999);
        assert_eq!(t.total_dropped(), 1001);
    }

    #[test]
    fn sequence_wraps_around() {
        let mut t = SequenceTracker::new();
        assert_eq!(t.observe(u32::MAX - 1), 0);
        assert_eq!(t.observe(u32::MAX), 0);
        assert_eq!(t.observe(0), 0);
        assert_eq!(t.observe(1), 0);
        let mut t = SequenceTracker::new();
        t.observe(u32::MAX - 2);
        assert_eq!(t.observe(2), 4); // MAX-1, MAX, 0, 1 lost
    }

    #[test]
    fn sequence_restarts() {
        // After a reconnect the driver counts from 0 again.
        let mut t = SequenceTracker::new();
        t.observe(500);
        t.reset();
        assert_eq!(t.observe(0), 0);
        assert_eq!(t.observe(1), 0);
        // The first frame after a reset may have any number.
        t.reset();
        assert_eq!(t.observe(40), 0);
        assert_eq!(t.observe(42), 1);
        // Without a reset, a number that goes back or repeats starts counting afresh.
        assert_eq!(t.observe(3), 0);
        assert_eq!(t.observe(4), 0);
        assert_eq!(t.observe(4), 0);
        assert_eq!(t.observe(6), 1);
        assert_eq!(t.total_dropped(), 2);
    }

    // ---- errors ----

    #[test]
    fn device_errors_say_what_to_do() {
        let err = |code| device_error("/dev/video0", "open", &io::Error::from_raw_os_error(code));
        assert_eq!(
            err(libc::ENOENT),
            "no camera at /dev/video0 (is it plugged in? `v4l2-ctl --list-devices`)"
        );
        let denied = err(libc::EACCES);
        assert!(
            denied.starts_with("permission denied opening /dev/video0"),
            "{denied}"
        );
        assert!(denied.contains("`video` group"), "{denied}");
        assert!(denied.contains("SupplementaryGroups=video"), "{denied}");
        assert!(err(libc::EBUSY).contains("another program"));
        assert!(err(libc::ENODEV).contains("unplugged"));
        assert!(err(libc::EIO).contains("I/O error"));
        assert!(err(libc::ENOTTY).contains("not a V4L2 video device"));
        assert!(err(libc::ENOSYS).contains("not a V4L2 video device"));
        assert!(err(libc::EINVAL).starts_with("open on /dev/video0 failed"));
    }

    #[cfg(not(feature = "v4l2"))]
    #[test]
    fn without_the_feature_open_says_how_to_rebuild() {
        match V4l2Source::open(&V4l2Config::default()) {
            Err(SourceError::Disconnected(reason)) => assert_eq!(
                reason,
                "samrt was built without the `v4l2` feature: rebuild with \
                 `cargo build --release --features v4l2` (needs libclang-dev)"
            ),
            Err(other) => panic!("unexpected error {other}"),
            Ok(_) => panic!("opened without the feature"),
        }
    }
}
