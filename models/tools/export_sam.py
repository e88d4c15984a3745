#!/usr/bin/env python3
"""Export a Segment Anything model to a samrt model directory (encoder.onnx, decoder.onnx, manifest.json).

    python models/tools/export_sam.py --arch {vit_b,vit_l,vit_h,vit_b_reduced,mobile_sam} \
        (--checkpoint PATH | --random-weights --seed N) --out DIR [--quantize int8-dynamic|int8-static ...] [--opset 17]

What it writes (all tensors float32):

* ``encoder.onnx`` -- ``sam.image_encoder`` only. Input ``image`` [1,3,1024,1024], already normalized with
  pixel_mean/pixel_std and zero-padded bottom/right (what Meta's ``Sam.preprocess`` does); output
  ``image_embeddings`` [1,256,64,64].
* ``decoder.onnx`` -- Meta's prompt encoder + mask decoder as in ``segment_anything.utils.onnx.SamOnnxModel``
  (same ``_embed_points`` / ``_embed_masks`` / ``mask_decoder.predict_masks``), but multimask, low
  resolution, no selection and no upsampling: inputs ``image_embeddings`` [1,256,64,64],
  ``point_coords`` [1,N,2] (N = "num_points", dynamic; coordinates in the 1024-long-side input frame),
  ``point_labels`` [1,N], ``mask_input`` [1,1,256,256], ``has_mask_input`` [1]; outputs
  ``low_res_masks`` [1,4,256,256] (all four mask tokens, token 0 = single-mask output) and
  ``iou_predictions`` [1,4]. Like SamOnnxModel it does NOT add the padding point that Meta's
  PromptEncoder appends when there is no box: the caller appends (0,0) with label -1.
* ``encoder.int8.onnx`` (``--quantize int8-dynamic``) -- ``onnxruntime.quantization.quantize_dynamic``,
  QInt8 per-tensor weights (DynamicQuantizeLinear + MatMulInteger/ConvInteger).
* ``encoder.int8-static.onnx`` (``--quantize int8-static``) -- samrt's own int8: the linear layers in
  static QDQ, weights per channel, activation scales calibrated on photos (``quantize_static.py``).
* ``manifest.json`` -- names, sha256 sums, normalization constants, versions.

Every ONNX file is checked against PyTorch with onnxruntime before the manifest is written.

Random weights (``--random-weights --seed N``): the model is built under ``torch.manual_seed(N)`` with
PyTorch's default initializers, then every parameter that those initializers leave constant
(``pos_embed`` and ``rel_pos_*`` are zeros, LayerNorm weights ones and biases zeros) is redrawn from a
normal distribution (see ``randomize_constant_parameters``) so that the position embedding, the
relative-position terms and the norms all take part in the computation. Same torch version + same seed
=> same weights (the tool checks this by building twice and comparing).

Architectures: vit_b / vit_l / vit_h are segment_anything.build_sam's; vit_b_reduced is the small test
fixture (see ARCHS); mobile_sam needs MobileSAM's code (`pip install mobilesam-mirror==1.0.0 timm`),
otherwise the tool says so and exits. Models over 2 GB (vit_h fp32) get their weights in one
``encoder.onnx.data`` file beside the model (named in the manifest as encoder.external_data).

Licence of the modelling code used: segment-anything (Meta), Apache-2.0.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

PIXEL_MEAN = [123.675, 116.28, 103.53]
PIXEL_STD = [58.395, 57.12, 57.375]
IMAGE_SIZE = 1024
DECODER_INPUTS = ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input"]
DECODER_OUTPUTS = ["low_res_masks", "iou_predictions"]

# Image encoder hyper-parameters. vit_b/l/h are those of segment_anything.build_sam;
# vit_b_reduced is the ViT-B construction with depth 2 (block 0 windowed, block 1 global) and
# embed_dim 192 / 3 heads (head_dim 64 like ViT-B) so that the fp32 encoder is < 10 MB.
ARCHS = {
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=[7, 15, 23, 31], decoder_depth=2),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=[5, 11, 17, 23], decoder_depth=2),
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=[2, 5, 8, 11], decoder_depth=2),
    # decoder_depth: TwoWayTransformer depth. Meta's is 2; the reduced fixture uses 1 so that the whole
    # committed directory stays < 25 MB (everything else in the decoder is full size).
    "vit_b_reduced": dict(embed_dim=192, depth=2, num_heads=3, global_attn_indexes=[1], decoder_depth=1),
}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_dict_sha256(model: nn.Module) -> str:
    """sha256 over (name, dtype, shape, raw little-endian bytes) of every state_dict entry, in order."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        a = t.numpy()
        h.update(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
    return h.hexdigest()


def build_sam_arch(arch: str):
    """Same construction as segment_anything.build_sam._build_sam, parameterised (no checkpoint)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    a = ARCHS[arch]
    prompt_embed_dim = 256
    image_size = IMAGE_SIZE
    vit_patch_size = 16
    image_embedding_size = image_size // vit_patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=a["depth"],
            embed_dim=a["embed_dim"],
            img_size=image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=a["num_heads"],
            patch_size=vit_patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=a["global_attn_indexes"],
            window_size=14,
            out_chans=prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_embed_dim,
            image_embedding_size=(image_embedding_size, image_embedding_size),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=a["decoder_depth"],
                embedding_dim=prompt_embed_dim,
                mlp_dim=2048,
                num_heads=8,
            ),
            transformer_dim=prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=PIXEL_MEAN,
        pixel_std=PIXEL_STD,
    )
    sam.eval()
    return sam


def randomize_constant_parameters(sam: nn.Module) -> list[str]:
    """Redraw (from the global torch RNG, in named_parameters order) every parameter that PyTorch's
    default initialisation leaves constant, so random-weight models exercise every term:
    zero-filled -> N(0, 0.02) (pos_embed: ViT's usual std) except rel_pos_* -> N(0, 0.1)
    (so the decomposed relative-position bias is of the same order as the scaled q.k), one-filled ->
    1 + N(0, 0.1)."""
    changed = []
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if p.numel() < 2:
                continue
            flat = p.reshape(-1)
            if not bool((flat == flat[0]).all()):
                continue
            v = float(flat[0])
            if v == 0.0:
                std = 0.1 if ".rel_pos_" in name else 0.02
                p.copy_(torch.randn(p.shape) * std)
            elif v == 1.0:
                p.copy_(1.0 + torch.randn(p.shape) * 0.1)
            else:
                continue
            changed.append(name)
    return changed


MOBILE_SAM_HINT = (
    "export_sam.py: --arch mobile_sam is not supported here: it needs MobileSAM's code (TinyViT image "
    "encoder), which segment-anything does not ship. Install it with `pip install mobilesam-mirror==1.0.0 "
    "timm` (a PyPI packaging of github.com/ChaoningZhang/MobileSAM, Apache-2.0; import name mobile_sam) "
    "and rerun; the weights are MobileSAM's mobile_sam.pt (--checkpoint)."
)


def build_sam_from_registry(arch: str):
    if arch == "mobile_sam":
        try:
            from mobile_sam.build_sam import build_sam_vit_t
        except ImportError as e:
            sys.exit(f"{MOBILE_SAM_HINT}\n(import failed: {e})")
        return build_sam_vit_t(checkpoint=None)
    return build_sam_arch(arch)


def build_sam(arch: str, checkpoint: str | None, seed: int | None):
    if checkpoint is not None:
        sam = build_sam_from_registry(arch)
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        sam.load_state_dict(state)
        sam.eval()
        return sam, f"checkpoint {sha256_file(Path(checkpoint))}"
    torch.manual_seed(seed)
    sam = build_sam_from_registry(arch)
    randomize_constant_parameters(sam)
    # eval() again: MobileSAM's TinyViT attention caches its attention biases in train(False).
    sam.train()
    sam.eval()
    return sam, f"random, seed {seed}"


class LowResMultimaskDecoder(nn.Module):
    """SamOnnxModel's prompt embedding + mask_decoder.predict_masks; all four mask tokens, low-res."""

    def __init__(self, sam):
        super().__init__()
        from segment_anything.utils.onnx import SamOnnxModel

        self.onnx_model = SamOnnxModel(sam, return_single_mask=False)

    @torch.no_grad()
    def forward(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input):
        m = self.onnx_model
        sparse_embedding = m._embed_points(point_coords, point_labels)
        dense_embedding = m._embed_masks(mask_input, has_mask_input)
        masks, scores = m.model.mask_decoder.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=m.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse_embedding,
            dense_prompt_embeddings=dense_embedding,
        )
        return masks, scores


def ort_session(path: Path, threads: int = 0):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def errors(ref: np.ndarray, got: np.ndarray) -> dict:
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    scale = float(np.abs(ref).max())
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "max_rel_to_max": float(diff.max() / scale) if scale else 0.0,
        "ref_max_abs": scale,
    }


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def op_types(path: Path) -> dict:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    c = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}" for n in m.graph.node)
    return dict(sorted(c.items()))


