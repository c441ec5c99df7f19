"""Small-M projections: y = x @ W.T for M <= 64 rows, split over K (a GEMV-style kernel).

At batch 1 x block 32 a refinement pass is a sweep over the weights: each projection reads its whole
[N, K] weight for 32 rows of activations, and cuBLAS's tiles for M=32 leave the H200's bandwidth
partly idle (the profile: qkv at 3.1 TB/s of 4.8). Splitting K puts cdiv(N, BLOCK_N) x SPLIT programs
on the SMs, each streaming a [BLOCK_N, K / SPLIT] slab of W once; the fp32 partials [SPLIT, M, N] are
summed in a fixed order by a second small kernel (deterministic, so graph replay equals eager), whose
epilogue applies the FP8 scales and rounds to the output dtype.

  gemv_torch   the definition: fp32 products accumulated in fp32, (FP8: times x_scale[m] * w_scale[n]),
               rounded once to the output dtype
  gemv         dispatch: the Triton kernel (gemv_triton.py) for CUDA tensors with M <= MAX_M, else torch
FP8 (the fast engine's "row" mode): x as float8_e4m3fn codes with a per-row scale [M, 1], W as
float8_e4m3fn codes with a per-output-channel scale [1, N]; the codes are exact in bf16, so the kernel
multiplies them in bf16 with fp32 accumulation and applies both scales in the epilogue (no cuBLASLt).

Tolerance against gemv_torch: the same fp32 products summed in another order, rounded once to bf16:
at most one bf16 ulp apart (rtol 2**-7), documented in the tests.
"""

from __future__ import annotations

import torch

from . import triton_usable

MAX_M = 64


def gemv_torch(x: torch.Tensor, w: torch.Tensor, x_scale: torch.Tensor | None = None,
               w_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [M, K], w [N, K] (bf16/fp16, or float8_e4m3fn with x_scale [M, 1] and w_scale [1, N]) -> [M, N]."""
    y = x.float() @ w.float().t()                                                    # [M, N] fp32
    if x_scale is not None:
        y = y * x_scale.float() * w_scale.float()
    return y.to(out_dtype or x.dtype)


def usable(x: torch.Tensor) -> bool:
    """Whether `gemv` runs the Triton kernel for x [..., K]: CUDA, Triton importable, at most MAX_M rows."""
    return triton_usable(x) and x.numel() // x.shape[-1] <= MAX_M


def gemv(x: torch.Tensor, w: torch.Tensor, x_scale: torch.Tensor | None = None,
         w_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """gemv_torch's contract; the split-K Triton kernel where `usable(x)`."""
    if not usable(x):
        return gemv_torch(x, w, x_scale, w_scale, out_dtype)
    from .gemv_triton import gemv_triton
    return gemv_triton(x, w, x_scale, w_scale, out_dtype)
