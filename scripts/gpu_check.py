#!/usr/bin/env python3
"""Every GPU check in one command, sized for about 8 minutes on one H200:

  tests     the GPU tests: CUDA-graph replay == eager, fast engine == reference token for token, the
            sampled (temperature > 0) device loop == the host loop, the Triton kernels (fused ops, remask,
            the split-K GEMV) on CUDA against their torch definitions
  validate  `validate --fast` on the trained tiny model (validate_fast, the command's function): bf16 and
            fp8, each with the GEMV kernel off and on
  gemv      the split-K small-M kernel (kernels/gemv.py) against cuBLAS (bf16 F.linear) and the FP8 rowwise
            `_scaled_mm`, at the 3B / 8B / 14B projection shapes, M = 1..64: agreement and time
  bench     bench-gpu's refinement pass at each geometry (seeded random weights) for bf16 / fp8, GEMV off
            and on, and a sampled pass, at batch 1 x block 32 and batch 8 x block 64: ms, % of the memory
            floor, % of the compute floor, and issue 17's targets; whole generations at 8B
  serve     the serving issue's GPU criterion: the fast engine at the 8B geometry (seeded random weights, bf16)
            behind the scheduler, closed-loop clients at concurrency 1 and 8 (dlm, block 32, 64 new tokens;
            bench/concurrency.py): c8 tokens/s >= 3x c1
  remask    the Triton and the C++/CUDA remask kernels against the torch reference, and the fused Gumbel-max
            pick against its definition (equality, time)
  profile   scripts/profile_pass.py at 8B batch 1 x block 32, GEMV kernel off and on

    python3 scripts/gpu_check.py --out DIR [--sizes 3b,8b,14b] [--sections tests,bench,...] [--budget-s 470]

Writes DIR/gpu_check.log (everything printed), DIR/gpu_check.jsonl (one JSON line per measured row, streamed
as DIR/gpu_check.jsonl.partial and renamed at the end, so a run cut short keeps its rows) and
DIR/gpu_report.json. Sections run in the order above; one that would start with under 20 s of --budget-s
left (a bench geometry: under 90 s) is skipped with that reason. Without a CUDA GPU every section is skipped with the reason and the exit
status is 2; a failed GPU test or validation makes it 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SECTIONS = ("tests", "validate", "gemv", "bench", "serve", "remask", "profile")
SERVE_TARGET = 3.0                    # concurrency 8 over concurrency 1, tokens/s (the serving issue)
SIZES = ("3b", "8b", "14b")
PRECISIONS = "bf16,bf16-gemv,fp8,fp8-gemv,bf16-sampled"
PAIRS = "1x32,8x64"
TEST_PATHS = ("tests/gpu", "tests/kernels", "tests/backends/test_fast_gemv.py", "tests/decoding/test_noise.py")
NO_GPU = "no CUDA GPU (torch.cuda.is_available() is False)"
SECTION_S, BENCH_SIZE_S = 20, 90     # seconds of budget a section / one bench geometry needs to start


class UsageError(Exception):
    pass


def _list(value: str, allowed, flag: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in items if v not in allowed]
    if not items or bad:
        raise UsageError(f"{flag} {value!r}: expected a comma-separated subset of {', '.join(allowed)}")
    return items


def _pairs(value: str) -> tuple[tuple[int, int], ...]:
    try:
        out = tuple(tuple(int(n) for n in p.lower().split("x")) for p in value.split(","))
    except ValueError:
        out = ()
    if not out or any(len(p) != 2 or min(p) < 1 for p in out):
        raise UsageError(f"--pairs {value!r}: expected BATCHxBLOCK[,BATCHxBLOCK...], e.g. 1x32,8x64")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    """The options, checked: UsageError (one line naming the flag) for a bad value."""
    from nemodiff_compile.bench.gpu import FAST_VARIANTS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"subset of {','.join(SECTIONS)}")
    ap.add_argument("--sizes", default=",".join(SIZES), help="geometries for gemv and bench")
    ap.add_argument("--precisions", default=PRECISIONS, help="bench variants (bench/gpu.py FAST_VARIANTS)")
    ap.add_argument("--pairs", default=PAIRS, help="bench (batch x block) points")
    ap.add_argument("--context", type=int, default=512, help="cached positions per row in the timed passes")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-modes", action="store_true", help="skip whole generations at 8B")
    ap.add_argument("--budget-s", type=float, default=470.0, help="start no section after this many seconds")
    ap.add_argument("--plan", action="store_true", help="print what would run and exit")
    args = ap.parse_args(argv)
    args.sections = _list(args.sections, SECTIONS, "--sections")
    args.sizes = _list(args.sizes, SIZES, "--sizes")
    args.precisions = _list(args.precisions, tuple(FAST_VARIANTS), "--precisions")
    args.pairs = _pairs(args.pairs)
    for flag, v, low in (("--context", args.context, 1), ("--iters", args.iters, 3), ("--budget-s", args.budget_s, 1)):
        if v < low:
            raise UsageError(f"{flag} {v}: expected a number >= {low}")
    return args


def plan(args) -> list[str]:
    pairs = ", ".join(f"batch {b} x block {l}" for b, l in args.pairs)
    lines = []
    for s in args.sections:
        if s == "tests":
            lines.append(f"tests: pytest {' '.join(TEST_PATHS)}")
        elif s == "validate":
            lines.append("validate: validate --fast on tiny, bf16 and fp8, GEMV off and on")
        elif s == "gemv":
            lines.append(f"gemv: split-K kernel vs cuBLAS / _scaled_mm at {', '.join(args.sizes)} projection shapes")
        elif s == "bench":
            lines.append(f"bench: {', '.join(args.sizes)} x {', '.join(args.precisions)} at {pairs}, context "
                         f"{args.context}" + ("" if args.no_modes or "8b" not in args.sizes else "; generations at 8b"))
        elif s == "serve":
            lines.append(f"serve: the fast engine at 8b behind the scheduler, concurrency 1 and 8 (target c8 >= "
                         f"{SERVE_TARGET:g}x c1)")
        elif s == "remask":
            lines.append("remask: Triton and C++/CUDA remask kernels vs the torch reference")
        elif s == "profile":
            lines.append("profile: scripts/profile_pass.py --size 8b, GEMV off and on")
    return lines


class Output:
    """Everything printed goes to the terminal and DIR/gpu_check.log; rows to DIR/gpu_check.jsonl."""

    def __init__(self, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        self.dir = out
        self.log = open(out / "gpu_check.log", "w")
        self.partial = out / "gpu_check.jsonl.partial"
        self.rows = open(self.partial, "w")

    def say(self, msg: str) -> None:
        print(msg, flush=True)
        self.log.write(msg + "\n")
        self.log.flush()

    def row(self, section: str, **fields) -> dict:
        d = dict(section=section, **fields)
        self.rows.write(json.dumps(d) + "\n")
        self.rows.flush()
        return d

    def close(self, report: dict) -> None:
        self.rows.close()
        self.partial.replace(self.dir / "gpu_check.jsonl")
        tmp = self.dir / "gpu_report.json.tmp"
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(self.dir / "gpu_report.json")
        self.log.close()


# ---- sections ----------------------------------------------------------------------------------------

def run_tests(o: Output) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *TEST_PATHS]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        text, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        text, rc = f"{e.stdout or ''}\n{e.stderr or ''}\npytest timed out after 300 s", 124
    (o.dir / "gpu_tests.log").write_text(text)
    tail = [ln for ln in text.splitlines() if ln.strip()][-20:]
    for ln in tail:
        o.say(ln)
    return o.row("tests", returncode=rc, seconds=round(time.time() - t0, 1), summary=tail[-1] if tail else "")


def validate_fast_all(o: Output) -> list[dict]:
    from nemodiff_compile.validate.fast import validate_fast

    rows = []
    for precision in ("bf16", "fp8"):
        for gemv in (False, True):
            t0 = time.time()
            rep = validate_fast("tiny", precision=precision, max_new_tokens=32, gemv=gemv)
            js = rep.to_json()
            o.say(f"validate --fast tiny {precision}{' gemv' if gemv else ''}:\n{rep.to_table()}")
            rows.append(o.row("validate", precision=precision, gemv=gemv, seconds=round(time.time() - t0, 1),
                              **{k: js[k] for k in ("passed", "token_agreement", "first_divergence",
                                                    "first_failure", "failures")}))
    return rows


def projection_shapes(cfg) -> dict[str, tuple[int, int]]:
    """The fast engine's fused projections: name -> (N, K)."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    return {"qkv": (cfg.q_width + 2 * cfg.kv_width, H), "o": (H, cfg.q_width), "gate_up": (2 * I, H),
            "down": (H, I)}


