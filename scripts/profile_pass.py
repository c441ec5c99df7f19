#!/usr/bin/env python3
"""Kernel-time breakdown of one fast-engine refinement pass (eager launches, torch.profiler), to see
where a pass's time goes beyond the weight reads.   python3 scripts/profile_pass.py --size 8b"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from nemodiff_compile import load_reference
    from nemodiff_compile.backends.fast import FastDenoiser

    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="8b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--fp8", action="store_true")
    ap.add_argument("--gemv", action="store_true", help="projections through the split-K small-M kernel")
    args = ap.parse_args()
    model = load_reference(args.size, dtype="bfloat16", device="cuda")
    den = FastDenoiser(model, args.context + 2 * args.block, fp8=args.fp8, graphs=False, gemv=args.gemv)
    den.reset(args.batch)
    den.assume_context(args.context)
    den.num_valid.fill_(args.block)
    p = den.dlm_passes(args.block, 0.9, args.block)
    with torch.no_grad():
        for _ in range(3):
            p.denoise()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                p.denoise()
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    gemms(model.config, args.batch * args.block)


def gemms(cfg, M: int) -> None:
    """One layer's projections at M = batch * block rows: bf16 vs the two FP8 paths, each rowwise one with
    and without the split-K GEMV kernel (used for M <= 64), by CUDA events."""
    import torch

    from nemodiff_compile.bench.gpu import time_ms
    from nemodiff_compile.backends.fast_model import Linear

    H, I = cfg.hidden_size, cfg.intermediate_size
    shapes = {"qkv": (cfg.q_width + 2 * cfg.kv_width, H), "o": (H, cfg.q_width), "gate_up": (2 * I, H),
              "down": (H, I)}
    for name, (N, K) in shapes.items():
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        row = [f"{name:8} M={M} N={N} K={K}:"]
        for mode, gemv in ((None, False), (None, True), ("row", False), ("row", True), ("tensor", False)):
            lin = Linear(w, mode, gemv=gemv)
            ms = time_ms(lambda: lin(x), iters=50)
            row.append(f"{mode or 'bf16'}{'+gemv' if gemv else ''} {ms * 1e3:.1f} us "
                       f"({lin.nbytes / (ms / 1e3) / 1e12:.2f} TB/s)")
        print("  ".join(row))


if __name__ == "__main__":
    main()
