//! Overlays drawn with embedded-graphics over the photo: masks tinted, their outlines drawn,
//! prompts marked (foreground points green, background points red, boxes as green outlines, as
//! Meta's notebooks draw them).

use std::convert::Infallible;

use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::prelude::{DrawTarget, OriginDimensions, Pixel, Point, Primitive, RgbColor};
use embedded_graphics::primitives::{Circle, PrimitiveStyle, PrimitiveStyleBuilder, Rectangle};
use embedded_graphics::Drawable;
use image::RgbImage;

use crate::postprocess::Mask;
use crate::prompt::{PointLabel, Prompt};

/// Tints of successive masks.
pub const MASK_COLORS: [Rgb888; 6] = [
    Rgb888::new(30, 144, 255),
    Rgb888::new(255, 160, 0),
    Rgb888::new(180, 60, 220),
    Rgb888::new(0, 200, 180),
    Rgb888::new(240, 60, 120),
    Rgb888::new(160, 220, 40),
];
/// Opacity of a mask's tint (of 255).
pub const MASK_OPACITY: u8 = 110;
/// Colour of foreground points and boxes.
pub const FOREGROUND_COLOR: Rgb888 = Rgb888::new(0, 220, 0);
/// Colour of background points.
pub const BACKGROUND_COLOR: Rgb888 = Rgb888::new(230, 0, 0);

/// An embedded-graphics draw target over an RGB image that blends what it draws at `opacity`.
pub struct ImageCanvas<'a> {
    image: &'a mut RgbImage,
    opacity: u8,
}

impl<'a> ImageCanvas<'a> {
    /// A canvas that paints opaque pixels.
    pub fn new(image: &'a mut RgbImage) -> Self {
        ImageCanvas {
            image,
            opacity: 255,
        }
    }

    /// A canvas that blends pixels at `opacity` of 255.
    pub fn blended(image: &'a mut RgbImage, opacity: u8) -> Self {
        ImageCanvas { image, opacity }
    }
}

impl OriginDimensions for ImageCanvas<'_> {
    fn size(&self) -> embedded_graphics::geometry::Size {
        embedded_graphics::geometry::Size::new(self.image.width(), self.image.height())
    }
}

impl DrawTarget for ImageCanvas<'_> {
    type Color = Rgb888;
    type Error = Infallible;

    fn draw_iter<I>(&mut self, pixels: I) -> Result<(), Self::Error>
    where
        I: IntoIterator<Item = Pixel<Self::Color>>,
    {
        let (w, h) = self.image.dimensions();
        let a = u16::from(self.opacity);
        for Pixel(p, color) in pixels {
            if p.x < 0 || p.y < 0 || p.x as u32 >= w || p.y as u32 >= h {
                continue;
            }
            let px = self.image.get_pixel_mut(p.x as u32, p.y as u32);
            for (dst, src) in px.0.iter_mut().zip([color.r(), color.g(), color.b()]) {
                *dst = ((u16::from(src) * a + u16::from(*dst) * (255 - a) + 127) / 255) as u8;
            }
        }
        Ok(())
    }
}

/// Whether the inside pixel (x, y) of a `width` x `height` mask lies on its outline: on the
/// image's border or next to an outside pixel.
pub fn on_outline(
    x: usize,
    y: usize,
    width: usize,
    height: usize,
    inside: impl Fn(usize, usize) -> bool,
) -> bool {
    x == 0
        || y == 0
        || x + 1 == width
        || y + 1 == height
        || !inside(x - 1, y)
        || !inside(x + 1, y)
        || !inside(x, y - 1)
        || !inside(x, y + 1)
}

fn outline(mask: &Mask) -> impl Iterator<Item = (usize, usize)> + '_ {
    let (w, h) = (mask.width, mask.height);
    (0..h)
        .flat_map(move |y| (0..w).map(move |x| (x, y)))
        .filter(move |&(x, y)| mask.get(x, y) && on_outline(x, y, w, h, |x, y| mask.get(x, y)))
}

