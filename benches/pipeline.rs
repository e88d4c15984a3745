//! `cargo bench`: each stage of samrt's pipeline on the default model and a bundled photo, plans
//! built outside the timed loops. For ratios against onnxruntime on the same model, inputs and
//! threads, run `benches/compare_onnxruntime.py` (see benches/README.md).

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use samrt::postprocess::upscale_logits;
use samrt::{CocoRle, MaskOutput, ModelFiles, Prompt, SamPredictor};

fn photo() -> image::RgbImage {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/images/grace_hopper.jpg");
    samrt::image_io::load_rgb(&path).expect("bundled photo")
}

fn stages(c: &mut Criterion) {
    let predictor = SamPredictor::load(&ModelFiles::default_model().unwrap()).unwrap();
    let photo = photo();
    let preprocessed = predictor.preprocess(&photo).unwrap();
    let embedding = predictor.encode(&preprocessed).unwrap();
    let prompt = Prompt::point(264.0, 240.0);
    let (_, tokens) = predictor.decode(&embedding, &prompt).unwrap();
    let mask = predictor
        .predict(&embedding, &prompt, MaskOutput::Single)
        .unwrap()
        .masks[0]
        .mask
        .clone();
    let camera_frame =
        image::imageops::resize(&photo, 1920, 1080, image::imageops::FilterType::Triangle);

    let mut group = c.benchmark_group("stages");
    group.sample_size(10);
    group.bench_function("preprocess 512x600", |b| {
        b.iter(|| predictor.preprocess(black_box(&photo)).unwrap())
    });
    group.bench_function("preprocess 1920x1080", |b| {
        b.iter(|| predictor.preprocess(black_box(&camera_frame)).unwrap())
    });
    group.bench_function("encoder (default model)", |b| {
        b.iter(|| predictor.encode(black_box(&preprocessed)).unwrap())
    });
    group.bench_function("decoder, one point", |b| {
        b.iter(|| predictor.decode(black_box(&embedding), &prompt).unwrap())
    });
    group.bench_function("upscale 256 -> 512x600", |b| {
        b.iter(|| {
            upscale_logits(
                black_box(tokens.logits(0)),
                embedding.input_size,
                embedding.original_size,
            )
        })
    });
    group.bench_function("press -> mask", |b| {
        b.iter(|| {
            predictor
                .predict(black_box(&embedding), &prompt, MaskOutput::Single)
                .unwrap()
        })
    });
    group.bench_function("COCO RLE encode", |b| {
        b.iter(|| CocoRle::encode(black_box(&mask)))
    });
    group.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);
