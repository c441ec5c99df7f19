"""Custom ops shared by the exporter, the builder and the runtimes: one folder per op, each with its
id table (`spec.py`), a torch reference (`reference.py`) and kernels."""

from __future__ import annotations


def triton_usable(t) -> bool:
    """True when `t` lives on a CUDA device and Triton imports: the kernels run, else torch does."""
    if not t.is_cuda:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
