"""Benchmark denoisers (e.g. "engine" and "reference") on the same prompts, policy and seed.

Runs are interleaved (repeat 1: every denoiser, repeat 2: every denoiser, ...) so drift in clocks or
caches hits all of them alike, and share the seed so they see the same noise. Per denoiser: per-pass
latency by phase (mean / p50 / p90 ms), tokens per forward, tokens/s (generated tokens / wall time of
the whole generate call), and peak memory of a run (host RSS growth; torch CUDA allocations; an
engine's own device allocator, e.g. ONNX Runtime's or TensorRT's, is not seen by torch).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidArgument
from ..decoding import loops
from ..decoding.denoiser import Denoiser
from ..decoding.policy import DecodePolicy
from .memory import PeakMemory
from .timing import TimingDenoiser


@dataclass
class DenoiserBench:
    name: str
    wall_s: list[float] = field(default_factory=list)            # per measured repeat
    tokens: list[int] = field(default_factory=list)             # generated tokens per repeat (all rows)
    pass_ms: dict[str, list[float]] = field(default_factory=dict)   # phase -> latencies
    nfe: int = 0
    nfe_by_phase: dict[str, int] = field(default_factory=dict)
    tokens_per_forward: float = 0.0
    peak_rss_delta_mb: float = 0.0                              # host peak RSS over a run's start, max over runs
    peak_cuda_mb: float | None = None                           # torch CUDA allocations over the start
    output: list[list[int]] = field(default_factory=list, repr=False)

    @property
    def tokens_per_s(self) -> float:
        t = sum(self.wall_s)
        return sum(self.tokens) / t if t > 0 else 0.0

    def latency(self) -> dict[str, dict[str, float]]:
        all_ms = [x for xs in self.pass_ms.values() for x in xs]
        return {ph: _summary(xs) for ph, xs in {**self.pass_ms, "all": all_ms}.items() if xs}

    def to_json(self) -> dict[str, Any]:
        return dict(tokens_per_s=self.tokens_per_s, wall_s_mean=sum(self.wall_s) / max(1, len(self.wall_s)),
                    tokens=self.tokens[-1] if self.tokens else 0, nfe=self.nfe, nfe_by_phase=self.nfe_by_phase,
                    tokens_per_forward=self.tokens_per_forward, pass_ms=self.latency(),
                    peak_rss_delta_mb=self.peak_rss_delta_mb, peak_cuda_mb=self.peak_cuda_mb)


@dataclass
class BenchReport:
    settings: dict[str, Any]
    results: dict[str, DenoiserBench]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(settings=self.settings,
                                   denoisers={k: r.to_json() for k, r in self.results.items()})
        base = self.results.get("reference")
        for k, r in self.results.items():
            if base is not None and k != "reference":
                out["denoisers"][k]["same_tokens_as_reference"] = r.output == base.output
        for k in ("engine", "reference"):
            if k in self.results:
                out[f"{k}_tokens_per_s"] = self.results[k].tokens_per_s
        if "engine" in self.results and base is not None:
            ref = base.tokens_per_s
            out["speedup"] = self.results["engine"].tokens_per_s / ref if ref > 0 else None
        return out

    def to_table(self) -> str:
        s = self.settings
        head = ("denoiser", "tok/s", "tok/fwd", "nfe", "ms/pass mean", "p50", "p90", "peak RSS +MB", "peak CUDA MB")
        rows = []
        for name, r in self.results.items():
            lat = r.latency().get("all", {})
            rows.append((name, f"{r.tokens_per_s:.1f}", f"{r.tokens_per_forward:.2f}", str(r.nfe),
                         f"{lat.get('mean', 0):.2f}", f"{lat.get('p50', 0):.2f}", f"{lat.get('p90', 0):.2f}",
                         f"{r.peak_rss_delta_mb:.1f}", "-" if r.peak_cuda_mb is None else f"{r.peak_cuda_mb:.1f}"))
        widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
        line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
        out = [f"bench: mode {s['mode']}, batch {s['batch']}, {s['max_new_tokens']} new tokens, "
               f"{s['repeats']} repeats after {s['warmup']} warmup",
               line(head), line(tuple("-" * w for w in widths)), *map(line, rows)]
        for name, r in self.results.items():
            per_phase = ", ".join(f"{ph} {d['mean']:.2f}" for ph, d in r.latency().items() if ph != "all")
            out.append(f"{name} ms/pass by phase: {per_phase}")
        sp = self.to_json().get("speedup")
        if sp is not None:
            out.append(f"speedup (engine / reference tokens/s): {sp:.2f}x")
        return "\n".join(out)


def bench(denoisers: dict[str, Denoiser], prompts: list[list[int]], *, mode: str = "dlm",
          max_new_tokens: int = 64, block_length: int | None = None, threshold: float | None = 0.9,
          temperature: float = 0.0, seed: int = 0, warmup: int = 1, repeats: int = 3) -> BenchReport:
    """threshold applies to dlm (None: the policy's default); linear-spec and ar use their defaults. Every
    pass runs on the host (timed one by one), device block refiners included."""
    if not denoisers:
        raise InvalidArgument("bench needs at least one denoiser")
    if repeats < 1 or warmup < 0:
        raise InvalidArgument(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    policy = DecodePolicy(mode, block_length=block_length, threshold=threshold if mode == "dlm" else None,
                          temperature=temperature, seed=seed)
    results = {name: DenoiserBench(name) for name in denoisers}
    for rep in range(warmup + repeats):
        for name, den in denoisers.items():                      # interleaved
            timed = TimingDenoiser(den)
            with PeakMemory() as mem:
                t0 = time.perf_counter()
                gen = loops.generate(timed, prompts, policy, max_new_tokens=max_new_tokens, trace=True)
                wall = time.perf_counter() - t0
            r = results[name]
            r.peak_rss_delta_mb = max(r.peak_rss_delta_mb, mem.rss_mb)     # warmup included: first
            if mem.cuda_mb is not None:                                   # runs allocate the caches
                r.peak_cuda_mb = max(r.peak_cuda_mb or 0.0, mem.cuda_mb)
            if rep < warmup:
                continue
            r.wall_s.append(wall)
            r.tokens.append(sum(len(t) for t in gen.tokens))
            for rec, s in zip(gen.trace, timed.step_s, strict=True):  # one trace record per step call
                r.pass_ms.setdefault(rec.phase, []).append(s * 1e3)
            r.nfe, r.nfe_by_phase, r.tokens_per_forward = gen.nfe, gen.nfe_by_phase, gen.tokens_per_forward
            r.output = gen.tokens
    settings = dict(mode=mode, batch=len(prompts), max_new_tokens=max_new_tokens, block_length=block_length,
                    threshold=threshold if mode == "dlm" else None, temperature=temperature, seed=seed,
                    warmup=warmup, repeats=repeats)
    return BenchReport(settings, results)


def _summary(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return dict(n=len(s), mean=sum(s) / len(s), p50=_quantile(s, 0.5), p90=_quantile(s, 0.9))


def _quantile(s: list[float], q: float) -> float:
    """Linear interpolation between closest ranks of sorted s (numpy's default)."""
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)
