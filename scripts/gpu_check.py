#!/usr/bin/env python3
"""Every GPU check in one command (about 5 minutes on an H100/H200):

  1. the GPU tests: CUDA-graph replay == eager per pass, fast engine == reference token for token
     (fp32 and bf16, every mode), the Triton remask and fused kernels on CUDA against torch
  2. the Triton remask kernel against the torch reference at the real vocabulary: equality and time
  3. the C++/CUDA remask kernel of the TensorRT plugin (kernels/csrc/remask/remaskKernel.cu, via ctypes)
  4. `validate --fast` on the trained tiny model in bf16, fp8 and fp8-tensor (graph replay vs eager)
  5. `bench-gpu` at the 8B geometry (seeded random weights): passes for bf16/fp8 x batch 1/4/8 x
     block 16/32/64 against the eager reference, and whole generations per mode

    python3 scripts/gpu_check.py --out DIR        # writes DIR/gpu_report.json (+ logs), prints a summary
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


def run_tests(out: Path) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
           "tests/gpu", "tests/kernels", "tests/backends/test_fast_engine.py"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    (out / "gpu_tests.log").write_text(proc.stdout + proc.stderr)
    tail = [ln for ln in proc.stdout.splitlines() if ln.strip()][-15:]
    print("\n".join(tail))
    return dict(returncode=proc.returncode, seconds=round(time.time() - t0, 1), summary=tail[-1] if tail else "")


def remask_kernels(vocab: int = 131072) -> list[dict]:
    import torch

    from nemodiff_compile.bench.gpu import time_ms
    from nemodiff_compile.kernels.remask.reference import remask_reference
    from nemodiff_compile.kernels.remask.triton_kernel import remask_triton

    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for B, L in ((1, 16), (1, 32), (4, 32), (8, 64)):
        logits = (torch.randn(B, L, vocab, device="cuda", generator=g) * 4).bfloat16()
        canvas = torch.full((B, L), 7, device="cuda")
        canvas[:, ::3] = 1
        active = torch.ones(B, dtype=torch.bool, device="cuda")
        kw = dict(mask_id=7, threshold=0.9)
        ref, got = remask_reference(logits, canvas, active, **kw), remask_triton(logits, canvas, active, **kw)
        same = all(torch.equal(a, b) for a, b in ((ref[0], got[0]), (ref[1], got[1]), (ref[3], got[3])))
        conf_err = float((ref[2] - got[2]).abs().max())
        t_ref = time_ms(lambda: remask_reference(logits, canvas, active, **kw))
        t_tri = time_ms(lambda: remask_triton(logits, canvas, active, **kw))
        gbps = logits.numel() * 2 / (t_tri / 1e3) / 1e9
        rows.append(dict(batch=B, block=L, vocab=vocab, equal=same, conf_max_err=conf_err,
                         torch_ms=round(t_ref, 4), triton_ms=round(t_tri, 4), triton_GBps=round(gbps, 1)))
        print(f"remask B={B} L={L}: equal={same} conf_err={conf_err:.1e} torch {t_ref:.3f} ms, "
              f"triton {t_tri:.3f} ms ({gbps:.0f} GB/s of logits)")
    return rows


def cuda_remask() -> list[dict] | dict:
    """The C++/CUDA remask kernel (kernels/csrc/remask/remaskKernel.cu, through its C entry point:
    kernels/remask/cuda_kernel.py) against the torch reference, timed beside the Triton kernel."""
    import torch

    from nemodiff_compile.bench.gpu import time_ms
    from nemodiff_compile.errors import NemodiffError
    from nemodiff_compile.kernels.remask.cuda_kernel import remask_cuda
    from nemodiff_compile.kernels.remask.reference import remask_reference
    from nemodiff_compile.kernels.remask.triton_kernel import remask_triton

    rows = []
    g = torch.Generator(device="cuda").manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        for B, L, V in ((1, 32, 131072), (8, 64, 131072), (3, 16, 5003)):
            logits = (torch.randn(B, L, V, device="cuda", generator=g) * 4).to(dtype)
            canvas = torch.full((B, L), 7, device="cuda")
            canvas[:, ::3] = 1
            active = torch.ones(B, dtype=torch.bool, device="cuda")
            active[-1] = B == 1
            quota = torch.full((B,), 3, dtype=torch.long, device="cuda")
            for threshold in (0.9, None):
                kw = dict(mask_id=7, threshold=threshold)
                ref = remask_reference(logits, canvas, active, quota, **kw)
                try:
                    got = remask_cuda(logits, canvas, active, quota, **kw)
                except NemodiffError as e:                # no nvcc, or it failed
                    return dict(skipped=str(e))
                same = all(torch.equal(a, b) for a, b in ((ref[0], got[0]), (ref[1], got[1]), (ref[3], got[3])))
                row = dict(dtype=str(dtype).split(".")[-1], batch=B, block=L, vocab=V,
                           policy="threshold" if threshold is not None else "topk", equal=same,
                           conf_max_err=float((ref[2] - got[2]).abs().max()))
                if threshold is not None and V == 131072:
                    row["cuda_ms"] = round(time_ms(lambda: remask_cuda(logits, canvas, active, quota, **kw)), 4)
                    row["triton_ms"] = round(time_ms(lambda: remask_triton(logits, canvas, active, quota, **kw)), 4)
                rows.append(row)
                print(f"cuda remask {row}", flush=True)
    return rows


def validate_fast_all() -> dict:
    from nemodiff_compile.validate.fast import validate_fast

    out = {}
    for precision in ("bf16", "fp8", "fp8-tensor", "fp8-static"):
        report = validate_fast("tiny", precision=precision, max_new_tokens=32)
        rep = report.to_json()
        out[precision] = {k: rep[k] for k in ("passed", "token_agreement", "first_divergence",
                                              "first_failure", "failures")}
        print(f"validate --fast tiny {precision}:\n{report.to_table()}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    ap.add_argument("--size", default="8b")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--precisions", default="bf16,bf16-sdpa,fp8,fp8-tensor")
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--blocks", default="16,32,64")
    ap.add_argument("--no-modes", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import torch
    if not torch.cuda.is_available():
        print("error: no CUDA GPU visible (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    report: dict = dict(torch=torch.__version__, device=torch.cuda.get_device_name())
    try:
        import triton
        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    print(f"# {report['device']}, torch {report['torch']}, triton {report['triton']}", flush=True)
    t0 = time.time()
    if not args.skip_tests:
        print("# 1. GPU tests", flush=True)
        report["tests"] = run_tests(args.out)
    print("# 2. Triton remask kernel vs torch", flush=True)
    report["remask"] = remask_kernels()
    print("# 3. CUDA remask kernel", flush=True)
    report["cuda_remask"] = cuda_remask()
    print("# 4. validate --fast (tiny)", flush=True)
    report["validate_fast"] = validate_fast_all()
    print(f"# 5. bench-gpu --size {args.size}", flush=True)
    from nemodiff_compile.bench.gpu import gpu_report, report_table
    ints = lambda v: tuple(int(x) for x in v.split(","))
    report["bench"] = gpu_report(args.size, precisions=tuple(args.precisions.split(",")),
                                 batches=ints(args.batches), blocks=ints(args.blocks), iters=args.iters,
                                 modes=not args.no_modes, log=lambda m: print(m, flush=True))
    report["seconds"] = round(time.time() - t0, 1)
    (args.out / "gpu_report.json").write_text(json.dumps(report, indent=1))
    print(report_table(report["bench"]))
    print(json.dumps({k: report[k] for k in ("device", "seconds")} | {"tests": report.get("tests", {}).get("summary")}))
    return 0 if report.get("tests", {}).get("returncode", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
