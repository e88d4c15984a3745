//! Prompts, their validation, and the transform into the decoder's frame, as Meta's ONNX example
//! does it: points first, then the box as two points labelled 2 and 3; without a box, a padding
//! point (0, 0) labelled -1; coordinates scaled per axis by new/old size
//! (`ResizeLongestSide.apply_coords`, in float64, then cast to float32).

use crate::error::{Error, Result};
use crate::preprocess::Size;
use crate::sam_sizes::{LOW_RES_MASK_LEN, LOW_RES_MASK_SIZE};

/// Whether a point marks the object (foreground) or what is not the object (background).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointLabel {
    Background,
    Foreground,
}

impl PointLabel {
    /// SAM's label value: 1 foreground, 0 background.
    pub fn value(self) -> f32 {
        match self {
            PointLabel::Background => 0.0,
            PointLabel::Foreground => 1.0,
        }
    }

    /// Parses SAM's numeric label (1 or 0).
    pub fn from_value(v: f64) -> Result<Self> {
        if v == 1.0 {
            Ok(PointLabel::Foreground)
        } else if v == 0.0 {
            Ok(PointLabel::Background)
        } else {
            Err(Error::Prompt(format!(
                "point label {v} is not 1 (foreground) or 0 (background)"
            )))
        }
    }
}

/// A point in original-image pixel coordinates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PointPrompt {
    pub x: f64,
    pub y: f64,
    pub label: PointLabel,
}

/// A box in original-image pixel coordinates, corners (x0, y0) top-left and (x1, y1) bottom-right.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BoxPrompt {
    pub x0: f64,
    pub y0: f64,
    pub x1: f64,
    pub y1: f64,
}

/// Label of a box's top-left corner in the decoder input.
pub const BOX_TOP_LEFT_LABEL: f32 = 2.0;
/// Label of a box's bottom-right corner in the decoder input.
pub const BOX_BOTTOM_RIGHT_LABEL: f32 = 3.0;
/// Label of the padding point added when there is no box.
pub const PADDING_POINT_LABEL: f32 = -1.0;

/// One prompt set: points, an optional box, an optional previous low-res mask to refine.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Prompt {
    pub points: Vec<PointPrompt>,
    pub bbox: Option<BoxPrompt>,
    /// A previous 256x256 low-resolution logit mask (e.g. [`crate::predictor::PredictedMask::low_res_logits`]).
    pub mask_input: Option<Vec<f32>>,
}

/// A prompt in the decoder's frame: `n` (x, y) pairs and `n` labels.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderPrompt {
    pub point_coords: Vec<f32>,
    pub point_labels: Vec<f32>,
}

impl DecoderPrompt {
    /// Number of points, padding point and box corners included.
    pub fn num_points(&self) -> usize {
        self.point_labels.len()
    }
}

fn check_coordinate(what: &str, x: f64, y: f64, size: Size) -> Result<()> {
    if !x.is_finite() || !y.is_finite() {
        return Err(Error::Prompt(format!(
            "{what} ({x}, {y}) is not a finite number"
        )));
    }
    let (w, h) = (size.width as f64, size.height as f64);
    if x < 0.0 || y < 0.0 || x > w || y > h {
        return Err(Error::Prompt(format!(
            "{what} ({x}, {y}) is outside the {}x{} image (x must be in 0..={}, y in 0..={}; coordinates are pixels of the original image)",
            size.width, size.height, size.width, size.height
        )));
    }
    Ok(())
}

impl Prompt {
    /// A prompt of one foreground point.
    pub fn point(x: f64, y: f64) -> Self {
        Prompt {
            points: vec![PointPrompt {
                x,
                y,
                label: PointLabel::Foreground,
            }],
            ..Default::default()
        }
    }

    /// A prompt of one box.
    pub fn boxed(x0: f64, y0: f64, x1: f64, y1: f64) -> Self {
        Prompt {
            bbox: Some(BoxPrompt { x0, y0, x1, y1 }),
            ..Default::default()
        }
    }