def gemv_section(o: Output, sizes, *, device: str = "cuda", shapes=projection_shapes, sweep: bool = True
                 ) -> list[dict]:
    """Per geometry and projection, M = 1, 16, 32, 64: the kernel's output within one bf16 ulp of its
    definition, its largest relative difference from cuBLAS, both times; at 8B a sweep of the split count.
    (device / shapes / sweep: the CPU test's knobs.)"""
    import torch

    from nemodiff_compile.backends.fast_model import Linear
    from nemodiff_compile.bench.gpu import time_ms
    from nemodiff_compile.config import PRESETS
    from nemodiff_compile.kernels import gemv as gk
    from nemodiff_compile.kernels.gemv_triton import gemv_triton, plan as gemv_plan

    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    fp8 = device != "cuda" or torch.cuda.get_device_capability() >= (8, 9)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 132
    for size in sizes:
        for name, (N, K) in shapes(PRESETS[size]).items():
            w = torch.randn(N, K, device=device, generator=g).bfloat16() * 0.02
            for M in (1, 16, 32, 64):
                x = torch.randn(M, K, device=device, generator=g).bfloat16()
                for mode in (None, "row") if fp8 else (None,):
                    base, fast = Linear(w, mode), Linear(w, mode, gemv=True)
                    y0, y1 = base(x).float(), fast(x).float()
                    if mode is None:
                        ref = gk.gemv_torch(x, w).float()
                    else:
                        from nemodiff_compile.kernels import fused
                        q, sx = fused.quant_fp8(x)
                        ref = gk.gemv_torch(q, base.weight, sx, base.scale, out_dtype=torch.bfloat16).float()
                    ok = bool(((y1 - ref).abs() <= ref.abs() * 2 ** -7 + 1e-6).all())
                    rel = float(((y1 - y0).abs() / y0.abs().clamp_min(1e-3)).max())
                    t0 = time_ms(lambda: base(x), iters=50, device=device)
                    t1 = time_ms(lambda: fast(x), iters=50, device=device)
                    nbytes = base.nbytes + x.numel() * 2 + M * N * 2
                    rows.append(o.row("gemv", size=size, proj=name, M=M, N=N, K=K, weights=mode or "bf16",
                                      split=gemv_plan(M, N, K, sms)[3],
                                      within_1ulp_of_definition=ok, max_rel_diff_vs_cublas=round(rel, 5),
                                      cublas_us=round(t0 * 1e3, 1), gemv_us=round(t1 * 1e3, 1),
                                      speedup=round(t0 / t1, 3), gemv_TBps=round(nbytes / (t1 / 1e3) / 1e12, 2),
                                      cublas_TBps=round(nbytes / (t0 / 1e3) / 1e12, 2)))
                    r = rows[-1]
                    o.say(f"gemv {size} {name:7} M={M:2} N={N} K={K} {r['weights']:4}: ok={ok} cuBLAS "
                          f"{r['cublas_us']:.1f} us ({r['cublas_TBps']:.2f} TB/s)  gemv {r['gemv_us']:.1f} us "
                          f"({r['gemv_TBps']:.2f} TB/s, split {r['split']})  x{r['speedup']:.2f}")
            if size == "8b" and sweep:             # the split count, swept at M=32 (bf16)
                x = torch.randn(32, K, device=device, generator=g).bfloat16()
                times = {s: time_ms(lambda: gemv_triton(x, w, split=s), iters=30, device=device)
                         for s in (1, 2, 4, 8, 16)}
                best = min(times, key=times.get)
                rows.append(o.row("gemv-split", size=size, proj=name, M=32, N=N, K=K,
                                  us={str(s): round(t * 1e3, 1) for s, t in times.items()}, best_split=best))
                o.say(f"gemv split sweep 8b {name} M=32: " + ", ".join(f"{s}: {t * 1e3:.1f} us" for s, t in times.items()))
            del w
    return rows


