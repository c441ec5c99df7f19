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
    from nemodiff_compile.runtime.fast_engine import FastDenoiser

    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="8b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--fp8", action="store_true")
    args = ap.parse_args()
    model = load_reference(args.size, dtype="bfloat16", device="cuda")
    den = FastDenoiser(model, args.context + 2 * args.block, fp8=args.fp8, graphs=False)
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


if __name__ == "__main__":
    main()
