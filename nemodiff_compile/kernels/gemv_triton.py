"""The split-K GEMV-style Triton kernel of gemv.py (CUDA, or the CPU interpreter with TRITON_INTERPRET=1)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rounding import round_as

_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
SM_COUNT_DEFAULT = 132          # H100 / H200; the real count is read from the device when there is one


@triton.jit
def _splitk_partial(x_ptr, w_ptr, part_ptr, M, N, K, K_PER_SPLIT, stride_xm, stride_wn,
                    F32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """part[split, m, n] = sum over this split's K range of x[m, k] * w[n, k], fp32. F32_DOT (the CPU
    interpreter, whose dot multiplies bf16 bit patterns): exact fp32 operands, IEEE products."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = pid_k * K_PER_SPLIT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, K_PER_SPLIT, BLOCK_K):
        rk = kk + tl.arange(0, BLOCK_K)
        kmask = (rk < K_PER_SPLIT) & (k0 + rk < K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :],
                    mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + rn[:, None] * stride_wn + (k0 + rk)[None, :],
                    mask=(rn[:, None] < N) & kmask[None, :], other=0.0)
        if F32_DOT:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:   # bf16 operands (fp8 codes are exact in bf16), fp32 accumulation on the tensor cores
            acc += tl.dot(x.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)), out_dtype=tl.float32)
    out = part_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :]
    tl.store(out, acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _splitk_reduce(part_ptr, out_ptr, xs_ptr, ws_ptr, M, N, SPLIT: tl.constexpr, HAS_SCALE: tl.constexpr,
                   DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """out[m, n] = round(sum_s part[s, m, n] (* xs[m] * ws[n])), the splits summed in order."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT):
        acc += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0)
    if HAS_SCALE:
        acc = acc * tl.load(xs_ptr + offs // N, mask=mask, other=0.0) * tl.load(ws_ptr + offs % N, mask=mask, other=0.0)
    tl.store(out_ptr + offs, round_as(acc, DTYPE).to(DTYPE), mask=mask)


def plan(M: int, N: int, K: int, sms: int = SM_COUNT_DEFAULT, block_n: int = 64, block_k: int = 128
         ) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT): enough programs for ~2 waves over the SMs, each split a
    whole number of BLOCK_K steps."""
    block_m = max(16, triton.next_power_of_2(M))
    n_blocks = triton.cdiv(N, block_n)
    k_steps = triton.cdiv(K, block_k)
    split = 1
    while n_blocks * split < 2 * sms and split * 2 <= k_steps:
        split *= 2
    return block_m, block_n, block_k, split


def gemv_triton(x: torch.Tensor, w: torch.Tensor, x_scale: torch.Tensor | None = None,
                w_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                split: int | None = None) -> torch.Tensor:
    """x [..., K] (M = rows <= 64), w [N, K] -> y [..., N] (see gemv.gemv_torch). split: override the plan."""
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K).contiguous()
    M, N = x2.shape[0], w.shape[0]
    if w.shape[1] != K or w.stride(1) != 1:
        raise ValueError(f"gemv: w must be [N, {K}] with unit stride over K, got {tuple(w.shape)}")
    if (x_scale is None) != (w_scale is None):
        raise ValueError("gemv: FP8 needs both x_scale [M, 1] and w_scale [1, N]")
    out_dtype = out_dtype or x.dtype
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else SM_COUNT_DEFAULT
    bm, bn, bk, sp = plan(M, N, K, sms)
    if split is not None:
        sp = split
    k_per = triton.cdiv(triton.cdiv(K, sp), bk) * bk
    sp = triton.cdiv(K, k_per)
    part = torch.empty(sp, M, N, dtype=torch.float32, device=x.device)
    _splitk_partial[(triton.cdiv(N, bn), sp)](x2, w, part, M, N, K, k_per, x2.stride(0), w.stride(0),
                                               F32_DOT=not x.is_cuda or torch.float32 in (x.dtype, w.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
    y = torch.empty(M, N, dtype=out_dtype, device=x.device)
    has_scale = x_scale is not None
    xs = x_scale.reshape(-1).float().contiguous() if has_scale else part
    ws = w_scale.reshape(-1).float().contiguous() if has_scale else part
    BLOCK = 1024
    _splitk_reduce[(triton.cdiv(M * N, BLOCK),)](part, y, xs, ws, M, N, SPLIT=sp, HAS_SCALE=has_scale,
                                                  DTYPE=_TL[out_dtype], BLOCK=BLOCK)
    return y.view(*lead, N)
