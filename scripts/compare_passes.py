"""Wall time of bare engine passes of two engines, alternating: what a graph change does to a pass.

    python scripts/compare_passes.py /tmp/engine-before /tmp/engine-after --reps 12 [--threads 1]

Each engine runs a causal prefill of `--prefix` tokens per row, then bidirectional passes over a block of
`--block` tokens (a dlm denoise pass) at batch 1, 4 and 8; every repetition times `--passes` passes per batch
size on one engine and then the other (0.05 s apart, so neither runs while the other's ONNX Runtime workers
still spin), and the median over repetitions goes into one JSON line: ms per pass per engine and batch, and
after / before. Interleaving is what makes the ratio usable on a shared machine whose speed drifts by tens of
percent within minutes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--passes", type=int, default=20, help="timed passes per batch size and repetition")
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--prefix", type=int, default=60)
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads [default: its own]")
    args = ap.parse_args()
    for d in (args.before, args.after):
        if not d.is_dir():
            ap.error(f"{d}: expected an engine directory")

    import torch

    from nemodiff_compile.errors import NemodiffError
    from nemodiff_compile.session import Session

    torch.set_num_threads(1)                     # the host side only builds inputs
    try:
        dens = [Session.open(d, threads=args.threads).denoiser for d in (args.before, args.after)]
    except NemodiffError as e:                   # an engine this machine cannot run, a damaged one: one line
        ap.error(str(e))
    batches = [int(b) for b in args.batches.split(",")]
    vocab = dens[0].config.vocab_size
    ms: list[dict[int, list[float]]] = [{b: [] for b in batches} for _ in dens]
    for _ in range(args.reps):
        for den, times in zip(dens, ms):
            for b in batches:
                g = torch.Generator().manual_seed(b)
                den.reset(b)
                den.step(torch.randint(0, vocab, (b, args.prefix), generator=g), causal=True, write=True)
                block = torch.randint(0, vocab, (b, args.block), generator=g)                  # [b, block]
                for _ in range(3):                                                          # warm this shape
                    den.step(block, causal=False, write=False)
                t0 = time.perf_counter()
                for _ in range(args.passes):
                    den.step(block, causal=False, write=False)
                times[b].append((time.perf_counter() - t0) / args.passes * 1e3)
                time.sleep(0.05)
    med = [{b: round(statistics.median(t[b]), 3) for b in batches} for t in ms]
    print(json.dumps(dict(before=str(args.before), after=str(args.after), threads=args.threads, reps=args.reps,
                          block=args.block, prefix=args.prefix, ms_per_pass_before=med[0], ms_per_pass_after=med[1],
                          after_over_before={b: round(med[1][b] / med[0][b], 3) for b in batches})), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
