//! `samrt::resize::resize_bilinear_pil` against Pillow's `Image.resize(.., BILINEAR)`:
//! every pixel of every golden in tests/data/pil_resize must match exactly.
//! Regenerate the goldens with `tests/reference/make_pil_resize.py`.

use std::path::{Path, PathBuf};

use image::ColorType;
use serde::Deserialize;

#[derive(Deserialize)]
struct Index {
    pillow_version: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    source: String,
    mode: String,
    /// `[width, height]`
    src_size: [usize; 2],
    /// `[width, height]`
    dst_size: [usize; 2],
    output: String,
    what: String,
}

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/pil_resize")
}

/// Decode a PNG that must have exactly the colour type of Pillow mode `mode`.
fn load(path: &Path, mode: &str) -> (Vec<u8>, usize, usize, usize) {
    let (channels, color) = match mode {
        "L" => (1, ColorType::L8),
        "LA" => (2, ColorType::La8),
        "RGB" => (3, ColorType::Rgb8),
        "RGBA" => (4, ColorType::Rgba8),
        other => panic!("unsupported mode {other:?} in index.json"),
    };
    let img = image::open(path).unwrap_or_else(|e| panic!("decoding {}: {e}", path.display()));
    assert_eq!(img.color(), color, "{}: colour type", path.display());
    let (w, h) = (img.width() as usize, img.height() as usize);
    let bytes = img.into_bytes();
    assert_eq!(bytes.len(), w * h * channels);
    (bytes, w, h, channels)
}

#[test]
fn matches_pillow_bilinear_pixel_for_pixel() {
    let dir = data_dir();
    let index_path = dir.join("index.json");
    let index: Index = serde_json::from_str(
        &std::fs::read_to_string(&index_path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", index_path.display())),
    )
    .expect("parsing index.json");
    assert!(!index.cases.is_empty());

    let mut failures = Vec::new();
    for case in &index.cases {
        let (src, sw, sh, channels) = load(&dir.join(&case.source), &case.mode);
        assert_eq!([sw, sh], case.src_size, "{}: source size", case.source);
        let (want, ow, oh, oc) = load(&dir.join(&case.output), &case.mode);
        assert_eq!(
            ([ow, oh], oc),
            (case.dst_size, channels),
            "{}: golden size",
            case.output
        );

        let [dw, dh] = case.dst_size;
        let got = samrt::resize::resize_bilinear_pil(&src, sw, sh, channels, dw, dh);
        assert_eq!(got.len(), want.len(), "{}: output length", case.output);

        let mut mismatched = 0usize;
        let mut first = None;
        for (i, (g, w)) in got
            .chunks_exact(channels)
            .zip(want.chunks_exact(channels))
            .enumerate()
        {
            if g != w {
                mismatched += 1;
                first.get_or_insert((i % dw, i / dw, g.to_vec(), w.to_vec()));
            }
        }
        let label = format!(
            "{} {} {}x{} -> {}x{} ({})",
            case.source, case.mode, sw, sh, dw, dh, case.what
        );
        match first {
            None => eprintln!("ok   {label}"),
            Some((x, y, g, w)) => {
                let msg = format!(
                    "{label}: {mismatched} of {} pixels differ; first at (x={x}, y={y}): got {g:?}, Pillow {w:?}",
                    dw * dh
                );
                eprintln!("FAIL {msg}");
                failures.push(msg);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from Pillow {}:\n{}",
        failures.len(),
        index.cases.len(),
        index.pillow_version,
        failures.join("\n")
    );
}
