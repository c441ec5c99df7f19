"""Where a batched decode's time goes, in-process (no HTTP): closed-loop clients on one `Session`.

    python scripts/profile_scheduler.py engines/tiny-fp32-onnxruntime --mode dlm --levels 1,8 --rounds 2

At each concurrency c, c threads each call `Session.generate` on the next prompt until `--requests` (default
max(16, 4 x c)) are done; with `--rounds R` the levels run in turn R times and pool their figures. One JSON
line per level:

  tokens_per_s            generated tokens over wall seconds (moves with the machine's load)
  tokens_per_cpu_s        over this process's CPU seconds (steadier on a shared machine: the ratio that a
                          saturated machine would show)
  passes, rows_per_pass   engine passes, and rows per pass by phase (prefill / denoise / commit / decode / ...)
  pass_ms, host_ms        per pass, CPU time of the scheduler's thread inside the backend's `_pass` (the
                          engine call and its feeds) and in the rest of the pass (row programs, commit rules,
                          gathering the rows' K/V)
and a last line with the c8 / c1 ratios when both levels ran. `--passes` first times bare engine passes (a
bidirectional block over a 24-token prefix, batch 1, 2, 4, 8 in turn, CPU time of this thread, 25th percentile):
what a pass of B rows costs against one row bounds what batching can gain.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engine", type=Path)
    ap.add_argument("--mode", default="dlm", choices=("ar", "dlm", "linear-spec"))
    ap.add_argument("--levels", default="1,8")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--requests", type=int, default=None, help="per level and round [default: max(16, 4 x c)]")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads")
    ap.add_argument("--prompts", type=Path, default=ROOT / "docs/prompts/tiny-heldout.txt")
    ap.add_argument("--passes", action="store_true", help="first time bare engine passes at batch 1, 2, 4, 8")
    args = ap.parse_args()

    from nemodiff_compile.errors import NemodiffError
    from nemodiff_compile.serve.server import host_threads
    from nemodiff_compile.session import Session

    host_threads()                                            # as the server does
    if not args.prompts.is_file():
        ap.error(f"--prompts {args.prompts}: no such file")
    prompts = [ln.strip() for ln in args.prompts.read_text().splitlines() if ln.strip()]
    try:
        session = Session.open(args.engine, threads=args.threads)
    except NemodiffError as e:
        ap.error(str(e))
    if args.passes:
        with session.scheduler.exclusive() as den:
            time_passes(den)
    probe = Probe(session)
    session.generate(prompts[0], chat=False, mode=args.mode, max_new_tokens=args.max_tokens)     # warm-up
    levels = [int(c) for c in args.levels.split(",")]
    acc = {c: collections.Counter() for c in levels}
    for _ in range(args.rounds):
        for c in levels:
            acc[c].update(run_level(session, probe, prompts, c, args))
    for c in levels:
        a = acc[c]
        print(json.dumps(dict(
            concurrency=c, mode=args.mode, tokens=a["tokens"], tokens_per_s=round(a["tokens"] / a["wall"], 1),
            tokens_per_cpu_s=round(a["tokens"] / a["cpu"], 1), passes=a["passes"],
            rows_per_pass=round(a["rows"] / a["passes"], 2),
            rows_per_pass_by_phase={k[5:]: round(a[k] / a["n." + k[5:]], 2)
                                    for k in sorted(a) if k.startswith("rows.")},
            pass_ms=round(1000 * a["pass_cpu"] / a["passes"], 2),
            host_ms=round(1000 * (a["all_cpu"] - a["pass_cpu"]) / a["passes"], 2))), flush=True)
    if 1 in acc and 8 in acc:
        ratio = lambda key: round((acc[8]["tokens"] / acc[8][key]) / (acc[1]["tokens"] / acc[1][key]), 2)  # noqa: E731
        print(json.dumps(dict(mode=args.mode, tokens_per_s_c8_over_c1=ratio("wall"),
                              tokens_per_cpu_s_c8_over_c1=ratio("cpu"))), flush=True)
    session.close()
    return 0


class Probe:
    """Counts on the scheduler's thread: CPU time per pass (all of it, and inside the backend's `_pass`),
    rows per pass by phase."""

    def __init__(self, session):
        sch, den = session.scheduler, session.denoiser
        self.counts: collections.Counter = collections.Counter()
        one_pass, backend_pass, sched_pass = sch._one_pass, den._pass, sch._pass

        def timed_one_pass():
            t0 = time.thread_time()
            one_pass()
            self.counts["all_cpu"] += time.thread_time() - t0

        def timed_backend_pass(*a, **kw):
            t0 = time.thread_time()
            out = backend_pass(*a, **kw)
            self.counts["pass_cpu"] += time.thread_time() - t0
            return out

        def counted_pass(members, *a):
            phases = collections.Counter(sch._slots[b]._step.phase for b in members)
            kind = "commit" if "commit" in phases else max(phases, key=phases.get)   # riders: prefills in a commit
            self.counts.update({"passes": 1, "rows": len(members), "n." + kind: 1, "rows." + kind: len(members)})
            return sched_pass(members, *a)

        sch._one_pass, den._pass, sch._pass = timed_one_pass, timed_backend_pass, counted_pass


def time_passes(den, batches=(1, 2, 4, 8), repeats: int = 40) -> None:
    import torch

    L = den.config.block_size or 16
    tokens = {B: torch.randint(200, den.config.vocab_size, (B, L)) for B in batches}
    times: dict[int, list[float]] = {B: [] for B in batches}
    for i in range(repeats + 2):                  # batch sizes in turn, so the machine's load hits each alike
        for B in batches:
            den.reset(B)
            den.step(torch.randint(200, den.config.vocab_size, (B, 24)), causal=True, write=True)
            t0 = time.thread_time()
            den.step(tokens[B], causal=False, write=False)
            if i >= 2:                                # warm-up
                times[B].append(time.thread_time() - t0)
    p25 = {B: sorted(t)[len(t) // 4] for B, t in times.items()}
    for B in batches:
        print(json.dumps(dict(batch=B, block=L, pass_ms=round(1000 * p25[B], 2), over_batch1=round(p25[B] / p25[1], 2),
                              ms_per_row=round(1000 * p25[B] / B, 2))), flush=True)


def run_level(session, probe: Probe, prompts: list[str], c: int, args) -> collections.Counter:
    from nemodiff_compile.bench.concurrency import clients

    probe.counts.clear()
    t0, c0 = time.perf_counter(), time.process_time()
    results = clients(lambda p: session.generate(p, chat=False, mode=args.mode, max_new_tokens=args.max_tokens),
                      prompts, concurrency=c, requests=args.requests or max(16, 4 * c))
    out = collections.Counter(probe.counts)
    out.update(dict(wall=time.perf_counter() - t0, cpu=time.process_time() - c0,
                    tokens=sum(len(r.completions[0].tokens) for r in results)))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
