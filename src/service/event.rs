//! Mask events: what the pipeline produces for every prompt on a frame and every sink receives
//! ([`MaskEvent`]), with its JSON record, serialized once for every sink ([`json_line`]).

use std::sync::Arc;
use std::time::SystemTime;

use image::RgbImage;
use serde_json::{json, Value};

use crate::postprocess::Mask;
use crate::prompt::Prompt;
use crate::rle::CocoRle;

/// What asked for a mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptOrigin {
    /// A short press of the button.
    Button,
    /// A long press of the button: segment everything.
    ButtonLong,
    /// The fixed points of the config.
    Fixed,
    /// A box of the object detector, with its class label.
    Detector { label: Option<String> },
    /// A request on the control socket, with the client's request id.
    Control { request_id: Option<String> },
}

impl PromptOrigin {
    /// The name used in JSON records and MQTT topics.
    pub fn kind(&self) -> &'static str {
        match self {
            PromptOrigin::Button => "button",
            PromptOrigin::ButtonLong => "button_long",
            PromptOrigin::Fixed => "fixed",
            PromptOrigin::Detector { .. } => "detector",
            PromptOrigin::Control { .. } => "control",
        }
    }
}

/// One mask of an event.
#[derive(Debug, Clone)]
pub struct EventMask {
    pub mask: Arc<Mask>,
    pub rle: CocoRle,
    /// The decoder's predicted IoU.
    pub score: f32,
    pub stability: f32,
    pub area: u64,
    /// [x, y, w, h] in frame pixels.
    pub bbox: [u32; 4],
}

impl EventMask {
    /// Encodes a mask with its scores.
    pub fn new(mask: Mask, score: f32, stability: f32) -> Self {
        EventMask {
            rle: CocoRle::encode(&mask),
            area: mask.area(),
            bbox: mask.bbox_xywh(),
            mask: Arc::new(mask),
            score,
            stability,
        }
    }
}

/// The masks for one prompt on one frame: what every sink receives.
#[derive(Debug, Clone)]
pub struct MaskEvent {
    /// Counts events from 0 since the service started; gaps never happen.
    pub id: u64,
    /// The sequence number of the frame the masks were decoded on.
    pub frame: u64,
    /// Where the frame came from (a file path, a device).
    pub frame_origin: String,
    pub origin: PromptOrigin,
    /// The prompt (points and box in frame pixels); `None` for segment-everything.
    pub prompt: Option<Prompt>,
    pub masks: Vec<EventMask>,
    /// From the prompt's arrival (the press, the request) to the masks being ready.
    pub latency_ms: f64,
    pub time: SystemTime,
    /// The frame, shared, for overlays.
    pub image: Arc<RgbImage>,
}

impl MaskEvent {
    /// The JSON record shared by the JSONL files, the socket stream, MQTT and control replies.
    pub fn to_json(&self) -> Value {
        let unix_ms = self
            .time
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut record = json!({
            "id": self.id,
            "frame": self.frame,
            "frame_origin": self.frame_origin,
            "source": self.origin.kind(),
            "time_unix_ms": unix_ms,
            "latency_ms": (self.latency_ms * 1000.0).round() / 1000.0,
            "width": self.image.width(),
            "height": self.image.height(),
            "masks": self.masks.iter().map(|m| json!({
                "score": m.score,
                "stability": m.stability,
                "area": m.area,
                "bbox": m.bbox,
                "segmentation": m.rle,
            })).collect::<Vec<_>>(),
        });
        let object = record.as_object_mut().expect("a JSON object");
        match &self.origin {
            PromptOrigin::Detector { label: Some(label) } => {
                object.insert("label".into(), json!(label));
            }
            PromptOrigin::Control {
                request_id: Some(id),
            } => {
                object.insert("request_id".into(), json!(id));
            }
            _ => {}
        }
        if let Some(prompt) = &self.prompt {
            object.insert("prompt".into(), prompt_json(prompt));
        }
        record
    }
}

/// A record as one line: its JSON and a newline.
pub fn json_line(record: &Value) -> Vec<u8> {
    let mut line = serde_json::to_vec(record).expect("a JSON value serializes");
    line.push(b'\n');
    line
}

/// A prompt as JSON: `{"points": [[x, y, label], ...], "box": [x0, y0, x1, y1]}`.
pub fn prompt_json(prompt: &Prompt) -> Value {
    let points: Vec<Value> = prompt
        .points
        .iter()
        .map(|p| json!([p.x, p.y, p.label.value()]))
        .collect();
    let mut value = json!({ "points": points });
    if let Some(b) = prompt.bbox {
        value["box"] = json!([b.x0, b.y0, b.x1, b.y1]);
    }
    value
}
