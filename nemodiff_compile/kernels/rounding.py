"""Rounding float32 to a narrower float inside Triton kernels, bit-exactly as torch rounds.

Eager torch rounds every bf16 op's fp32 result to nearest-even (c10::BFloat16). A kernel that mirrors
eager arithmetic must round at the same points and the same way; a plain `.to(tl.bfloat16)` leaves the
rounding to the backend (the CPU interpreter truncates), so bf16 is rounded here with integer
arithmetic on the bits, which no backend can change.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_as(x, DTYPE: tl.constexpr):
    """float32 x rounded to DTYPE (bf16, fp16 or fp32), returned as float32."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)              # round half to even (NaN/inf aside)
        return ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    elif DTYPE == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x
