#!/usr/bin/env python3
"""Generate Pillow goldens for `samrt::resize::resize_bilinear_pil`.

Writes small source crops of scikit-image sample photos and their
`Image.resize((w, h), Image.BILINEAR)` results into tests/data/pil_resize/,
plus an index.json that tests/pil_resize.rs walks (every pixel must match).

Run with the reference venv:

    /opt/samref/bin/python tests/reference/make_pil_resize.py

Sources come from scikit-image's installed data directory (see PROVENANCE.md
in the output directory). Everything is stored as PNG, i.e. lossless.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import PIL
import skimage
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "data" / "pil_resize"
SKDATA = Path(skimage.__file__).resolve().parent / "data"
# sha256 of the original photos the crops come from (scikit-image 0.26.0), as listed
# in PROVENANCE.md.
ORIGINALS = {
    "chelsea.png": "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
    "camera.png": "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a",
}


def sam_size(w: int, h: int, long_side: int = 1024) -> tuple[int, int]:
    """segment_anything ResizeLongestSide.get_preprocess_shape, returned as (w, h)."""
    scale = long_side * 1.0 / max(h, w)
    return int(w * scale + 0.5), int(h * scale + 0.5)


def pass_order(im: Image.Image, w: int, h: int) -> str | None:
    """Which separable pass Pillow ran first, found by comparing with the two
    single-axis resizes chained in each order (None for alpha modes, whose
    premultiplication round trip makes chained resizes incomparable)."""
    if im.mode not in ("L", "RGB"):
        return None
    W, H = im.size
    if w == W or h == H:
        return "single pass" if (w, h) != (W, H) else "copy"
    direct = im.resize((w, h), Image.BILINEAR).tobytes()
    hv = im.resize((w, H), Image.BILINEAR).resize((w, h), Image.BILINEAR).tobytes()
    vh = im.resize((W, h), Image.BILINEAR).resize((w, h), Image.BILINEAR).tobytes()
    if direct == hv and direct != vh:
        return "horizontal first"
    if direct == vh and direct != hv:
        return "vertical first"
    return "either" if direct == hv else "neither?!"


def save_png(im: Image.Image, name: str) -> None:
    im.save(OUT / name, format="PNG", optimize=True)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.png"):
        old.unlink()

    for name, digest in ORIGINALS.items():
        got = hashlib.sha256((SKDATA / name).read_bytes()).hexdigest()
        assert got == digest, f"{SKDATA / name} changed: sha256 {got}, PROVENANCE.md says {digest}"
    chelsea = Image.open(SKDATA / "chelsea.png")
    camera = Image.open(SKDATA / "camera.png")
    chelsea.load()
    camera.load()
    assert chelsea.mode == "RGB" and chelsea.size == (451, 300), (chelsea.mode, chelsea.size)
    assert camera.mode == "L" and camera.size == (512, 512), (camera.mode, camera.size)

    # Crops (no resampling involved, so the sources are the photos' own pixels).
    # Chelsea's face and fur: 160x120 RGB.
    cat = chelsea.crop((140, 40, 300, 160))
    # The cameraman's head, camera and tripod: 96x128 grey (portrait orientation).
    cam = camera.crop((180, 40, 276, 168))
    cam_rgb = cam.convert("RGB")
    # A 1-pixel-wide column and a 1-pixel-high row of the cat.
    cat_col = cat.crop((80, 0, 81, 120))
    cat_row = cat.crop((0, 60, 160, 61))
    # RGBA / LA: Pillow resizes these premultiplied (RGBa / La) and converts back.
    # Alpha is a synthetic ramp with fully transparent and fully opaque bands
    # (so both special cases of the un-premultiplication are exercised).
    a = np.clip(np.arange(160)[None, :] * 2.2 - 40 + np.arange(120)[:, None] * 0.7, 0, 255)
    alpha = Image.fromarray(a.astype(np.uint8), "L")
    cat_rgba = cat.copy()
    cat_rgba.putalpha(alpha)
    cam_la = cam.copy()
    cam_la.putalpha(alpha.crop((20, 0, 116, 120)).resize((96, 128), Image.NEAREST))

    sources = {
        "cat_rgb.png": cat,
        "cam_l.png": cam,
        "cam_rgb.png": cam_rgb,
        "cat_col_rgb.png": cat_col,
        "cat_row_rgb.png": cat_row,
        "cat_rgba.png": cat_rgba,
        "cam_la.png": cam_la,
    }
    for name, im in sources.items():
        save_png(im, name)

    cases: list[tuple[str, tuple[int, int], str]] = []

    def add(src: str, dst: tuple[int, int], what: str) -> None:
        cases.append((src, dst, what))

    # 160x120 RGB
    add("cat_rgb.png", (241, 187), "upscale both axes, non-integer")
    add("cat_rgb.png", (320, 240), "upscale both axes, exactly 2x")
    add("cat_rgb.png", (97, 71), "downscale both axes, non-integer (antialias)")
    add("cat_rgb.png", (80, 60), "downscale both axes, exactly 2x")
    add("cat_rgb.png", (45, 31), "downscale both axes by more than 3x")
    # Pillow 13 runs the vertical pass first iff the height shrinks and
    # 2 * (src_w - dst_w) < src_h - dst_h (found by probing; see src/resize.rs).
    add("cat_rgb.png", (211, 53), "width up, height down (vertical pass first)")
    add("cat_rgb.png", (140, 30), "both down, height much more (vertical pass first)")
    add("cat_rgb.png", (57, 150), "width down, height up")
    add("cat_rgb.png", (160, 77), "width unchanged, height down")
    add("cat_rgb.png", (103, 120), "height unchanged, width down")
    add("cat_rgb.png", (160, 181), "width unchanged, height up")
    add("cat_rgb.png", (160, 120), "identity size")
    add("cat_rgb.png", (1, 1), "down to a single pixel")
    add("cat_rgb.png", (7, 1), "down to a single row")
    # 96x128 grey, as "L" and converted to "RGB" (these carry the SAM cases: a
    # 1024x768 RGB golden of the cat would be ~0.5 MB on its own)
    for src in ("cam_l.png", "cam_rgb.png"):
        add(src, sam_size(96, 128), "SAM ResizeLongestSide(1024), portrait")
        add(src, (61, 83), "downscale both axes, non-integer (antialias)")
        add(src, (23, 29), "downscale both axes by more than 4x")
        add(src, (131, 200), "upscale both axes, non-integer")
        add(src, (96, 40), "width unchanged, height down by more than 3x")
        add(src, (150, 128), "height unchanged, width up")
        add(src, (37, 301), "width down, height up")
    # Either side of the pass-order boundary for 96x128 -> h=64: 2*(96-w) < 64 <=> w > 64.
    add("cam_l.png", (64, 64), "pass-order boundary: horizontal first (2*32 == 64)")
    add("cam_l.png", (65, 64), "pass-order boundary: vertical first (2*31 < 64)")
    # 1-pixel-wide / -high sources
    add("cat_col_rgb.png", (1, 47), "1-pixel-wide source, height down")
    add("cat_col_rgb.png", (5, 301), "1-pixel-wide source, both up")
    add("cat_row_rgb.png", (71, 1), "1-pixel-high source, width down")
    add("cat_row_rgb.png", (333, 9), "1-pixel-high source, both up")
    # Alpha modes (premultiplied round trip inside Image.resize)
    add("cat_rgba.png", (97, 71), "RGBA downscale (premultiplied)")
    add("cat_rgba.png", (241, 187), "RGBA upscale (premultiplied)")
    add("cat_rgba.png", (160, 77), "RGBA width unchanged (premultiplied)")
    add("cat_rgba.png", (181, 60), "RGBA width up, height down (vertical first, premultiplied)")
    add("cat_rgba.png", (160, 120), "RGBA identity size (plain copy, no premultiplication)")
    add("cam_la.png", (61, 83), "LA downscale (premultiplied)")
    add("cam_la.png", (131, 200), "LA upscale (premultiplied)")

    index_cases = []
    for src, (w, h), what in cases:
        im = sources[src]
        out = im.resize((w, h), Image.BILINEAR)
        assert out.mode == im.mode and out.size == (w, h)
        if (w, h) == im.size:
            # Identity: Image.resize returns a plain copy; point at the source
            # instead of storing the same pixels twice.
            assert out.tobytes() == im.tobytes()
            name = src
        else:
            name = f"{src.removesuffix('.png')}__{w}x{h}.png"
            save_png(out, name)
        index_cases.append(
            {
                "source": src,
                "mode": im.mode,
                "src_size": list(im.size),
                "dst_size": [w, h],
                "output": name,
                "what": what,
                "pass_order": pass_order(im, w, h),
            }
        )

    index = {
        "generator": "tests/reference/make_pil_resize.py",
        "pillow_version": PIL.__version__,
        "scikit_image_version": skimage.__version__,
        "call": "Image.resize((w, h), Image.BILINEAR)",
        "sizes": "[width, height]",
        "cases": index_cases,
    }
    # One case per line keeps the file short and diffs readable.
    text = json.dumps(index, indent=1)
    cases_json = ",\n".join("  " + json.dumps(c) for c in index_cases)
    head, _, _ = text.partition('"cases": [')
    text = head + '"cases": [\n' + cases_json + "\n ]\n}"
    assert json.loads(text) == index
    (OUT / "index.json").write_text(text + "\n")
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"{len(index_cases)} cases, {total / 1e6:.3f} MB in {OUT}")


if __name__ == "__main__":
    main()
