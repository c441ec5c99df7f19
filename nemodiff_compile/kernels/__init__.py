"""Kernels in one place, each op as its torch definition (the truth) + Triton + (where it has one) the
CUDA source binding and TensorRT plugin:

    fused.py, fused_triton.py   the fast engine's fused ops (add+RMSNorm, SiLU*up, FP8 quantization,
                                RoPE + cache write, split-KV block attention): definitions + dispatch,
                                and their Triton bodies
    gemv.py, gemv_triton.py     split-K GEMV-style projections for M <= 64 rows (bf16; FP8 scales in the
                                epilogue): definition + dispatch, and the Triton kernels
    gumbel.py, gumbel_triton.py Gumbel-max pick with decoding/noise.py's counter-based noise computed in
                                the kernel (sampled device loop): definition + dispatch, Triton kernel
    remask/                     `nemodiff::Remask`: id table, torch reference, Triton kernel, ctypes
                                binding of the CUDA kernel, Python IPluginV3
    registry.py                 plugin ids a graph needs; registering the creators with TensorRT
    rounding.py                 Triton's rounding to a torch dtype
    csrc/                       C++/CUDA sources of the TensorRT plugin + CMake (shipped with the package)
"""

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