def preprocess_image(sam, path: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """Meta's SamPredictor.set_image preprocessing: RGB uint8 -> ResizeLongestSide(1024) -> normalize -> pad."""
    from PIL import Image
    from segment_anything.utils.transforms import ResizeLongestSide

    image = np.array(Image.open(path).convert("RGB"))
    t = ResizeLongestSide(sam.image_encoder.img_size)
    resized = t.apply_image(image)
    x = torch.as_tensor(resized).permute(2, 0, 1).contiguous()[None, :, :, :]
    return sam.preprocess(x.float()), tuple(x.shape[-2:])


def export_encoder(sam, path: Path, opset: int):
    x = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    torch.onnx.export(
        sam.image_encoder,
        (x,),
        str(path),
        input_names=["image"],
        output_names=["image_embeddings"],
        opset_version=opset,
        do_constant_folding=True,
        dynamo=False,
    )
    consolidate_external_data(path)
    if not (path.parent / (path.name + ".data")).exists():
        set_output_shapes(path, {"image_embeddings": [1, 256, 64, 64]})


def consolidate_external_data(path: Path):
    """Models over 2 GB (vit_h) get external data; keep it in one '<file>.data' beside the model."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    if not any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer):
        return
    m = onnx.load(str(path))
    for f in path.parent.iterdir():
        if f != path and f.suffix != ".onnx" and f.name not in ("manifest.json",):
            f.unlink()
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def set_output_shapes(path: Path, shapes: dict):
    """The TorchScript exporter declares some outputs with made-up symbolic dims (e.g.
    'Addimage_embeddings_dim_0'); declare the real static ones and check them with strict ONNX shape
    inference (num_points, the only dynamic input dim, stays symbolic)."""
    import onnx

    m = onnx.load(str(path))
    for o in m.graph.output:
        if o.name in shapes:
            dims = o.type.tensor_type.shape.dim
            assert len(dims) == len(shapes[o.name]), (o.name, dims)
            for d, v in zip(dims, shapes[o.name]):
                d.Clear()
                d.dim_value = v
    onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True)
    onnx.save_model(m, str(path))


def export_decoder(sam, path: Path, opset: int):
    dec = LowResMultimaskDecoder(sam).eval()
    n = 5
    dummy = (
        torch.randn(1, 256, 64, 64),
        torch.randint(0, IMAGE_SIZE, (1, n, 2)).float(),
        torch.randint(-1, 4, (1, n)).float(),
        torch.randn(1, 1, 256, 256),
        torch.tensor([1.0]),
    )
    torch.onnx.export(
        dec,
        dummy,
        str(path),
        input_names=DECODER_INPUTS,
        output_names=DECODER_OUTPUTS,
        dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}},
        opset_version=opset,
        do_constant_folding=True,
        dynamo=False,
    )
    set_output_shapes(path, {"low_res_masks": [1, 4, 256, 256], "iou_predictions": [1, 4]})
    return dec


def check_encoder(sam, path: Path, image_path: str | None) -> dict:
    sess = ort_session(path)
    out = {}
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    with torch.no_grad():
        ref = sam.image_encoder(x).numpy()
    got = sess.run(["image_embeddings"], {"image": x.numpy()})[0]
    assert got.shape == (1, 256, 64, 64), got.shape
    out["random_input"] = errors(ref, got)
    if image_path:
        xi, _ = preprocess_image(sam, image_path)
        with torch.no_grad():
            ref = sam.image_encoder(xi).numpy()
        got = sess.run(["image_embeddings"], {"image": xi.numpy()})[0]
        out["photo"] = {"image": os.path.basename(image_path), **errors(ref, got)}
    return out


def check_decoder(dec, path: Path) -> dict:
    sess = ort_session(path)
    g = torch.Generator().manual_seed(4321)
    results = {}
    for n, has_mask in ((1, 0.0), (2, 0.0), (3, 1.0), (7, 0.0)):
        emb = torch.randn(1, 256, 64, 64, generator=g)
        coords = torch.rand(1, n, 2, generator=g) * IMAGE_SIZE
        labels = torch.randint(-1, 4, (1, n), generator=g).float()
        mask = torch.randn(1, 1, 256, 256, generator=g) * 5
        hm = torch.tensor([has_mask])
        ref_m, ref_s = dec(emb, coords, labels, mask, hm)
        feeds = dict(zip(DECODER_INPUTS, [t.numpy() for t in (emb, coords, labels, mask, hm)]))
        got_m, got_s = sess.run(DECODER_OUTPUTS, feeds)
        assert got_m.shape == (1, 4, 256, 256), got_m.shape
        assert got_s.shape == (1, 4), got_s.shape
        results[f"points={n},has_mask={int(has_mask)}"] = {
            "low_res_masks": errors(ref_m.numpy(), got_m),
            "iou_predictions": errors(ref_s.numpy(), got_s),
        }
    return results


def compare_to_fp32(fp32_path: Path, quantized_path: Path, inputs: dict) -> dict:
    """Cosine and errors of a quantized encoder's embedding against the fp32 encoder's, per input."""
    fp, q = ort_session(fp32_path), ort_session(quantized_path)
    results = {}
    for k, x in inputs.items():
        a = fp.run(["image_embeddings"], {"image": x})[0]
        b = q.run(["image_embeddings"], {"image": x})[0]
        results[k] = {"cosine_vs_fp32": cosine(a, b), **errors(a, b)}
    return results


def quantize_encoder(src: Path, dst: Path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    big = (src.parent / (src.name + ".data")).exists()
    quantize_dynamic(
        model_input=str(src),
        model_output=str(dst),
        weight_type=QuantType.QInt8,
        per_channel=False,
        reduce_range=False,
        op_types_to_quantize=["MatMul", "Conv"],
        use_external_data_format=big,
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", required=True, choices=["vit_b", "vit_l", "vit_h", "vit_b_reduced", "mobile_sam"])
    w = ap.add_mutually_exclusive_group(required=True)
    w.add_argument("--checkpoint", help="Meta's state_dict checkpoint (e.g. sam_vit_b_01ec64.pth)")
    w.add_argument("--random-weights", action="store_true", help="random weights (needs --seed)")
    ap.add_argument("--seed", type=int, help="seed for --random-weights")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--quantize", choices=["int8-dynamic", "int8-static"], action="append", default=[],
                    help="also write a quantized encoder (repeat for both)")
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--name", default=None, help="manifest name (default: the --out directory name)")
    ap.add_argument("--check-image", default=None,
                    help="photo for the fp32-vs-torch and int8-vs-fp32 checks "
                         "(default: tests/data/images/grace_hopper.jpg of this repository when present)")
    ap.add_argument("--report", type=Path, default=None, help="also write the check results as JSON here")
    args = ap.parse_args(argv)
    if args.random_weights and args.seed is None:
        ap.error("--random-weights needs --seed N")
    if args.checkpoint and args.seed is not None:
        ap.error("--seed only goes with --random-weights")

    import onnx
    import onnxruntime
    import segment_anything
    from importlib.metadata import version

    check_image = args.check_image
    if check_image is None:
        default = Path(__file__).resolve().parents[2] / "tests/data/images/grace_hopper.jpg"
        check_image = str(default) if default.exists() else None

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.time()
    sam, weights = build_sam(args.arch, args.checkpoint, args.seed)
    if args.random_weights:
        # Determinism: the same seed must give the same weights.
        torch.manual_seed(args.seed)
        again = build_sam_from_registry(args.arch)
        randomize_constant_parameters(again)
        assert state_dict_sha256(again) == state_dict_sha256(sam), "random weights are not reproducible"
        del again
    report = {"arch": args.arch, "weights": weights, "state_dict_sha256": state_dict_sha256(sam),
              "parameters": {k: sum(p.numel() for p in getattr(sam, k).parameters())
                             for k in ("image_encoder", "prompt_encoder", "mask_decoder")}}

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmpd:
        tmp = Path(tmpd)
        enc_path, dec_path = tmp / "encoder.onnx", tmp / "decoder.onnx"
        t = time.time()
        export_encoder(sam, enc_path, args.opset)
        report["encoder_export_s"] = round(time.time() - t, 1)
        t = time.time()
        dec = export_decoder(sam, dec_path, args.opset)
        report["decoder_export_s"] = round(time.time() - t, 1)
        for p in (enc_path, dec_path):
            onnx.checker.check_model(str(p))
        report["encoder_check"] = check_encoder(sam, enc_path, check_image)
        report["decoder_check"] = check_decoder(dec, dec_path)
        report["encoder_ops"] = op_types(enc_path)
        report["decoder_ops"] = op_types(dec_path)
        variants = []
        check_inputs = {}
        if check_image and args.quantize:
            check_inputs[os.path.basename(check_image)] = preprocess_image(sam, check_image)[0].numpy()
        if "int8-dynamic" in args.quantize:
            q_path = tmp / "encoder.int8.onnx"
            t = time.time()
            quantize_encoder(enc_path, q_path)
            report["quantize_s"] = round(time.time() - t, 1)
            report["encoder_int8_ops"] = op_types(q_path)
            inputs = {"random_input": torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE,
                                                  generator=torch.Generator().manual_seed(1234)).numpy()}
            report["int8_check"] = compare_to_fp32(enc_path, q_path, {**inputs, **check_inputs})
            variants.append({"file": "encoder.int8.onnx", "sha256": sha256_file(q_path), "precision": "int8-dynamic"})
        if "int8-static" in args.quantize:
            import quantize_static

            s_path = tmp / quantize_static.FILE
            t = time.time()
            quantize_static.quantize_static_encoder(enc_path, s_path, quantize_static.default_calibration_images(),
                                                    PIXEL_MEAN, PIXEL_STD, "image")
            report["quantize_static_s"] = round(time.time() - t, 1)
            report["int8_static_check"] = compare_to_fp32(enc_path, s_path, check_inputs)
            variants.append({"file": quantize_static.FILE, "sha256": sha256_file(s_path),
                             "precision": quantize_static.PRECISION})

        # Move into place only after all checks passed.
        for f in sorted(tmp.iterdir()):
            dst = out / f.name
            if dst.exists():
                dst.unlink()
            shutil.move(str(f), str(dst))

    manifest = {
        "name": args.name or out.resolve().name,
        "architecture": args.arch,
        "weights": weights,
        "image_size": IMAGE_SIZE,
        "pixel_mean": PIXEL_MEAN,
        "pixel_std": PIXEL_STD,
        "encoder": {"file": "encoder.onnx", "sha256": sha256_file(out / "encoder.onnx"),
                    "input": "image", "output": "image_embeddings", "precision": "fp32"},
        "encoder_variants": variants,
        "decoder": {"file": "decoder.onnx", "sha256": sha256_file(out / "decoder.onnx"),
                    "inputs": DECODER_INPUTS, "outputs": DECODER_OUTPUTS, "mask_tokens": 4},
        "exported_by": {"tool": "models/tools/export_sam.py", "torch": torch.__version__,
                        "segment_anything": version("segment_anything"), "onnx": onnx.__version__,
                        "opset": args.opset},
    }
    if (out / "encoder.onnx.data").exists():
        manifest["encoder"]["external_data"] = "encoder.onnx.data"
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    report["onnxruntime"] = onnxruntime.__version__
    written = ["encoder.onnx", "encoder.onnx.data", "decoder.onnx", "manifest.json"] + [v["file"] for v in variants]
    report["files"] = {n: (out / n).stat().st_size for n in sorted(written) if (out / n).exists()}
    report["total_s"] = round(time.time() - t0, 1)
    print(json.dumps(report, indent=2))
    if args.report:
        # Without the timings, so that a re-run writes the same file.
        stable = {k: v for k, v in report.items() if not k.endswith("_s")}
        args.report.write_text(json.dumps(stable, indent=2) + "\n")


if __name__ == "__main__":
    main()