    /// Checks the prompt against the original image size: at least one point or a box, finite
    /// coordinates inside the image, a box with positive width and height, a 256x256 mask input.
    pub fn validate(&self, image: Size) -> Result<()> {
        if self.points.is_empty() && self.bbox.is_none() {
            return Err(Error::Prompt(
                "empty prompt: give at least one point or a box".to_string(),
            ));
        }
        for (i, p) in self.points.iter().enumerate() {
            check_coordinate(&format!("point {}", i + 1), p.x, p.y, image)?;
        }
        if let Some(b) = self.bbox {
            check_coordinate("box corner (x0, y0)", b.x0, b.y0, image)?;
            check_coordinate("box corner (x1, y1)", b.x1, b.y1, image)?;
            if b.x1 <= b.x0 || b.y1 <= b.y0 {
                return Err(Error::Prompt(format!(
                    "box [{}, {}, {}, {}] is empty or inverted: it must be x0,y0,x1,y1 with x0 < x1 and y0 < y1",
                    b.x0, b.y0, b.x1, b.y1
                )));
            }
        }
        if let Some(m) = &self.mask_input {
            if m.len() != LOW_RES_MASK_LEN {
                return Err(Error::Prompt(format!(
                    "mask input has {} values, expected a {LOW_RES_MASK_SIZE}x{LOW_RES_MASK_SIZE} low-resolution logit mask ({LOW_RES_MASK_LEN})",
                    m.len()
                )));
            }
            if m.iter().any(|v| !v.is_finite()) {
                return Err(Error::Prompt(
                    "mask input contains NaN or infinite values".into(),
                ));
            }
        }
        Ok(())
    }