def bench_section(o: Output, args, budget_left) -> dict:
    import gc

    import torch

    from nemodiff_compile.bench.gpu import gpu_report, pass_targets, report_table

    out = {}
    batches = tuple(sorted({b for b, _ in args.pairs}))
    blocks = tuple(sorted({l for _, l in args.pairs}))
    for size in ("8b", "3b", "14b"):           # the reference geometry first
        if size not in args.sizes:
            continue
        if budget_left() < BENCH_SIZE_S:
            out[size] = o.row("bench", size=size, skipped=f"time budget (--budget-s): under {BENCH_SIZE_S} s left")
            o.say(f"bench {size}: skipped (time budget: under {BENCH_SIZE_S} s left)")
            continue
        t0 = time.time()
        o.say(f"## bench-gpu --size {size} --random-weights")
        rep = gpu_report(size, precisions=args.precisions, batches=batches, blocks=blocks, pairs=args.pairs,
                         context=args.context, iters=args.iters, modes=size == "8b" and not args.no_modes,
                         log=o.say)
        o.say(report_table(rep))
        for p in rep["passes"]:
            o.row("bench", size=size, device=rep["device"], context=rep["context"], **p)
        for m in rep["modes"]:
            o.row("bench-modes", size=size, **m)
        targets = pass_targets(rep["passes"], small=args.pairs[0], large=args.pairs[-1])
        for t in targets:
            o.row("target", size=size, **t)
            verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
            o.say(f"target {size}: {t['check']} = {t['value']} ({t['variant']}), goal "
                  f"{'<=' if 'fp8' in t['check'] else '>='} {t['target']}: {verdict}")
        rep["targets"] = targets
        rep["seconds"] = round(time.time() - t0, 1)
        out[size] = rep
        gc.collect()
        torch.cuda.empty_cache()
    return out


