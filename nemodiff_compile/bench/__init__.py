"""Throughput and per-pass latency of denoisers on the same decode loop.

    from nemodiff_compile.bench import bench
    report = bench({"engine": ort, "reference": torch_ref}, prompts, mode="dlm")
    report.to_json()["speedup"]
"""

__all__ = ["bench", "BenchReport", "TimingDenoiser"]


def __getattr__(name):                            # torch-heavy parts load on first use
    if name in ("bench", "BenchReport", "DenoiserBench"):
        from . import run
        return getattr(run, name)
    if name == "TimingDenoiser":
        from .timing import TimingDenoiser
        return TimingDenoiser
    raise AttributeError(name)
