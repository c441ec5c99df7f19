"""GPU benchmark of the fast engine against the eager reference, per pass and per mode, in one run.

Per (precision, batch, block): the refinement pass exactly as the device loop replays it (forward +
fused remask + canvas update, one CUDA graph) against the eager reference's pass (model forward over
the static cache + pick, no graph), timed with CUDA events (median over `iters`, after warm-up).

The physical floor of a pass is the larger of two times, both at the datasheet rates:
  memory   its unavoidable bytes over the HBM bandwidth: every weight read once (the embedding table
           excepted: a pass reads B*L of its rows), the K/V of the visible context read once per
           layer and the block's K/V written
  compute  its matrix FLOPs (2 per weight per token, plus attention) over the dense tensor-core
           rate of its precision
At batch 1 a pass is memory-bound; at batch 8 x block 64 (512 tokens) an 8B pass is compute-bound.
`bound_fraction` = floor / measured time (1.0 = at the datasheet rate). Timings on seeded random
weights are valid (the arithmetic does not depend on the values); tokens per forward on random
weights is not a model's, and is labeled so.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

# HBM bandwidth by the vendor's datasheet, bytes/s; matched against torch.cuda.get_device_name.
PEAK_BANDWIDTH = (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12),
                  ("GH200", 4.0e12), ("B200", 8.0e12), ("A100-SXM4-80GB", 2.039e12), ("A100", 1.555e12),
                  ("L40S", 0.864e12), ("L4", 0.3e12))


# bench variant -> FastModel options (backends/fast_model.py): FP8 mode and attention backend
# (-gemv: the split-K small-M kernel of kernels/gemv.py for the projections, to compare side by side)
FAST_VARIANTS = {"bf16": {}, "bf16-sdpa": dict(attention="sdpa"), "fp8": dict(fp8="row"),
                 "fp8-tensor": dict(fp8="tensor"), "fp8-static": dict(fp8="static"),
                 "bf16-gemv": dict(gemv=True), "fp8-gemv": dict(fp8="row", gemv=True),
                 "fp8-static-gemv": dict(fp8="static", gemv=True), "bf16-sampled": {}, "fp8-sampled": dict(fp8="row")}
# variants whose timed pass samples (Gumbel-max at this temperature, noise drawn on the device: decoding/noise.py)
SAMPLED = {"bf16-sampled": 1.0, "fp8-sampled": 1.0}


def calibration_prompts(cfg, batch: int = 2, length: int = 64) -> list[list[int]]:
    """Seeded random prompts for calibrating static FP8 on random-weight geometries."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=g).tolist()


# Dense bf16 tensor-core FLOP/s by the datasheet (FP8 doubles it where the card has FP8 units).
PEAK_BF16_FLOPS = (("H200", 989e12, True), ("H100 PCIe", 756e12, True), ("H100 NVL", 835e12, True),
                   ("H100", 989e12, True), ("GH200", 989e12, True), ("B200", 2250e12, True),
                   ("A100", 312e12, False), ("L40S", 362e12, True), ("L4", 121e12, True))


def peak_bandwidth(name: str) -> float | None:
    for key, bw in PEAK_BANDWIDTH:
        if key in name:
            return bw
    return None


def peak_flops(name: str, fp8: bool) -> float | None:
    for key, flops, has_fp8 in PEAK_BF16_FLOPS:
        if key in name:
            return 2 * flops if fp8 and has_fp8 else (flops if not fp8 else None)
    return None


def pass_flops(cfg, matmul_params: int, batch: int, block: int, context: int) -> float:
    """Matrix FLOPs of a pass: 2 per weight per token, plus QK^T and PV over the visible keys."""
    tokens = batch * block
    attn = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * tokens * (context + block)
    return 2.0 * matmul_params * tokens + attn


