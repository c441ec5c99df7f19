"""Benchmark denoisers (e.g. "engine" and "reference") on the same prompts, policy and seed.

Runs are interleaved (repeat 1: every denoiser, repeat 2: every denoiser, ...) so drift in clocks or
caches hits all of them alike, and share the seed so they see the same noise. Per denoiser: per-pass
latency by phase (mean / p50 / p90 ms), tokens per forward, tokens/s (generated tokens / wall time of
the whole generate call), and peak memory of a run (host RSS growth; torch CUDA allocations; an
engine's own device allocator, e.g. ONNX Runtime's or TensorRT's, is not seen by torch).

Denoisers with a device block refiner for the policy (the fast engine; engines built with a remask
stage) refine greedy dlm blocks on their device, as a generation would: those passes are not timed one
by one (no host sync inside a block); each refined block's time is split evenly over the passes the
device ran. `refine_ms_per_pass` puts every variant on one scale: the time of a generation spent
outside its prefill / commit passes (refinement passes with whatever the host does between them:
the host commit rule, bindings, done-flag reads) over the refinement passes run.
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
    device_loop: bool = False                                   # dlm blocks refined on the device
    device_passes: int = 0                                      # refinement passes the device ran (last repeat)
    refine_s: float = 0.0                                       # wall time outside prefill/commit passes (dlm)
    refine_passes: int = 0                                      # refinement passes run in that time

    @property
    def refine_ms_per_pass(self) -> float | None:
        return self.refine_s * 1e3 / self.refine_passes if self.refine_passes else None

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
                    peak_rss_delta_mb=self.peak_rss_delta_mb, peak_cuda_mb=self.peak_cuda_mb,
                    device_loop=self.device_loop, device_passes=self.device_passes,
                    refine_ms_per_pass=self.refine_ms_per_pass)


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
                ref = base.tokens_per_s
                out["denoisers"][k]["speedup"] = r.tokens_per_s / ref if ref > 0 else None
        for k in ("engine", "reference"):
            if k in self.results:
                out[f"{k}_tokens_per_s"] = self.results[k].tokens_per_s
        if "engine" in self.results and base is not None:
            ref = base.tokens_per_s
            out["speedup"] = self.results["engine"].tokens_per_s / ref if ref > 0 else None
        return out

    def to_table(self) -> str:
        s = self.settings
        head = ("denoiser", "tok/s", "tok/fwd", "nfe", "ms/pass mean", "p50", "p90", "refine ms/pass", "loop",
                "peak RSS +MB", "peak CUDA MB")
        rows = []
        for name, r in self.results.items():
            lat = r.latency().get("all", {})
            rp = r.refine_ms_per_pass
            rows.append((name, f"{r.tokens_per_s:.1f}", f"{r.tokens_per_forward:.2f}", str(r.nfe),
                         f"{lat.get('mean', 0):.2f}", f"{lat.get('p50', 0):.2f}", f"{lat.get('p90', 0):.2f}",
                         "-" if rp is None else f"{rp:.2f}", "device" if r.device_loop else "host",
                         f"{r.peak_rss_delta_mb:.1f}", "-" if r.peak_cuda_mb is None else f"{r.peak_cuda_mb:.1f}"))
        widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
        line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
        out = [f"bench: mode {s['mode']}, batch {s['batch']}, {s['max_new_tokens']} new tokens, "
               f"{s['repeats']} repeats after {s['warmup']} warmup",
               line(head), line(tuple("-" * w for w in widths)), *map(line, rows)]
        for name, r in self.results.items():
            per_phase = ", ".join(f"{ph} {d['mean']:.2f}" for ph, d in r.latency().items() if ph != "all")
            out.append(f"{name} ms/pass by phase: {per_phase}")
        js = self.to_json()
        for name, d in js["denoisers"].items():
            if d.get("speedup") is not None:
                out.append(f"speedup ({name} / reference tokens/s): {d['speedup']:.2f}x")
        return "\n".join(out)


def bench(denoisers: dict[str, Denoiser], prompts: list[list[int]], *, mode: str = "dlm",
          max_new_tokens: int = 64, block_length: int | None = None, threshold: float | None = 0.9,
          steps: int | None = None,
          temperature: float = 0.0, seed: int = 0, warmup: int = 1, repeats: int = 3) -> BenchReport:
    """threshold applies to dlm (None: the policy's default), steps selects dlm's fixed-steps policy
    instead; linear-spec and ar use their defaults. Passes through `step` are timed one by one; greedy dlm
    blocks go to a denoiser's device block refiner where it has one for the policy (module docstring)."""
    if not denoisers:
        raise InvalidArgument("bench needs at least one denoiser")
    if repeats < 1 or warmup < 0:
        raise InvalidArgument(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    policy = DecodePolicy(mode, block_length=block_length, threshold=threshold if mode == "dlm" and steps is None
                          else None, steps=steps, temperature=temperature, seed=seed)
    results = {name: DenoiserBench(name) for name in denoisers}
    for rep in range(warmup + repeats):
        for name, den in denoisers.items():                      # interleaved
            timed = TimingDenoiser(den, mode)
            with PeakMemory() as mem:
                t0 = time.perf_counter()
                gen = loops.generate(timed, prompts, policy, max_new_tokens=max_new_tokens)
                wall = time.perf_counter() - t0
            r = results[name]
            r.peak_rss_delta_mb = max(r.peak_rss_delta_mb, mem.rss_mb)     # warmup included: first
            if mem.cuda_mb is not None:                                   # runs allocate the caches
                r.peak_cuda_mb = max(r.peak_cuda_mb or 0.0, mem.cuda_mb)
            if rep < warmup:
                continue
            r.wall_s.append(wall)
            r.tokens.append(sum(len(t) for t in gen.tokens))
            for phase, s in zip(timed.phases, timed.step_s, strict=True):
                r.pass_ms.setdefault(phase, []).append(s * 1e3)
            for s, n in timed.refine_s:                                   # device-refined blocks
                r.pass_ms.setdefault("denoise", []).extend([s * 1e3 / n] * n)
            if mode == "dlm":
                other = sum(s for phase, s in zip(timed.phases, timed.step_s) if phase != "denoise")
                r.refine_s += wall - other
                r.refine_passes += gen.device_passes or gen.nfe_by_phase.get("denoise", 0)
            r.device_loop, r.device_passes = bool(timed.refine_s), gen.device_passes
            r.nfe, r.nfe_by_phase, r.tokens_per_forward = gen.nfe, gen.nfe_by_phase, gen.tokens_per_forward
            r.output = gen.tokens
    settings = dict(mode=mode, batch=len(prompts), max_new_tokens=max_new_tokens, block_length=block_length,
                    threshold=policy.threshold if mode == "dlm" else None, steps=steps, temperature=temperature, seed=seed,
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
