#!/usr/bin/env python3
"""Generate Pillow goldens for `samrt::jpeg` (JPEG decoding bit-identical to Pillow).

For every test JPEG, records width, height, the sha256 of the file and the sha256 of
`np.asarray(Image.open(f).convert("RGB")).tobytes()` into
tests/data/reference/jpeg_decode.json, which tests/jpeg_decode.rs walks: samrt's decode of
each file must give exactly these bytes.

The files are every tests/data/images/*.jpg plus a few small JPEG variants that those
photos do not cover (greyscale, 4:2:2, progressive, restart markers, Adobe CMYK; all at
an odd size). The variants are made here with Pillow from a crop of
grace_hopper.jpg and written to tests/data/images/jpeg_cases/ (a few KB each); existing
variant files are kept, so re-running with another Pillow does not silently change the test
inputs (pass --regenerate-cases to rewrite them).

Run with the reference venv:

    /opt/samref/bin/python tests/reference/make_jpeg_reference.py

EXIF orientation is not applied (none of these files has one); samrt applies it after
decoding, as OpenCV's imread does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, JpegImagePlugin, features

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "tests" / "data" / "images"
CASES = IMAGES / "jpeg_cases"
OUT = ROOT / "tests" / "data" / "reference" / "jpeg_decode.json"
SOURCE = IMAGES / "grace_hopper.jpg"
# Crop (left, upper, right, lower) of grace_hopper.jpg: odd sizes, so that partial MCUs and
# the edge columns/rows of the chroma upsampling are exercised.
CROP = (101, 80, 402, 311)  # 301 x 231
# CMYK stores four full-resolution channels: a smaller crop keeps that file small.
CROP_CMYK = (151, 130, 352, 281)  # 201 x 151

# name -> (how it is made from the crop, Pillow save arguments)
VARIANTS: dict[str, tuple[str, dict]] = {
    "grey.jpg": (f"crop {CROP}, convert('L'), quality 85", {"quality": 85}),
    "ycc422.jpg": (f"crop {CROP}, RGB, 4:2:2 chroma subsampling, quality 85", {"quality": 85, "subsampling": "4:2:2"}),
    "progressive420.jpg": (
        f"crop {CROP}, RGB, progressive, 4:2:0, quality 80 (multi-scan decoding path)",
        {"quality": 80, "subsampling": "4:2:0", "progressive": True},
    ),
    "restart444.jpg": (
        f"crop {CROP}, RGB, 4:4:4, restart marker every 5 MCUs, quality 75",
        {"quality": 75, "subsampling": "4:4:4", "restart_marker_blocks": 5},
    ),
    "cmyk.jpg": (f"crop {CROP_CMYK}, convert('CMYK') (Adobe CMYK, inverted), quality 85", {"quality": 85}),
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_variants(regenerate: bool) -> None:
    CASES.mkdir(parents=True, exist_ok=True)
    source = Image.open(SOURCE).convert("RGB")
    crop = source.crop(CROP)
    for name, (_, kwargs) in VARIANTS.items():
        path = CASES / name
        if path.exists() and not regenerate:
            continue
        im = crop
        if name.startswith("grey"):
            im = crop.convert("L")
        elif name.startswith("cmyk"):
            im = source.crop(CROP_CMYK).convert("CMYK")
        im.save(path, "JPEG", **kwargs)
        size = path.stat().st_size
        assert size < 30_000, f"{path} is {size} bytes; keep test inputs small"


def describe(path: Path) -> dict:
    data = path.read_bytes()
    with Image.open(path) as im:
        assert im.format == "JPEG", path
        mode = im.mode
        sampling = JpegImagePlugin.get_sampling(im)
        progressive = bool(im.info.get("progressive", 0))
        orientation = im.getexif().get(0x0112, 1)
        assert orientation == 1, f"{path}: EXIF orientation {orientation} is not handled here"
        rgb = np.asarray(im.convert("RGB"))
    h, w, c = rgb.shape
    assert c == 3 and rgb.dtype == np.uint8
    rel = path.relative_to(ROOT).as_posix()
    entry = {
        "file": rel,
        "width": w,
        "height": h,
        "file_sha256": sha256(data),
        "rgb_sha256": sha256(rgb.tobytes()),
        "pillow_mode": mode,
        "subsampling": {-1: None, 0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}.get(sampling, str(sampling)),
        "progressive": progressive,
    }
    if path.parent == CASES:
        entry["made_by"] = "this script, from tests/data/images/grace_hopper.jpg: " + VARIANTS[path.name][0]
    return entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--regenerate-cases", action="store_true", help="rewrite tests/data/images/jpeg_cases/*.jpg")
    args = ap.parse_args()
    make_variants(args.regenerate_cases)
    files = sorted(IMAGES.glob("*.jpg")) + [CASES / name for name in VARIANTS]
    doc = {
        "generator": "tests/reference/make_jpeg_reference.py",
        "decode": 'np.asarray(PIL.Image.open(file).convert("RGB")).tobytes(), no EXIF orientation applied',
        "pillow": PIL.__version__,
        "libjpeg_turbo": features.version("libjpeg_turbo"),
        "numpy": np.__version__,
        "cases_note": (
            "tests/data/images/jpeg_cases/*.jpg were written by this script with the Pillow above "
            "(see each entry's made_by); they are kept, not rewritten, on later runs"
        ),
        "images": [describe(f) for f in files],
    }
    OUT.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}: {len(doc['images'])} images")


if __name__ == "__main__":
    main()