def copy_bandwidth(nbytes: int = 2 << 30, iters: int = 10) -> float:
    """Measured device-to-device copy rate, bytes read + written per second (the practical ceiling)."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), iters=iters)
    return nbytes / (ms / 1e3)


def time_ms(fn, *, iters: int = 20, warmup: int = 3, device: str = "cuda") -> float:
    """Median milliseconds of fn(): CUDA events on the current stream (a host clock on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def pass_bytes(weight_bytes: int, cfg, batch: int, block: int, context: int, kv_itemsize: int) -> int:
    """The bytes a pass cannot avoid moving (see the module docstring)."""
    kv_row = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * kv_itemsize
    return weight_bytes + batch * kv_row * (context + block)


@dataclass
class PassResult:
    precision: str
    batch: int
    block: int
    engine_ms: float
    reference_ms: float
    engine_bytes: int
    flops: float
    memory_ms: float | None              # engine_bytes at the datasheet bandwidth
    compute_ms: float | None             # flops at the datasheet dense rate of the precision

    @property
    def bound_ms(self) -> float | None:
        floors = [t for t in (self.memory_ms, self.compute_ms) if t is not None]
        return max(floors) if floors else None

    @property
    def bound_kind(self) -> str | None:
        if self.bound_ms is None:
            return None
        return "compute" if self.compute_ms is not None and self.compute_ms >= (self.memory_ms or 0) else "memory"

    def to_json(self) -> dict:
        gbps = self.engine_bytes / (self.engine_ms / 1e3) / 1e9
        r = lambda x, n=4: None if x is None else round(x, n)  # noqa: E731
        return dict(precision=self.precision, batch=self.batch, block=self.block,
                    engine_ms=r(self.engine_ms), reference_ms=r(self.reference_ms),
                    speedup=r(self.reference_ms / self.engine_ms, 3), engine_GBps=r(gbps, 1),
                    engine_TFLOPs=r(self.flops / (self.engine_ms / 1e3) / 1e12, 1),
                    memory_bound_ms=r(self.memory_ms), compute_bound_ms=r(self.compute_ms),
                    bound_ms=r(self.bound_ms), bound_kind=self.bound_kind,
                    bound_fraction=r(self.bound_ms / self.engine_ms) if self.bound_ms else None,
                    memory_fraction=r(self.memory_ms / self.engine_ms) if self.memory_ms else None,
                    compute_fraction=r(self.compute_ms / self.engine_ms) if self.compute_ms else None)


# issue 17's goals for a pass, checked per geometry by `pass_targets`
TARGETS = dict(memory_fraction_b1=0.70, fp8_over_bf16=0.55, compute_fraction_b8=0.65)


def pass_targets(passes: list[dict], *, small=(1, 32), large=(8, 64)) -> list[dict]:
    """From one geometry's pass rows (PassResult.to_json): the bf16 pass at `small` (batch, block) against
    the memory floor, fp8 over bf16 at `small` in the same run, the bf16 pass at `large` against the compute
    floor; each for the faster variant of the family (plain or -gemv; sampled variants excluded).
    -> [{check, variant, value, target, met}] (value and met None where a row is missing)."""
    def rows(family: str, at):
        return {p["precision"]: p for p in passes if (p["batch"], p["block"]) == tuple(at)
                and p["precision"] in (family, family + "-gemv")}

    def best(family: str, at):
        r = rows(family, at)
        return min(r.values(), key=lambda p: p["engine_ms"]) if r else None

    out = []
    b1, b8 = best("bf16", small), best("bf16", large)
    out.append(dict(check=f"bf16 batch {small[0]} block {small[1]}: fraction of the memory floor",
                    variant=b1 and b1["precision"], value=b1 and b1["memory_fraction"],
                    target=TARGETS["memory_fraction_b1"], higher_is_better=True))
    for fam in ("fp8", "fp8-static", "fp8-tensor"):
        f = best(fam, small)
        if f is None:
            continue
        ratio = round(f["engine_ms"] / b1["engine_ms"], 4) if b1 else None
        out.append(dict(check=f"{fam} / bf16 pass time at batch {small[0]} block {small[1]}",
                        variant=f"{f['precision']} / {b1 and b1['precision']}", value=ratio,
                        target=TARGETS["fp8_over_bf16"], higher_is_better=False))
    out.append(dict(check=f"bf16 batch {large[0]} block {large[1]}: fraction of the compute floor",
                    variant=b8 and b8["precision"], value=b8 and b8["compute_fraction"],
                    target=TARGETS["compute_fraction_b8"], higher_is_better=True))
    for t in out:
        v, higher = t["value"], t.pop("higher_is_better")
        t["met"] = None if v is None else (v >= t["target"] if higher else v <= t["target"])
    return out


def grid(batches, blocks, pairs=None) -> list[tuple[int, int]]:
    """The (batch, block) points timed: `pairs` where given, else every batch x block."""
    return [tuple(p) for p in pairs] if pairs else [(b, l) for b in batches for l in blocks]


def bench_passes(model, *, precisions=("bf16", "fp8"), batches=(1, 4, 8), blocks=(16, 32, 64),
                 context: int = 512, iters: int = 20, threshold: float = 0.9, device_name: str = "",
                 log=print, pairs=None) -> list[PassResult]:
    """The refinement pass, fast (graph replay) vs eager reference, over the grid (or only `pairs` of
    (batch, block)). `context` cached positions per row are treated as filled (their values do not
    change the time)."""
    cfg = model.config
    points = grid(batches, blocks, pairs)
    batches = tuple(sorted({b for b, _ in points}))
    blocks = tuple(sorted({l for _, l in points}))
    bandwidth = peak_bandwidth(device_name)
    emb = model.encoder.embed_tokens.weight
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2) - emb.numel()
    ref_ms = _reference_pass_ms(model, batches, blocks, context, iters, log, points)
    results = []
    for precision in precisions:
        # one variant at a time: its fused weights and captured graphs are freed before the next
        for batch, block, ms, weight_bytes, fp8 in _fast_pass_ms(model, precision, batches, blocks, context,
                                                                  iters, threshold, points):
            nbytes = pass_bytes(weight_bytes, cfg, batch, block, context, model.dtype.itemsize)
            flops = pass_flops(cfg, matmul_params, batch, block, context)
            rate = peak_flops(device_name, fp8=fp8)
            r = PassResult(precision, batch, block, ms, ref_ms[batch, block], nbytes, flops,
                           nbytes / bandwidth * 1e3 if bandwidth else None,
                           flops / rate * 1e3 if rate else None)
            results.append(r)
            bound = f", {r.bound_ms / ms:.0%} of the {r.bound_kind} bound" if r.bound_ms else ""
            log(f"  {precision} batch {batch} block {block}: {ms:.3f} ms/pass "
                f"(reference {r.reference_ms:.3f}, x{r.reference_ms / ms:.2f}){bound}")
        if model.diffusion_head.weight.is_cuda:
            torch.cuda.empty_cache()
    return results


