"""Triton bodies of `kernels.py` (imported only where Triton and a device are present). One program
per row; every rounding step mirrors the torch fallback so both give the same bits up to fp32
reduction order."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rounding import round_as
from .fused import FP8_MAX

_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _store_out(ptr, y, mask, scale_ptr, OUT_FP8: tl.constexpr, DTYPE: tl.constexpr, FP8MAX: tl.constexpr):
    """Store y (fp32, already rounded to DTYPE) as DTYPE, or as FP8 with the static scale at scale_ptr."""
    if OUT_FP8:
        q = tl.minimum(tl.maximum(y / tl.load(scale_ptr), -FP8MAX), FP8MAX)
        tl.store(ptr, q.to(tl.float8e4nv), mask=mask)
    else:
        tl.store(ptr, y.to(DTYPE), mask=mask)


@triton.jit
def _add_rmsnorm(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, scale_ptr, N, eps,
                 HAS_RES: tl.constexpr, DTYPE: tl.constexpr, OUT_FP8: tl.constexpr, FP8MAX: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    ok = offs < N
    h = tl.load(x_ptr + row * N + offs, mask=ok, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * N + offs, mask=ok, other=0.0)
        h = round_as(h.to(tl.float32) + r.to(tl.float32), DTYPE)           # eager x + res rounding
        tl.store(sum_ptr + row * N + offs, h.to(DTYPE), mask=ok)
    f = h.to(tl.float32)
    var = tl.sum(f * f, 0) / N
    y = round_as(f * tl.rsqrt(var + eps), DTYPE)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0)
    out = round_as(w.to(tl.float32) * y, DTYPE)
    _store_out(out_ptr + row * N + offs, out, ok, scale_ptr, OUT_FP8, DTYPE, FP8MAX)


@triton.jit
def _silu_mul(gu_ptr, out_ptr, scale_ptr, I, DTYPE: tl.constexpr, OUT_FP8: tl.constexpr, FP8MAX: tl.constexpr,
              BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < I
    g = tl.load(gu_ptr + row * 2 * I + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * I + I + offs, mask=ok, other=0.0).to(tl.float32)
    s = round_as(g / (1.0 + tl.exp(-g)), DTYPE)                            # eager silu rounds here
    _store_out(out_ptr + row * I + offs, round_as(s * u, DTYPE), ok, scale_ptr, OUT_FP8, DTYPE, FP8MAX)


@triton.jit
def _quant_fp8(x_ptr, q_ptr, scale_ptr, K, FP8MAX: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    ok = offs < K
    x = tl.load(x_ptr + row * K + offs, mask=ok, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), 0), 1e-12) / FP8MAX
    q = tl.minimum(tl.maximum(x / scale, -FP8MAX), FP8MAX)
    tl.store(q_ptr + row * K + offs, q.to(tl.float8e4nv), mask=ok)
    tl.store(scale_ptr + row, scale)


def _out_dtype(x, out_scale):
    return torch.float8_e4m3fn if out_scale is not None else x.dtype


def add_rmsnorm_triton(x, res, weight, eps, out_scale=None):
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    out = torch.empty(x2.shape, dtype=_out_dtype(x, out_scale), device=x.device)
    total = torch.empty_like(x2) if res is not None else x2
    _add_rmsnorm[(x2.shape[0],)](x2, res.reshape(-1, N) if res is not None else x2, weight, out, total,
                                 out_scale if out_scale is not None else weight, N, eps,
                                 HAS_RES=res is not None, DTYPE=_TL[x.dtype], OUT_FP8=out_scale is not None,
                                 FP8MAX=FP8_MAX, BLOCK_N=triton.next_power_of_2(N))
    return out.view(x.shape), total.view_as(x)


def silu_mul_triton(gu, out_scale=None):
    I2 = gu.shape[-1]
    g2 = gu.reshape(-1, I2)
    out = torch.empty(g2.shape[0], I2 // 2, dtype=_out_dtype(gu, out_scale), device=gu.device)
    BLOCK = 1024
    _silu_mul[(g2.shape[0], triton.cdiv(I2 // 2, BLOCK))](g2, out, out_scale if out_scale is not None else g2,
                                                         I2 // 2, DTYPE=_TL[gu.dtype],
                                                         OUT_FP8=out_scale is not None, FP8MAX=FP8_MAX,
                                                         BLOCK=BLOCK)
    return out.view(*gu.shape[:-1], I2 // 2)


@triton.jit
def _quant_static(x_ptr, q_ptr, scale_ptr, n, FP8MAX: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    q = tl.minimum(tl.maximum(x / tl.load(scale_ptr), -FP8MAX), FP8MAX)
    tl.store(q_ptr + offs, q.to(tl.float8e4nv), mask=ok)


def quant_static_triton(x, scale):
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    _quant_static[(triton.cdiv(x.numel(), 1024),)](x, q, scale, x.numel(), FP8MAX=FP8_MAX, BLOCK=1024)
    return q


def quant_fp8_triton(x):
    M, K = x.shape
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(M, 1, dtype=torch.float32, device=x.device)
    _quant_fp8[(M,)](x.contiguous(), q, scale, K, FP8MAX=FP8_MAX, BLOCK_K=triton.next_power_of_2(K))
    return q, scale


@triton.jit
def _rope_qkv(qkv_ptr, cos_ptr, sin_ptr, qscale_ptr, pos_ptr, q_ptr, k_ptr, v_ptr,
              L, S, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DTYPE: tl.constexpr):
    """One program per (token, head) over q, k and v heads: RoPE (+ the query scale) with the eager
    rounding after every op, q to [B, Hq, L, D], k and v into the cache rows [B, Hkv, S, D] at the
    token's position."""
    tok = tl.program_id(0).to(tl.int64)                   # b * L + l
    h = tl.program_id(1)
    b = tok // L
    l_ = tok % L
    d = tl.arange(0, D)
    row = qkv_ptr + tok * (HQ + 2 * HKV) * D
    if h < HQ + HKV:
        x = tl.load(row + h * D + d).to(tl.float32)
        xr = tl.load(row + h * D + (d + D // 2) % D).to(tl.float32)
        xr = tl.where(d < D // 2, -xr, xr)                # rotate_half
        c = tl.load(cos_ptr + tok * D + d).to(tl.float32)
        s_ = tl.load(sin_ptr + tok * D + d).to(tl.float32)
        y = round_as(round_as(x * c, DTYPE) + round_as(xr * s_, DTYPE), DTYPE)
        if h < HQ:
            qs = round_as(tl.load(qscale_ptr + tok), DTYPE)
            y = round_as(y * qs, DTYPE)
            tl.store(q_ptr + ((b * HQ + h) * L + l_) * D + d, y.to(DTYPE))
        else:
            pos = tl.load(pos_ptr + tok)
            tl.store(k_ptr + ((b * HKV + (h - HQ)) * S + pos) * D + d, y.to(DTYPE))
    else:
        pos = tl.load(pos_ptr + tok)
        val = tl.load(row + h * D + d)
        tl.store(v_ptr + ((b * HKV + (h - HQ - HKV)) * S + pos) * D + d, val)


def rope_qkv_triton(qkv, cos, sin, qscale, positions, cache_k, cache_v, n_heads, n_kv):
    B, L, _ = qkv.shape
    D = cos.shape[-1]
    q = torch.empty(B, n_heads, L, D, dtype=qkv.dtype, device=qkv.device)
    _rope_qkv[(B * L, n_heads + 2 * n_kv)](qkv, cos, sin, qscale.contiguous(), positions.contiguous(), q,
                                          cache_k, cache_v, L, cache_k.shape[2], HQ=n_heads, HKV=n_kv, D=D,
                                          DTYPE=_TL[qkv.dtype])
    return q


@triton.jit
def _amax_atomic(x_ptr, amax_ptr, K, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + row * K + offs, mask=offs < K, other=0.0).to(tl.float32)
    tl.atomic_max(amax_ptr, tl.max(tl.abs(x), 0))         # amax >= 0: float order = int order


@triton.jit
def _quant_fp8_scalar(x_ptr, q_ptr, amax_ptr, scale_ptr, K, FP8MAX: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    ok = offs < K
    scale = tl.maximum(tl.load(amax_ptr), 1e-12) / FP8MAX
    x = tl.load(x_ptr + row * K + offs, mask=ok, other=0.0).to(tl.float32)
    q = tl.minimum(tl.maximum(x / scale, -FP8MAX), FP8MAX)
    tl.store(q_ptr + row * K + offs, q.to(tl.float8e4nv), mask=ok)
    if row == 0:
        tl.store(scale_ptr, scale)


def quant_fp8_tensor_triton(x):
    M, K = x.shape
    x = x.contiguous()
    amax = torch.zeros((), dtype=torch.float32, device=x.device)
    scale = torch.empty((), dtype=torch.float32, device=x.device)
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    block = triton.next_power_of_2(K)
    _amax_atomic[(M,)](x, amax, K, BLOCK_K=block)
    _quant_fp8_scalar[(M,)](x, q, amax, scale, K, FP8MAX=FP8_MAX, BLOCK_K=block)
    return q, scale


@triton.jit
def _attn_split(q_ptr, k_ptr, v_ptr, len_ptr, nv_ptr, acc_ptr, m_ptr, l_ptr, L, S, NSPLIT, sm_scale,
                REP: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr,
                IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr):
    """Partial attention of one KV head's query rows (rep*L, GQA-folded) over one key split."""
    bh = tl.program_id(0).to(tl.int64)                      # b * HKV + kv head
    mt = tl.program_id(1)
    sp = tl.program_id(2)
    b = bh // HKV
    R = REP * L
    rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (bh * R + rows)[:, None] * D + d[None, :], mask=row_ok[:, None], other=0.0)
    length = tl.load(len_ptr + b)
    visible = length + tl.load(nv_ptr + b)                  # keys [0, visible) exist for this row
    qpos = length + rows % L                                # [BLOCK_M] absolute query positions
    m = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_ = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    kv = bh * S * D
    for n0 in range(0, SPLIT, BLOCK_N):
        keys = sp * SPLIT + n0 + tl.arange(0, BLOCK_N)
        key_ok = (keys < visible) & (keys < S)
        k = tl.load(k_ptr + kv + keys[:, None] * D + d[None, :], mask=key_ok[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * sm_scale
        else:
            s = tl.dot(q, tl.trans(k)) * sm_scale
        ok = key_ok[None, :]
        if CAUSAL:
            ok = ok & (keys[None, :] <= qpos[:, None])
        s = tl.where(ok, s, -float("inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)     # rows with nothing visible yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        l_ = l_ * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + kv + keys[:, None] * D + d[None, :], mask=key_ok[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    part = (bh * NSPLIT + sp) * R + rows                    # [BLOCK_M] into [B*HKV, NSPLIT, R]
    tl.store(m_ptr + part, m, mask=row_ok)
    tl.store(l_ptr + part, l_, mask=row_ok)
    tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _attn_combine(acc_ptr, m_ptr, l_ptr, out_ptr, scale_ptr, L, NSPLIT, REP: tl.constexpr, HKV: tl.constexpr,
                  D: tl.constexpr, DTYPE: tl.constexpr, OUT_FP8: tl.constexpr, FP8MAX: tl.constexpr,
                  BLOCK_M: tl.constexpr):
    """Merge the splits (log-sum-exp weights) and write out [B, L, Hq * D], o_proj's input layout."""
    bh = tl.program_id(0).to(tl.int64)
    mt = tl.program_id(1)
    b = bh // HKV
    kvh = bh % HKV
    R = REP * L
    rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    d = tl.arange(0, D)
    m_max = tl.full([BLOCK_M], -float("inf"), tl.float32)
    for sp in range(0, NSPLIT):
        m_max = tl.maximum(m_max, tl.load(m_ptr + (bh * NSPLIT + sp) * R + rows, mask=row_ok,
                                          other=-float("inf")))
    m_max = tl.where(m_max == -float("inf"), 0.0, m_max)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for sp in range(0, NSPLIT):
        part = (bh * NSPLIT + sp) * R + rows
        w = tl.exp(tl.load(m_ptr + part, mask=row_ok, other=-float("inf")) - m_max)
        total += w * tl.load(l_ptr + part, mask=row_ok, other=0.0)
        acc += w[:, None] * tl.load(acc_ptr + part[:, None] * D + d[None, :], mask=row_ok[:, None], other=0.0)
    out = acc / tl.where(total > 0, total, 1.0)[:, None]     # padding rows: 0, not 0/0
    head = kvh * REP + rows // L
    dst = ((b * L + rows % L) * (HKV * REP) + head) * D
    _store_out(out_ptr + dst[:, None] + d[None, :], round_as(out, DTYPE), row_ok[:, None], scale_ptr, OUT_FP8,
               DTYPE, FP8MAX)


ATTN_SPLIT = 128          # keys per split: S = 640 gives 5 splits, about 80 programs at batch 1


def block_attention_triton(q, cache_k, cache_v, lengths, num_valid, causal, out_scale=None):
    B, Hq, L, D = q.shape
    Hkv, S = cache_k.shape[1], cache_k.shape[2]
    rep = Hq // Hkv
    R = rep * L
    nsplit = triton.cdiv(S, ATTN_SPLIT)
    BLOCK_M = 64 if R >= 64 else max(16, triton.next_power_of_2(R))
    mtiles = triton.cdiv(R, BLOCK_M)
    acc = torch.empty(B * Hkv, nsplit, R, D, dtype=torch.float32, device=q.device)
    m = torch.empty(B * Hkv, nsplit, R, dtype=torch.float32, device=q.device)
    l_ = torch.empty_like(m)
    _attn_split[(B * Hkv, mtiles, nsplit)](q, cache_k, cache_v, lengths, num_valid, acc, m, l_, L, S, nsplit,
                                           D ** -0.5, REP=rep, HKV=Hkv, D=D, CAUSAL=bool(causal),
                                           IEEE=q.dtype == torch.float32, BLOCK_M=BLOCK_M, BLOCK_N=64,
                                           SPLIT=ATTN_SPLIT)
    out = torch.empty(B, L, Hq * D, dtype=_out_dtype(q, out_scale), device=q.device)
    _attn_combine[(B * Hkv, triton.cdiv(R, 16))](acc, m, l_, out, out_scale if out_scale is not None else m,
                                                 L, nsplit, REP=rep, HKV=Hkv, D=D, DTYPE=_TL[q.dtype],
                                                 OUT_FP8=out_scale is not None, FP8MAX=FP8_MAX,
                                                 BLOCK_M=16)       # 16 rows a program: enough programs
    return out