    /// The decoder's inputs for this prompt (`apply_coords` from `original` to `input` size).
    pub fn to_decoder(&self, original: Size, input: Size) -> DecoderPrompt {
        let sx = input.width as f64 / original.width as f64;
        let sy = input.height as f64 / original.height as f64;
        let mut point_coords = Vec::with_capacity(2 * (self.points.len() + 2));
        let mut point_labels = Vec::with_capacity(self.points.len() + 2);
        let mut push = |x: f64, y: f64, label: f32| {
            point_coords.push((x * sx) as f32);
            point_coords.push((y * sy) as f32);
            point_labels.push(label);
        };
        for p in &self.points {
            push(p.x, p.y, p.label.value());
        }
        match self.bbox {
            Some(b) => {
                push(b.x0, b.y0, BOX_TOP_LEFT_LABEL);
                push(b.x1, b.y1, BOX_BOTTOM_RIGHT_LABEL);
            }
            None => push(0.0, 0.0, PADDING_POINT_LABEL),
        }
        DecoderPrompt {
            point_coords,
            point_labels,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMAGE: Size = Size {
        height: 300,
        width: 451,
    };
    const INPUT: Size = Size {
        height: 681,
        width: 1024,
    };

    #[test]
    fn points_get_a_padding_point_and_scale_per_axis() {
        let p = Prompt {
            points: vec![
                PointPrompt {
                    x: 100.0,
                    y: 50.0,
                    label: PointLabel::Foreground,
                },
                PointPrompt {
                    x: 451.0,
                    y: 300.0,
                    label: PointLabel::Background,
                },
            ],
            ..Default::default()
        };
        let d = p.to_decoder(IMAGE, INPUT);
        assert_eq!(d.point_labels, vec![1.0, 0.0, -1.0]);
        let (sx, sy) = (1024.0 / 451.0, 681.0 / 300.0);
        assert_eq!(d.point_coords[0], (100.0f64 * sx) as f32);
        assert_eq!(d.point_coords[1], (50.0f64 * sy) as f32);
        assert_eq!(d.point_coords[2], 1024.0);
        assert_eq!(d.point_coords[3], 681.0);
        assert_eq!(&d.point_coords[4..], &[0.0, 0.0]);
    }

    #[test]
    fn box_becomes_two_labelled_corners_after_the_points_and_no_padding() {
        let mut p = Prompt::boxed(10.0, 20.0, 200.0, 100.0);
        p.points.push(PointPrompt {
            x: 50.0,
            y: 60.0,
            label: PointLabel::Foreground,
        });
        let d = p.to_decoder(IMAGE, INPUT);
        assert_eq!(d.point_labels, vec![1.0, 2.0, 3.0]);
        assert_eq!(d.num_points(), 3);
        assert_eq!(d.point_coords[2], (10.0f64 * 1024.0 / 451.0) as f32);
    }

    #[test]
    fn bad_prompts_are_rejected_with_a_reason() {
        let cases: Vec<(Prompt, &str)> = vec![
            (Prompt::default(), "empty prompt"),
            (Prompt::point(-1.0, 5.0), "outside"),
            (Prompt::point(452.0, 5.0), "outside"),
            (Prompt::point(5.0, 300.5), "outside"),
            (Prompt::point(f64::NAN, 5.0), "finite"),
            (Prompt::point(5.0, f64::INFINITY), "finite"),
            (Prompt::boxed(100.0, 10.0, 50.0, 20.0), "inverted"),
            (Prompt::boxed(10.0, 10.0, 10.0, 20.0), "empty"),
            (Prompt::boxed(10.0, 10.0, 500.0, 20.0), "outside"),
            (
                Prompt {
                    mask_input: Some(vec![0.0; 10]),
                    ..Prompt::point(1.0, 1.0)
                },
                "256x256",
            ),
            (
                Prompt {
                    mask_input: Some(vec![f32::NAN; LOW_RES_MASK_LEN]),
                    ..Prompt::point(1.0, 1.0)
                },
                "NaN",
            ),
        ];
        for (prompt, needle) in cases {
            let err = prompt.validate(IMAGE).expect_err(needle).to_string();
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
        }
        Prompt::point(0.0, 0.0).validate(IMAGE).unwrap();
        Prompt::point(451.0, 300.0).validate(IMAGE).unwrap();
        Prompt::boxed(0.0, 0.0, 451.0, 300.0)
            .validate(IMAGE)
            .unwrap();
    }

    #[test]
    fn labels_parse_strictly() {
        assert_eq!(PointLabel::from_value(1.0).unwrap(), PointLabel::Foreground);
        assert_eq!(PointLabel::from_value(0.0).unwrap(), PointLabel::Background);
        assert!(PointLabel::from_value(2.0).is_err());
        assert!(PointLabel::from_value(f64::NAN).is_err());
    }
}

/// One prompt set as written in a prompts file: `{"points": [[x, y, label], ...], "box": [x0, y0, x1, y1]}`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PromptSetJson {
    #[serde(default)]
    points: Vec<Vec<f64>>,
    #[serde(default, rename = "box")]
    bbox: Option<[f64; 4]>,
}

/// Parses a point written as `[x, y]` or `[x, y, label]` (label 1 when absent).
pub fn point_from_values(values: &[f64]) -> Result<PointPrompt> {
    let label = match values.len() {
        2 => PointLabel::Foreground,
        3 => PointLabel::from_value(values[2])?,
        n => {
            return Err(Error::Prompt(format!(
                "a point is [x, y] or [x, y, label], got {n} numbers"
            )))
        }
    };
    Ok(PointPrompt {
        x: values[0],
        y: values[1],
        label,
    })
}

/// Parses a prompts file: a JSON array of prompt sets, each with optional `points` and `box`.
pub fn parse_prompt_sets(json: &str) -> Result<Vec<Prompt>> {
    let sets: Vec<PromptSetJson> = serde_json::from_str(json).map_err(|e| {
        Error::Prompt(format!(
            "{e}; expected a JSON array like [{{\"points\": [[x, y, 1]], \"box\": [x0, y0, x1, y1]}}]"
        ))
    })?;
    sets.into_iter()
        .enumerate()
        .map(|(i, set)| {
            let points = set
                .points
                .iter()
                .map(|p| point_from_values(p))
                .collect::<Result<Vec<_>>>()
                .map_err(|e| Error::Prompt(format!("prompt set {i}: {e}")))?;
            let bbox = set
                .bbox
                .map(|[x0, y0, x1, y1]| BoxPrompt { x0, y0, x1, y1 });
            Ok(Prompt {
                points,
                bbox,
                mask_input: None,
            })
        })
        .collect()
}

#[cfg(test)]
mod file_tests {
    use super::*;

    #[test]
    fn prompt_sets_parse_and_reject_unknown_keys() {
        let sets = parse_prompt_sets(
            r#"[{"points": [[10, 20, 1], [30, 40, 0], [5, 6]]}, {"box": [1, 2, 3, 4]}, {"points": [[1, 1]], "box": [0, 0, 9, 9]}]"#,
        )
        .unwrap();
        assert_eq!(sets.len(), 3);
        assert_eq!(sets[0].points[1].label, PointLabel::Background);
        assert_eq!(sets[0].points[2].label, PointLabel::Foreground);
        assert_eq!(
            sets[1].bbox,
            Some(BoxPrompt {
                x0: 1.0,
                y0: 2.0,
                x1: 3.0,
                y1: 4.0
            })
        );
        assert!(sets[2].bbox.is_some() && sets[2].points.len() == 1);
        for bad in [
            r#"{"points": []}"#,
            r#"[{"pionts": [[1, 2]]}]"#,
            r#"[{"points": [[1]]}]"#,
            r#"[{"points": [[1, 2, 7]]}]"#,
            r#"[{"box": [1, 2, 3]}]"#,
        ] {
            assert!(parse_prompt_sets(bad).is_err(), "{bad}");
        }
    }
}