def _reference_pass_ms(model, batches, blocks, context: int, iters: int, log, points=None
                       ) -> dict[tuple[int, int], float]:
    """(batch, block) -> ms of the eager reference's refinement pass (forward over the cache + pick)."""
    from ..model.cache import StaticKVCache
    from ..model.model import Pattern
    from ..decoding import remask

    cfg, dev = model.config, model.diffusion_head.weight.device
    out = {}
    for batch in batches:
        cache = StaticKVCache(cfg, batch, context + 2 * max(blocks), model.dtype, dev)
        cache.lengths.fill_(context)
        for block in blocks:
            if points is not None and (batch, block) not in points:
                continue
            canvas = torch.randint(0, cfg.vocab_size, (batch, block), device=dev)

            def eager():
                remask.pick(model(canvas, cache=cache, pattern=Pattern.BIDIRECTIONAL, write_cache=False))

            with torch.no_grad():
                out[batch, block] = time_ms(eager, iters=max(5, iters // 2), device=dev.type)
            log(f"  reference bf16 batch {batch} block {block}: {out[batch, block]:.3f} ms/pass")
    return out


def _fast_pass_ms(model, precision: str, batches, blocks, context: int, iters: int, threshold: float,
                  points=None):
    """[(batch, block, ms, weight bytes, fp8?)] of the fast engine's captured refinement pass."""
    from ..artifact.buckets import BatchBuckets
    from ..backends.fast import FastDenoiser
    from ..backends.fast_model import FastModel

    cfg, dev = model.config, model.diffusion_head.weight.device
    fast = FastModel(model, **FAST_VARIANTS[precision])
    den = FastDenoiser(fast, context + 2 * max(blocks), buckets=BatchBuckets(tuple(batches)))
    if fast.fp8 == "static":
        den.calibrate(calibration_prompts(cfg, length=min(64, context)), max_new_tokens=2 * max(blocks))
    out = []
    for batch in batches:
        den.reset(batch)
        den.assume_context(context)
        for block in blocks:
            if points is not None and (batch, block) not in points:
                continue
            den.num_valid.fill_(block)
            p = den.dlm_passes(block, threshold, block, SAMPLED.get(precision, 0.0))   # noise keys: zeros
            canvas, refining = p.buffers[0], p.buffers[1]

            def replay():
                canvas.random_(0, cfg.vocab_size)     # no mask: a full pass, nothing committed
                refining.fill_(True)
                den.graphs.run(p.denoise_key, p.denoise, p.state)

            with torch.no_grad():
                out.append((batch, block, time_ms(replay, iters=iters, device=dev.type), fast.weight_bytes,
                            fast.fp8 is not None))
    return out


def bench_modes(model, *, batches=(1, 4, 8), block: int = 32, context: int = 512, max_new_tokens: int = 64,
                threshold: float = 0.9, precision: str = "bf16", log=print) -> list[dict]:
    """Whole generations per mode, fast vs eager reference: tokens/s per request and in total, TPF.
    The prompts are random ids of `context` tokens (random weights: TPF is not a model's)."""
    from ..artifact.buckets import BatchBuckets
    from ..backends.fast import FastDenoiser
    from ..backends.fast_model import FastModel
    from ..backends.eager import TorchDenoiser
    from ..decoding import loops

    cfg = model.config
    max_len = context + max_new_tokens + 2 * block
    fast = FastDenoiser(FastModel(model, **FAST_VARIANTS[precision]), max_len,
                        buckets=BatchBuckets(tuple(batches)))
    if fast.fast.fp8 == "static":
        fast.calibrate(calibration_prompts(cfg, length=min(64, context)), max_new_tokens=2 * block)
    ref = TorchDenoiser(model, max_len)
    g = torch.Generator().manual_seed(0)
    rows = []
    sync = torch.cuda.synchronize if fast.device.type == "cuda" else (lambda: None)
    for batch in batches:
        prompts = torch.randint(0, cfg.vocab_size, (batch, context), generator=g).tolist()
        runs = {
            ("dlm", "engine"): lambda: loops.diffusion_generate(fast, prompts, max_new_tokens=max_new_tokens,
                                                                block_length=block, threshold=threshold),
            ("dlm", "reference"): lambda: loops.diffusion_generate(ref, prompts, max_new_tokens=max_new_tokens,
                                                                   block_length=block, threshold=threshold),
            ("ar", "engine"): lambda: loops.ar_generate(fast, prompts, max_new_tokens=max_new_tokens),
            ("ar", "reference"): lambda: loops.ar_generate(ref, prompts, max_new_tokens=max_new_tokens),
        }
        outs, mine = {}, {}
        for (mode, who), fn in runs.items():
            with torch.no_grad():
                fn()                                              # warm-up: captures, compiles
                sync()
                t0 = time.perf_counter()
                gen = fn()
                sync()
                wall = time.perf_counter() - t0
            outs[mode, who] = gen
            n = sum(len(t) for t in gen.tokens)
            mine[mode, who] = row = dict(mode=mode, backend=who, precision=precision if who == "engine" else "bf16",
                             batch=batch, block=block if mode == "dlm" else 1, tokens=n, nfe=gen.nfe,
                             tokens_per_forward=round(gen.tokens_per_forward, 3),
                             tokens_per_s_total=round(n / wall, 1),
                             tokens_per_s_per_request=round(n / wall / batch, 1), wall_s=round(wall, 4))
            rows.append(row)
            log(f"  {mode} {who} batch {batch}: {n / wall:.1f} tok/s total, TPF {gen.tokens_per_forward:.2f}")
        for mode in ("dlm", "ar"):
            mine[mode, "engine"]["same_tokens_as_reference"] = outs[mode, "engine"].tokens == outs[mode, "reference"].tokens
    return rows


def gpu_report(source, *, precisions=("bf16", "fp8"), batches=(1, 4, 8), blocks=(16, 32, 64),
               context: int = 512, iters: int = 20, modes: bool = True, log=print, pairs=None) -> dict:
    """Everything `bench-gpu` prints: the card, its ceilings, the pass grid and whole generations."""
    from .. import load_reference
    from ..errors import InvalidArgument

    if not torch.cuda.is_available():
        raise InvalidArgument("bench-gpu needs a CUDA GPU (torch.cuda.is_available() is False)")
    bad = set(precisions) - set(FAST_VARIANTS)
    if bad:
        raise InvalidArgument(f"--precision {sorted(bad)[0]}: the fast engine runs {', '.join(FAST_VARIANTS)}")
    if any("fp8" in p for p in precisions) and torch.cuda.get_device_capability() < (8, 9):
        raise InvalidArgument("--precision fp8: FP8 matmuls need compute capability 8.9 or newer")
    name = torch.cuda.get_device_name()
    peak = peak_bandwidth(name)
    log(f"device {name}, datasheet HBM {peak / 1e12 if peak else float('nan'):.2f} TB/s")
    copy = copy_bandwidth()
    log(f"measured device copy {copy / 1e12:.2f} TB/s (read + write)")
    log(f"loading {source} in bf16 on the GPU")
    model = load_reference(source, dtype="bfloat16", device="cuda")
    random_weights = isinstance(source, str) and source.lower() in ("3b", "8b", "14b")
    passes = bench_passes(model, precisions=precisions, batches=batches, blocks=blocks, context=context,
                          iters=iters, device_name=name, log=log, pairs=pairs)
    rows = bench_modes(model, batches=batches, context=context, log=log) if modes else []
    return dict(device=name, capability=list(torch.cuda.get_device_capability()),
                torch=torch.__version__, peak_bandwidth=peak, copy_bandwidth=copy, source=str(source),
                random_weights=random_weights, context=context,
                note=("seeded random weights: timings are real, tokens per forward is not a trained "
                      "model's" if random_weights else ""),
                peak_bf16_flops=peak_flops(name, fp8=False), passes=[r.to_json() for r in passes], modes=rows)


def report_table(report: dict) -> str:
    lines = [f"{report['device']}  source {report['source']}  context {report['context']}"
             + ("  (random weights)" if report["random_weights"] else ""),
             f"{'variant':10} {'batch':>5} {'block':>5} {'engine ms':>10} {'ref ms':>8} {'speedup':>8} "
             f"{'GB/s':>7} {'TFLOP/s':>8} {'floor ms':>9} {'of floor':>9} {'of mem':>7} {'of comp':>8}"]
    for p in report["passes"]:
        floor = f"{p['bound_ms']:.3f}{'m' if p['bound_kind'] == 'memory' else 'c'}" if p["bound_ms"] else "n/a"
        pct = lambda key: f"{p[key]:.0%}" if p.get(key) is not None else "n/a"  # noqa: E731
        lines.append(f"{p['precision']:10} {p['batch']:>5} {p['block']:>5} {p['engine_ms']:>10.3f} "
                     f"{p['reference_ms']:>8.3f} {p['speedup']:>7.2f}x {p['engine_GBps']:>7.0f} "
                     f"{p['engine_TFLOPs']:>8.1f} {floor:>9} {pct('bound_fraction'):>9} "
                     f"{pct('memory_fraction'):>7} {pct('compute_fraction'):>8}")
    lines.append("floor: m = memory-bound (bytes at the datasheet bandwidth), c = compute-bound (FLOPs at "
                 "the datasheet dense rate)")
    if report["modes"]:
        lines.append(f"{'mode':5} {'backend':9} {'batch':>5} {'tok/s':>8} {'tok/s/req':>9} {'TPF':>6} same")
        for m in report["modes"]:
            lines.append(f"{m['mode']:5} {m['backend']:9} {m['batch']:>5} {m['tokens_per_s_total']:>8.1f} "
                         f"{m['tokens_per_s_per_request']:>9.1f} {m['tokens_per_forward']:>6.2f} "
                         f"{m.get('same_tokens_as_reference', '')}")
    return "\n".join(lines)
