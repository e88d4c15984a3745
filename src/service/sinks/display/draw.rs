//! One mask event drawn into a [`Framebuffer`]: the frame letterboxed, masks tinted and
//! outlined, prompts marked, a status line.

use std::ops::Range;

use embedded_graphics::geometry::{Point, Size};
use embedded_graphics::mono_font::ascii::{FONT_10X20, FONT_6X10};
use embedded_graphics::mono_font::MonoTextStyleBuilder;
use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::prelude::{DrawTarget, Primitive, RgbColor};
use embedded_graphics::primitives::{Circle, PrimitiveStyleBuilder, Rectangle};
use embedded_graphics::text::{Baseline, Text};
use embedded_graphics::Drawable;

use super::super::MaskEvent;
use crate::overlay::{on_outline, point_marker_style, FOREGROUND_COLOR, MASK_COLORS, MASK_OPACITY};
use crate::postprocess::Mask;
use crate::service::event::PromptOrigin;

use super::framebuffer::Framebuffer;

/// Where the frame lands on the display: the largest rectangle of the frame's aspect ratio that
/// fits, centred.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Viewport {
    pub(super) x: u32,
    pub(super) y: u32,
    pub(super) width: u32,
    pub(super) height: u32,
    pub(super) frame_width: u32,
    pub(super) frame_height: u32,
}

impl Viewport {
    /// `None` for an empty frame or display.
    pub(super) fn fit(
        frame_width: u32,
        frame_height: u32,
        width: u32,
        height: u32,
    ) -> Option<Self> {
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
    pub(super) fn to_display(self, x: f64, y: f64) -> Point {
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
pub(super) fn sample_map(dst: u32, src: usize) -> Vec<usize> {
    let (dst, src64) = (dst as u64, src as u64);
    (0..dst)
        .map(|i| (((2 * i + 1) * src64 / (2 * dst)) as usize).min(src.saturating_sub(1)))
        .collect()
}

/// The display pixels whose source pixel lies in `lo..=hi` (the map is non-decreasing).
pub(super) fn display_range(map: &[usize], lo: usize, hi: usize) -> Range<usize> {
    map.partition_point(|&s| s < lo)..map.partition_point(|&s| s <= hi)
}

/// One mask resampled to the viewport.
pub(super) struct MaskView<'a> {
    pub(super) mask: &'a Mask,
    pub(super) cols: Vec<usize>,
    pub(super) rows: Vec<usize>,
    /// Viewport columns and rows that can be inside (from the mask's bounding box).
    pub(super) x_range: Range<usize>,
    pub(super) y_range: Range<usize>,
    pub(super) color: Rgb888,
}

impl<'a> MaskView<'a> {
    /// `None` for an empty or malformed mask. `bbox` is `[x, y, w, h]` with inclusive extents
    /// (`x..=x + w`), as [`Mask::bbox_xywh`] gives it.
    pub(super) fn new(
        mask: &'a Mask,
        bbox: [u32; 4],
        color: Rgb888,
        view: &Viewport,
    ) -> Option<Self> {
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

    pub(super) fn inside(&self, x: usize, y: usize) -> bool {
        self.mask.data[self.rows[y] * self.mask.width + self.cols[x]]
    }

    /// Whether an inside pixel is on the outline: next to an outside pixel or the frame's edge,
    /// in display pixels (so the outline stays one display pixel wide at any scale).
    pub(super) fn on_edge(&self, x: usize, y: usize) -> bool {
        on_outline(x, y, self.cols.len(), self.rows.len(), |x, y| {
            self.inside(x, y)
        })
    }
}

/// `over` blended onto `under` at `MASK_OPACITY`, as [`crate::overlay::ImageCanvas`] blends.
pub(super) fn blend(under: Rgb888, over: Rgb888) -> Rgb888 {
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

pub(super) fn draw_prompts(fb: &mut Framebuffer, view: &Viewport, event: &MaskEvent) {
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
pub(super) fn status_text(event: &MaskEvent) -> String {
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

pub(super) fn draw_status(fb: &mut Framebuffer, event: &MaskEvent) {
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
