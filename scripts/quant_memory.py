#!/usr/bin/env python
"""Peak host RSS of a quantized build against the checkpoint's size.

Writes a random-weight checkpoint of a few hundred MB (bf16 on disk), then runs
`build_engine(BuildConfig.of(precision=P, validate=False, ...))` on it in a fresh child process and reports the
child's peak RSS (VmHWM), the RSS at each build phase, and the ratio peak / checkpoint bytes, both
whole and above the baseline of the process with its libraries imported (torch, ModelOpt, onnx,
onnxscript: about 0.5 GiB, whatever the model). Prints a table and, last, one JSON line.

    python scripts/quant_memory.py [--precision fp8] [--hidden 1024 --layers 8 --vocab 32000]
        [--float-dtype bfloat16] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(args) -> None:
    """The measured process: build the quantized engine, print phases and the peak as JSON."""
    from nemodiff_compile.build_config import BuildConfig
    from nemodiff_compile.pipeline import build_engine
    from nemodiff_compile.quant import recipe_for

    phases = []

    def progress(msg: str) -> None:
        phases.append({"phase": msg, "rss_mb": round(rss_mb(), 1), "peak_mb": round(rss_mb("VmHWM"), 1)})

    recipe = recipe_for(args.precision).with_(float_dtype=args.float_dtype, calib_max_new_tokens=16)
    import warnings

    with warnings.catch_warnings():   # the libraries baseline, before any weight is touched
        warnings.simplefilter("ignore")
        import modelopt.torch.quantization  # noqa: F401
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
        import torch  # noqa: F401

    progress("start (libraries imported, nothing loaded)")
    start = time.time()
    build_engine(BuildConfig.of(source=args.checkpoint, output=args.output, backend="onnxruntime",
                                precision=args.precision, calib=args.calib, validate=False),
                 recipe=recipe, progress=progress)
    progress("done")
    print(json.dumps({"phases": phases, "peak_mb": rss_mb("VmHWM"), "seconds": time.time() - start}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", default="fp8", choices=["fp8", "int8", "int4-awq"])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--float-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                    help="dtype of the unquantized graph parts (the model is calibrated as stored, bf16)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir, removed)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    ap.add_argument("--output", help=argparse.SUPPRESS)
    ap.add_argument("--calib", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    import torch

    from nemodiff_compile.config import PRESETS
    from nemodiff_compile.model.checkpoint import random_model, save_checkpoint

    work = args.work or Path(tempfile.mkdtemp(prefix="quant-memory-"))
    try:
        h = args.hidden
        cfg = PRESETS["tiny"].replace(hidden_size=h, intermediate_size=int(h * 2.75) // 64 * 64,
                                      num_hidden_layers=args.layers, num_attention_heads=h // 64,
                                      num_key_value_heads=max(1, h // 256), head_dim=64, vocab_size=args.vocab,
                                      mask_token_id=100, dtype="bfloat16")
        ckpt = work / "ckpt"
        model = random_model(cfg, dtype=torch.bfloat16)
        save_checkpoint(model, ckpt)
        del model
        ckpt_bytes = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
        params = cfg.num_parameters()
        calib = work / "calib.jsonl"                        # id prompts: the random model has no tokenizer
        calib.write_text("".join(json.dumps({"ids": [1] + [200 + 37 * i + j for j in range(12 + 4 * i)]}) + "\n"
                                 for i in range(4)))
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        out = subprocess.run([sys.executable, __file__, "--child", "--precision", args.precision,
                              "--float-dtype", args.float_dtype, "--checkpoint", str(ckpt),
                              "--output", str(work / "engine"), "--calib", str(calib)],
                             capture_output=True, text=True, env=env)
        if out.returncode != 0:
            sys.exit(f"build failed:\n{out.stderr[-3000:]}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        onnx_bytes = sum(p.stat().st_size for p in (work / "engine").glob("model.onnx*"))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    ckpt_mb = ckpt_bytes / 2**20
    print(f"model       {params / 1e6:.1f} M parameters, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
          f"vocab {cfg.vocab_size}")
    print(f"checkpoint  {ckpt_mb:.1f} MiB (bf16 safetensors)")
    print(f"build       {args.precision}, float parts {args.float_dtype}, {res['seconds']:.1f} s, "
          f"ONNX {onnx_bytes / 2**20:.1f} MiB")
    for p in res["phases"]:
        print(f"  rss {p['rss_mb']:8.1f} MiB  peak {p['peak_mb']:8.1f} MiB  at: {p['phase']}")
    base = res["phases"][0]["rss_mb"]
    print(f"peak RSS    {res['peak_mb']:.1f} MiB = {res['peak_mb'] / ckpt_mb:.2f} x checkpoint; above the "
          f"{base:.0f} MiB baseline: {(res['peak_mb'] - base) / ckpt_mb:.2f} x checkpoint")
    print(json.dumps({"precision": args.precision, "float_dtype": args.float_dtype, "parameters": params,
                      "checkpoint_mb": round(ckpt_mb, 1), "peak_rss_mb": round(res["peak_mb"], 1),
                      "ratio": round(res["peak_mb"] / ckpt_mb, 3), "baseline_rss_mb": base,
                      "ratio_above_baseline": round((res["peak_mb"] - base) / ckpt_mb, 3),
                      "phases": res["phases"], "onnx_mb": round(onnx_bytes / 2**20, 1),
                      "seconds": round(res["seconds"], 1)}))


if __name__ == "__main__":
    main()