def serve_section(o: Output, *, size: str = "8b", device: str = "cuda", dtype: str = "bfloat16",
                  prompt_len: int = 128, max_new_tokens: int = 64, block: int = 32, rounds: int = 2,
                  requests=lambda c: max(8, 4 * c)) -> dict:
    """Closed-loop clients on the scheduler over the fast engine (bench/concurrency.py); the keywords let the CPU
    test run the same code on the tiny model."""
    import gc

    import torch

    from nemodiff_compile import load_reference
    from nemodiff_compile.artifact.buckets import BatchBuckets
    from nemodiff_compile.backends.fast import FastDenoiser
    from nemodiff_compile.bench.concurrency import concurrency_ratio
    from nemodiff_compile.decoding.policy import DecodePolicy

    o.say(f"## the fast engine at {size} ({dtype}) behind the scheduler, concurrency 1 and 8")
    model = load_reference(size, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (16, prompt_len), generator=g).tolist()
    den = FastDenoiser(model, prompt_len + max_new_tokens + 2 * block, buckets=BatchBuckets((1, 4, 8)))
    res = concurrency_ratio(den, prompts, DecodePolicy("dlm", block_length=block), levels=(1, 8), rounds=rounds,
                            requests=requests, max_new_tokens=max_new_tokens, log=o.say)
    for level in res["levels"]:
        o.row("serve", size=size, dtype=dtype, **level)
    met = res["ratio"] >= SERVE_TARGET
    res["target"] = o.row("target", size=size, check="serve c8 / c1 tokens/s", value=res["ratio"],
                          target=SERVE_TARGET, met=met)
    o.say(f"target {size}: concurrency 8 / 1 = {res['ratio']}x, goal >= {SERVE_TARGET:g}x: "
          f"{'met' if met else 'NOT met'}")
    del den, model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return res


def remask_section(o: Output) -> dict:
    import torch

    from nemodiff_compile.bench.gpu import time_ms
    from nemodiff_compile.errors import NemodiffError
    from nemodiff_compile.kernels.remask.reference import remask_reference
    from nemodiff_compile.kernels.remask.triton_kernel import remask_triton

    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for B, L in ((1, 32), (8, 64)):
        logits = (torch.randn(B, L, 131072, device="cuda", generator=g) * 4).bfloat16()
        canvas = torch.full((B, L), 7, device="cuda")
        canvas[:, ::3] = 1
        active = torch.ones(B, dtype=torch.bool, device="cuda")
        kw = dict(mask_id=7, threshold=0.9)
        ref, got = remask_reference(logits, canvas, active, **kw), remask_triton(logits, canvas, active, **kw)
        same = all(torch.equal(a, b) for a, b in ((ref[0], got[0]), (ref[1], got[1]), (ref[3], got[3])))
        t_ref = time_ms(lambda: remask_reference(logits, canvas, active, **kw))
        t_tri = time_ms(lambda: remask_triton(logits, canvas, active, **kw))
        rows.append(o.row("remask", kernel="triton", batch=B, block=L, equal=same,
                          conf_max_err=float((ref[2] - got[2]).abs().max()), torch_ms=round(t_ref, 4),
                          triton_ms=round(t_tri, 4)))
        o.say(f"remask triton B={B} L={L}: equal={same} torch {t_ref:.3f} ms, triton {t_tri:.3f} ms")
        from nemodiff_compile.kernels.gumbel import gumbel_pick_torch
        from nemodiff_compile.kernels.gumbel_triton import gumbel_pick_triton
        keys = torch.arange(B, device="cuda") * 7919 + 1
        counters = torch.full((B,), 5, device="cuda")
        want = gumbel_pick_torch(logits, keys, counters, 1.0)
        try:
            got = gumbel_pick_triton(logits, keys, counters, 1.0)
            same = torch.equal(want[0], got[0])
            t_ref = time_ms(lambda: gumbel_pick_torch(logits, keys, counters, 1.0))
            t_fused = time_ms(lambda: gumbel_pick_triton(logits, keys, counters, 1.0))
            rows.append(o.row("gumbel-pick", batch=B, block=L, equal_tokens=same,
                              conf_max_err=float((want[1] - got[1]).abs().max()), torch_ms=round(t_ref, 4),
                              fused_ms=round(t_fused, 4)))
            o.say(f"gumbel pick B={B} L={L}: equal={same} torch (noise materialized) {t_ref:.3f} ms, "
                  f"fused {t_fused:.3f} ms")
        except Exception as e:                            # e.g. no float64 log in this Triton
            rows.append(o.row("gumbel-pick", batch=B, block=L, error=f"{type(e).__name__}: {e}"[:500]))
            o.say(f"gumbel pick: FAILED ({type(e).__name__}: {e})")
        try:
            from nemodiff_compile.kernels.remask.cuda_kernel import remask_cuda
            got = remask_cuda(logits, canvas, active, None, **kw)
            same = all(torch.equal(a, b) for a, b in ((ref[0], got[0]), (ref[1], got[1]), (ref[3], got[3])))
            t = time_ms(lambda: remask_cuda(logits, canvas, active, None, **kw))
            rows.append(o.row("remask", kernel="cuda", batch=B, block=L, equal=same, cuda_ms=round(t, 4)))
            o.say(f"remask cuda   B={B} L={L}: equal={same} {t:.3f} ms")
        except NemodiffError as e:                        # no nvcc, or it failed
            rows.append(o.row("remask", kernel="cuda", skipped=str(e)))
            o.say(f"remask cuda: skipped ({e})")
    return dict(rows=rows)


