#!/usr/bin/env python
"""End-to-end build of the 3B geometry on this machine: wall time per stage and peak RSS against the
bf16 checkpoint size. Not run in CI (a 3B bf16 model is ~7.1 GiB).

Runs `nemodiff-compile build --size 3b --random-weights --precision fp8 --no-validate` in a child
process, timestamps every `[build] ...` line it prints (each starts a stage), samples the child's RSS
(/proc/PID/status) twice a second, and prints a table and, last, one JSON line. --timeout-min stops
the child and reports the stages it reached.

    nice -n 19 python scripts/build_3b.py [--precision fp8] [--timeout-min 25] [--calib FILE] [--work DIR]
        [--extra "--max-context 256"]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def status_kb(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="3b", choices=["3b", "8b", "14b"])
    ap.add_argument("--precision", default="fp8")
    ap.add_argument("--timeout-min", type=float, default=25.0)
    ap.add_argument("--calib", type=Path, default=None, help="calibration prompts (default: the build's)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir, removed)")
    ap.add_argument("--extra", default="", help="more build flags, one string")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    from nemodiff_compile.config import PRESETS

    cfg = PRESETS[args.size]
    ckpt_bytes = cfg.num_parameters() * 2                 # bf16, as published
    work = args.work or Path(tempfile.mkdtemp(prefix="build-3b-"))
    cmd = [sys.executable, "-m", "nemodiff_compile", "build", "--size", args.size, "--random-weights",
           "--precision", args.precision, "--no-validate", "--output", str(work / "engine"),
           *(["--calib", str(args.calib)] if args.calib else []), *shlex.split(args.extra)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               NEMODIFF_PROGRESS="plain")
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             start_new_session=True)
    stages: list[dict] = []
    samples = {"peak_kb": 0, "rss_kb": 0}

    def sample() -> None:
        while child.poll() is None:
            rss, hwm = status_kb(child.pid, "VmRSS"), status_kb(child.pid, "VmHWM")
            if rss is not None:
                samples["rss_kb"] = rss
                samples["peak_kb"] = max(samples["peak_kb"], hwm or rss)
            time.sleep(0.5)

    plan: list[str] = []

    def read() -> None:
        for line in child.stderr:
            line = line.rstrip()
            print(line, file=sys.stderr, flush=True)
            if not line.startswith("[build] "):
                continue
            msg, now = line[8:], time.perf_counter() - start
            if msg.startswith(("plan", "machine", "model ")):
                plan.append(msg)
            elif stages and (re.match(r"^[\w ]+: [\d.]+(/[\d.]+)? ", msg)       # a progress bar's plain line
                             or re.match(r"^\w+ in [\d.]+ s$", msg)):            # "loaded in 90.8 s"
                stages[-1]["progress"] = msg
            else:                                                           # a new stage
                if stages:
                    stages[-1]["seconds"] = round(now - stages[-1]["start_s"], 1)
                stages.append({"stage": msg, "start_s": round(now, 1), "seconds": None,
                               "rss_mb_at_start": round(samples["rss_kb"] / 1024, 1),
                               "peak_mb_so_far": round(samples["peak_kb"] / 1024, 1)})

    threads = [threading.Thread(target=f, daemon=True) for f in (sample, read)]
    for t in threads:
        t.start()
    timed_out = False
    try:
        child.wait(timeout=args.timeout_min * 60)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(child.pid, signal.SIGTERM)
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    for t in threads:
        t.join(timeout=5)
    seconds = time.perf_counter() - start
    if stages and stages[-1]["seconds"] is None:
        stages[-1]["seconds"] = round(seconds - stages[-1]["start_s"], 1)
    onnx_bytes = sum(p.stat().st_size for p in (work / "engine").glob("model.onnx*")) if not timed_out else 0
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    peak_mb = samples["peak_kb"] / 1024
    ckpt_mb = ckpt_bytes / 2**20
    print(f"\n{args.size} {args.precision}: {'TIMED OUT after' if timed_out else 'exit ' + str(child.returncode) + ','}"
          f" {seconds / 60:.1f} min, peak RSS {peak_mb:.0f} MiB = {peak_mb / ckpt_mb:.2f} x the bf16 checkpoint "
          f"({ckpt_mb:.0f} MiB)")
    for s in stages:
        sec = f"{s['seconds']:8.1f} s" if s["seconds"] is not None else "         "
        print(f"  {sec}  rss {s['rss_mb_at_start']:7.0f} MiB  {s['stage']}"
              + (f"  [{s['progress']}]" if s.get("progress") else ""))
    print(json.dumps({"size": args.size, "precision": args.precision, "returncode": child.returncode,
                      "timed_out": timed_out, "seconds": round(seconds, 1), "checkpoint_mb": round(ckpt_mb, 1),
                      "peak_rss_mb": round(peak_mb, 1), "ratio": round(peak_mb / ckpt_mb, 3),
                      "onnx_mb": round(onnx_bytes / 2**20, 1), "stages": stages, "plan": plan,
                      "command": cmd[2:]}))
    return 0 if child.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
