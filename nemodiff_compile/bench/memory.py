"""Peak memory of one run: host RSS high-water mark (Linux resets it per run) and CUDA allocations."""

from __future__ import annotations

import resource
import sys


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Reset the process's peak RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_kb() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r          # bytes on macOS, KiB on Linux


class PeakMemory:
    """with PeakMemory() as m: ...  then m.rss_mb (peak RSS over the start), m.cuda_mb (or None).

    Where the peak cannot be reset (no /proc), the rusage high-water mark is used: it only shows
    growth beyond the process's earlier peak, so a later, smaller run reads 0.
    """

    def __enter__(self):
        self._torch_cuda = _cuda()
        if self._torch_cuda is not None:
            self._torch_cuda.synchronize()
            self._torch_cuda.reset_peak_memory_stats()
            self._cuda0 = self._torch_cuda.memory_allocated()
        self._exact = _reset_hwm()
        self._rss0 = _status_kb("VmRSS") if self._exact else _maxrss_kb()
        return self

    def __exit__(self, *exc):
        peak = _status_kb("VmHWM") if self._exact else _maxrss_kb()
        self.rss_mb = max(0, (peak or 0) - (self._rss0 or 0)) / 1024
        self.cuda_mb = None
        if self._torch_cuda is not None:
            self._torch_cuda.synchronize()
            self.cuda_mb = (self._torch_cuda.max_memory_allocated() - self._cuda0) / 2**20
        return False


def _cuda():
    """torch.cuda if torch is loaded and CUDA is in use in this process, else None."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda
