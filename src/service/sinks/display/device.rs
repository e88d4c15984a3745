//! The framebuffer device (`/dev/fbN`): its geometry from the kernel, whole pictures written to it.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use super::framebuffer::{FbPixelFormat, Framebuffer, Geometry};

/// A clear message for a framebuffer that could not be opened.
pub(super) fn open_error(path: &Path, error: &io::Error) -> String {
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
pub(super) mod fbdev {
    use std::fs::File;
    use std::io;
    use std::path::Path;

    use super::{FbPixelFormat, Geometry};

    /// `struct fb_bitfield` of `<linux/fb.h>`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub(in crate::service::sinks::display) struct FbBitfield {
        pub(in crate::service::sinks::display) offset: u32,
        pub(in crate::service::sinks::display) length: u32,
        pub(in crate::service::sinks::display) msb_right: u32,
    }

    /// `struct fb_var_screeninfo` of `<linux/fb.h>` (160 bytes).
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub(in crate::service::sinks::display) struct FbVarScreeninfo {
        pub(in crate::service::sinks::display) xres: u32,
        pub(in crate::service::sinks::display) yres: u32,
        pub(in crate::service::sinks::display) xres_virtual: u32,
        pub(in crate::service::sinks::display) yres_virtual: u32,
        pub(in crate::service::sinks::display) xoffset: u32,
        pub(in crate::service::sinks::display) yoffset: u32,
        pub(in crate::service::sinks::display) bits_per_pixel: u32,
        pub(in crate::service::sinks::display) grayscale: u32,
        pub(in crate::service::sinks::display) red: FbBitfield,
        pub(in crate::service::sinks::display) green: FbBitfield,
        pub(in crate::service::sinks::display) blue: FbBitfield,
        pub(in crate::service::sinks::display) transp: FbBitfield,
        pub(in crate::service::sinks::display) nonstd: u32,
        pub(in crate::service::sinks::display) activate: u32,
        pub(in crate::service::sinks::display) height: u32,
        pub(in crate::service::sinks::display) width: u32,
        pub(in crate::service::sinks::display) accel_flags: u32,
        pub(in crate::service::sinks::display) pixclock: u32,
        pub(in crate::service::sinks::display) left_margin: u32,
        pub(in crate::service::sinks::display) right_margin: u32,
        pub(in crate::service::sinks::display) upper_margin: u32,
        pub(in crate::service::sinks::display) lower_margin: u32,
        pub(in crate::service::sinks::display) hsync_len: u32,
        pub(in crate::service::sinks::display) vsync_len: u32,
        pub(in crate::service::sinks::display) sync: u32,
        pub(in crate::service::sinks::display) vmode: u32,
        pub(in crate::service::sinks::display) rotate: u32,
        pub(in crate::service::sinks::display) colorspace: u32,
        pub(in crate::service::sinks::display) reserved: [u32; 4],
    }

    /// `struct fb_fix_screeninfo` of `<linux/fb.h>` (80 bytes on 64-bit targets, 68 on 32-bit).
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub(in crate::service::sinks::display) struct FbFixScreeninfo {
        pub(in crate::service::sinks::display) id: [u8; 16],
        pub(in crate::service::sinks::display) smem_start: libc::c_ulong,
        pub(in crate::service::sinks::display) smem_len: u32,
        pub(in crate::service::sinks::display) type_: u32,
        pub(in crate::service::sinks::display) type_aux: u32,
        pub(in crate::service::sinks::display) visual: u32,
        pub(in crate::service::sinks::display) xpanstep: u16,
        pub(in crate::service::sinks::display) ypanstep: u16,
        pub(in crate::service::sinks::display) ywrapstep: u16,
        pub(in crate::service::sinks::display) line_length: u32,
        pub(in crate::service::sinks::display) mmio_start: libc::c_ulong,
        pub(in crate::service::sinks::display) mmio_len: u32,
        pub(in crate::service::sinks::display) accel: u32,
        pub(in crate::service::sinks::display) capabilities: u16,
        pub(in crate::service::sinks::display) reserved: [u16; 2],
    }

    /// `FBIOGET_VSCREENINFO` of `<linux/fb.h>`.
    pub(in crate::service::sinks::display) const FBIOGET_VSCREENINFO: u32 = 0x4600;
    /// `FBIOGET_FSCREENINFO` of `<linux/fb.h>`.
    pub(in crate::service::sinks::display) const FBIOGET_FSCREENINFO: u32 = 0x4602;
    /// `FB_TYPE_PACKED_PIXELS` of `<linux/fb.h>`.
    pub(in crate::service::sinks::display) const FB_TYPE_PACKED_PIXELS: u32 = 0;

    /// The pixel format a driver reports, if it is one we draw.
    pub(in crate::service::sinks::display) fn pixel_format(
        var: &FbVarScreeninfo,
    ) -> Result<FbPixelFormat, String> {
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
    pub(in crate::service::sinks::display) fn ioctl_error(
        path: &Path,
        request: &str,
        error: &io::Error,
    ) -> String {
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
    pub(in crate::service::sinks::display) fn query_geometry(
        file: &File,
        path: &Path,
    ) -> Result<(Geometry, u64), String> {
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
    pub(in crate::service::sinks::display) fn query_geometry(
        _file: &File,
        path: &Path,
    ) -> Result<(Geometry, u64), String> {
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
    pub(super) file: File,
    pub(super) path: PathBuf,
    pub(super) geometry: Geometry,
    /// Where the visible area starts (panning); 0 for an explicit geometry.
    pub(super) offset: u64,
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
pub(super) fn write_all_at(file: &File, bytes: &[u8], offset: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(bytes, offset)
}

#[cfg(not(unix))]
pub(super) fn write_all_at(mut file: &File, bytes: &[u8], offset: u64) -> io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    file.seek(SeekFrom::Start(offset))?;
    file.write_all(bytes)
}