/// The marker of a prompt point: filled by its label (green foreground, red background), outlined
/// in white.
pub fn point_marker_style(label: PointLabel, stroke: u32) -> PrimitiveStyle<Rgb888> {
    let fill = match label {
        PointLabel::Foreground => FOREGROUND_COLOR,
        PointLabel::Background => BACKGROUND_COLOR,
    };
    PrimitiveStyleBuilder::new()
        .fill_color(fill)
        .stroke_color(Rgb888::WHITE)
        .stroke_width(stroke)
        .build()
}

/// Draws the masks (tinted, outlined) and the prompts over a copy of the photo.
pub fn draw_overlay(photo: &RgbImage, masks: &[&Mask], prompts: &[&Prompt]) -> RgbImage {
    let mut image = photo.clone();
    for (i, mask) in masks.iter().enumerate() {
        let color = MASK_COLORS[i % MASK_COLORS.len()];
        let inside = mask
            .data
            .iter()
            .enumerate()
            .filter(|(_, &b)| b)
            .map(|(j, _)| {
                Pixel(
                    Point::new((j % mask.width) as i32, (j / mask.width) as i32),
                    color,
                )
            });
        let Ok(()) = ImageCanvas::blended(&mut image, MASK_OPACITY).draw_iter(inside);
        let edge = outline(mask).map(|(x, y)| Pixel(Point::new(x as i32, y as i32), color));
        let Ok(()) = ImageCanvas::new(&mut image).draw_iter(edge);
    }
    let short_side = photo.width().min(photo.height());
    let radius = (short_side / 80).max(4);
    let stroke = (short_side / 300).max(2);
    let mut canvas = ImageCanvas::new(&mut image);
    for prompt in prompts {
        if let Some(b) = prompt.bbox {
            let style = PrimitiveStyleBuilder::new()
                .stroke_color(FOREGROUND_COLOR)
                .stroke_width(stroke)
                .build();
            let top_left = Point::new(b.x0.round() as i32, b.y0.round() as i32);
            let bottom_right = Point::new(b.x1.round() as i32, b.y1.round() as i32);
            let Ok(()) = Rectangle::with_corners(top_left, bottom_right)
                .into_styled(style)
                .draw(&mut canvas);
        }
        for p in &prompt.points {
            let style = point_marker_style(p.label, stroke);
            let center = Point::new(p.x.round() as i32, p.y.round() as i32);
            let Ok(()) = Circle::with_center(center, 2 * radius + 1)
                .into_styled(style)
                .draw(&mut canvas);
        }
    }
    image
}

/// A mask as an 8-bit greyscale image: 255 inside, 0 outside.
pub fn mask_image(mask: &Mask) -> image::GrayImage {
    let data = mask.data.iter().map(|&b| if b { 255 } else { 0 }).collect();
    image::GrayImage::from_raw(mask.width as u32, mask.height as u32, data)
        .expect("mask data has width * height values")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_are_tinted_and_prompts_drawn() {
        let photo = RgbImage::from_pixel(40, 30, image::Rgb([0, 0, 0]));
        let mut data = vec![false; 40 * 30];
        for y in 5..15 {
            for x in 5..15 {
                data[y * 40 + x] = true;
            }
        }
        let mask = Mask {
            width: 40,
            height: 30,
            data,
        };
        let prompt = Prompt::point(30.0, 20.0);
        let out = draw_overlay(&photo, &[&mask], &[&prompt]);
        // Inside: blended tint; outline: full colour; outside: untouched; point: green.
        let tint = MASK_COLORS[0];
        let blended = ((u16::from(tint.r()) * u16::from(MASK_OPACITY) + 127) / 255) as u8;
        assert_eq!(out.get_pixel(10, 10).0[0], blended);
        assert_eq!(out.get_pixel(5, 10).0, [tint.r(), tint.g(), tint.b()]);
        assert_eq!(out.get_pixel(25, 5).0, [0, 0, 0]);
        assert_eq!(
            out.get_pixel(30, 20).0,
            [
                FOREGROUND_COLOR.r(),
                FOREGROUND_COLOR.g(),
                FOREGROUND_COLOR.b()
            ]
        );
        assert_eq!(mask_image(&mask).get_pixel(10, 10).0, [255]);
        assert_eq!(mask_image(&mask).get_pixel(0, 0).0, [0]);
    }
}
