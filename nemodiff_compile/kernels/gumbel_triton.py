"""The fused Gumbel-max pick of gumbel.py (CUDA, or the CPU interpreter with TRITON_INTERPRET=1)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..decoding.noise import _SALT, hash32
from .rounding import round_as


@triton.jit
def _h32(x):
    """decoding.noise.hash32 on uint32 lanes (a wrapping multiply is the int64 version's `& 0xFFFFFFFF`)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x2C1B3C6D
    return x ^ (x >> 16)


@triton.jit
def _gumbel_pick(logits_ptr, base_ptr, base2_ptr, token_ptr, conf_ptr, L, V, temp_ptr,
                 ROUND_BF16: tl.constexpr, ROUND_FP16: tl.constexpr, LIBDEVICE: tl.constexpr,
                 BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)               # b * L + i
    b = row // L
    i = row % L
    base = tl.load(base_ptr + b).to(tl.uint32)
    base2 = tl.load(base2_ptr + b).to(tl.uint32)
    temperature = tl.load(temp_ptr)                   # float64 (a scalar argument would be float32)
    ptr = logits_ptr + row * V
    offs = tl.arange(0, BLOCK_V)
    m = -float("inf")                                 # running max of the raw logits (fp32)
    s = 0.0                                           # sum of exp(l - m)
    best = tl.full([], -float("inf"), tl.float64)     # running max of the float64 score
    best_i = 0
    best_l = 0.0
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        ok = idx < V
        raw = tl.load(ptr + idx, mask=ok, other=-float("inf"))
        x = raw.to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.where(ok, tl.exp(x - m_new), 0.0), 0)
        m = m_new
        e = (i * V + idx).to(tl.uint32)               # the element index, low 32 bits (noise.py)
        hi = _h32(_h32(base ^ e)) >> 6                # 26 bits
        lo = _h32(_h32(base2 ^ e)) >> 5               # 27 bits
        u = (hi.to(tl.float64) * 134217728.0 + lo.to(tl.float64) + 0.5) * (2.0 ** -53)
        if LIBDEVICE:     # CUDA: __nv_log, the float64 log torch's CUDA kernels call (same bits)
            g = -libdevice.log(-libdevice.log(u))
        else:             # the interpreter (numpy's log; libdevice is not interpreted)
            g = -tl.log(-tl.log(u))
        score = tl.where(ok, raw.to(tl.float64) + temperature * g, -float("inf"))
        c_best = tl.max(score, 0)
        c_i = tl.min(tl.where(score == c_best, idx, V), 0)
        c_l = tl.sum(tl.where(idx == c_i, x, 0.0), 0)
        take = c_best > best
        best_l = tl.where(take, c_l, best_l)
        best_i = tl.where(take, c_i, best_i)
        best = tl.where(take, c_best, best)
    conf = tl.exp(best_l - m) / s
    if ROUND_BF16:
        conf = round_as(conf, tl.bfloat16)
    if ROUND_FP16:
        conf = round_as(conf, tl.float16)
    tl.store(token_ptr + row, best_i.to(tl.int64))
    tl.store(conf_ptr + row, conf)


def row_bases(keys: torch.Tensor, counters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-row hash state of noise.gumbel: base, base2 [B] int64 (values < 2**32)."""
    base = hash32(keys ^ hash32(counters & 0xFFFFFFFF))
    return base, hash32(base ^ _SALT)


def gumbel_pick_triton(logits: torch.Tensor, keys: torch.Tensor, counters: torch.Tensor, temperature: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    B, L, V = logits.shape
    logits = logits.contiguous()
    base, base2 = row_bases(keys, counters)
    token = torch.empty(B, L, dtype=torch.int64, device=logits.device)
    conf = torch.empty(B, L, dtype=torch.float32, device=logits.device)
    temp = torch.full((1,), float(temperature), dtype=torch.float64, device=logits.device)
    _gumbel_pick[(B * L,)](logits, base, base2, token, conf, L, V, temp,
                           ROUND_BF16=logits.dtype == torch.bfloat16, ROUND_FP16=logits.dtype == torch.float16,
                           LIBDEVICE=logits.is_cuda, BLOCK_V=min(2048, triton.next_power_of_2(V)))
    return token, conf