def profile_section(o: Output) -> list[dict]:
    rows = []
    for extra in ((), ("--gemv",)):
        cmd = [sys.executable, "scripts/profile_pass.py", "--size", "8b", *extra]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150)
            text, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired:
            text, rc = "profile_pass timed out after 150 s", 124
        o.say(f"## {' '.join(cmd[1:])}\n{text}")
        rows.append(o.row("profile", gemv=bool(extra), returncode=rc))
    return rows


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.plan:
        print("\n".join(plan(args)))
        return 0
    import torch

    o = Output(args.out)
    t_start = time.time()
    budget_left = lambda: args.budget_s - (time.time() - t_start)  # noqa: E731
    report: dict = dict(torch=torch.__version__, cuda=torch.cuda.is_available(), sections={})
    if not torch.cuda.is_available():
        for s in args.sections:
            report["sections"][s] = o.row(s, skipped=NO_GPU)
            o.say(f"# {s}: skipped ({NO_GPU})")
        o.close(report)
        print(f"error: {NO_GPU}: every GPU check skipped; nothing measured", file=sys.stderr)
        return 2
    import triton

    report.update(device=torch.cuda.get_device_name(), triton=triton.__version__)
    o.say(f"# {report['device']}, torch {report['torch']}, triton {report['triton']}")
    for line in plan(args):
        o.say(f"#   {line}")
    runners = {"tests": lambda: run_tests(o), "validate": lambda: validate_fast_all(o),
               "gemv": lambda: gemv_section(o, args.sizes), "bench": lambda: bench_section(o, args, budget_left),
               "serve": lambda: serve_section(o), "remask": lambda: remask_section(o),
               "profile": lambda: profile_section(o)}
    failed = False
    for s in args.sections:
        if budget_left() < SECTION_S:
            report["sections"][s] = o.row(s, skipped=f"time budget of {args.budget_s:.0f} s spent")
            o.say(f"# {s}: skipped (time budget of {args.budget_s:.0f} s spent)")
            continue
        o.say(f"# {s} (at {time.time() - t_start:.0f} s)")
        try:
            report["sections"][s] = runners[s]()
        except Exception as e:                            # one section's failure must not lose the others
            import traceback
            o.say(traceback.format_exc())
            report["sections"][s] = o.row(s, error=f"{type(e).__name__}: {e}")
            failed = True
    tests = report["sections"].get("tests")
    if isinstance(tests, dict) and tests.get("returncode"):
        failed = True
    if any(not r.get("passed", True) for r in report["sections"].get("validate") or [] if isinstance(r, dict)):
        failed = True
    report["seconds"] = round(time.time() - t_start, 1)
    o.say(json.dumps(dict(device=report["device"], seconds=report["seconds"], failed=failed)))
    o.close(report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
