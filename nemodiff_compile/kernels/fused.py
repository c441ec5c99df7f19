"""Fused elementwise kernels of the fast engine, each with a torch fallback computing the same rounding.

On CUDA (with Triton) one launch replaces the handful of small kernels eager torch issues for the
same expression; inside a CUDA graph the launch count, not the bytes, is what these cost. On the CPU
the torch fallback runs, so the fast engine's arithmetic is testable anywhere:

  add_rmsnorm   h = x + res (rounded to the model dtype), y = w * (h * rsqrt(mean(h^2) + eps))
                with the statistics in fp32, the transformers Ministral3RMSNorm order
  silu_mul      silu(g) * u, each rounded to the dtype as eager torch does
  quant_fp8     per-row dynamic FP8 E4M3: scale = amax / 448, q = x / scale (Hopper matmul operand)
  quant_fp8_tensor  the same with one scale for the whole tensor
  rope_qkv      split the fused q|k|v projection, RoPE q and k (q times the Llama-4 query scale),
                q out as [B, Hq, L, D], k and v straight into the cache at each token's position
  block_attention  the block's queries over the cache in place (split over keys, then merged),
                written as [B, L, Hq * D] for o_proj; key j of row b visible iff
                j < lengths[b] + num_valid[b] (and j <= lengths[b] + i when causal)
  quant_static  FP8 with a calibrated per-tensor scale: q = clamp(x / scale) (the value rounded to
                the model dtype first). add_rmsnorm, silu_mul and block_attention take `out_scale`
                to emit their result this way, so a static-FP8 GEMM's input costs no extra launch.
"""

from __future__ import annotations

import torch

from . import triton_usable as _triton_ok

FP8_MAX = 448.0                                           # largest finite float8_e4m3fn


# ---- torch fallbacks (the definitions) --------------------------------------------------------------

def quant_static_torch(x, scale):
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def _maybe_quant(y, out_scale):
    return y if out_scale is None else quant_static_torch(y, out_scale)


def add_rmsnorm_torch(x, res, weight, eps, out_scale=None):
    h = x if res is None else x + res
    f = h.float()
    y = (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return _maybe_quant(weight * y, out_scale), h


def silu_mul_torch(gu, out_scale=None):
    g, u = gu.chunk(2, dim=-1)
    return _maybe_quant(torch.nn.functional.silu(g) * u, out_scale)


def quant_fp8_torch(x):
    amax = x.abs().amax(-1, keepdim=True).float().clamp_min(1e-12)     # [M, 1]
    scale = amax / FP8_MAX
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def rope_qkv_torch(qkv, cos, sin, qscale, positions, cache_k, cache_v, n_heads, n_kv):
    from ..model import rope

    B, L, _ = qkv.shape
    D = cos.shape[-1]
    qw, kw = n_heads * D, n_kv * D
    q = qkv[..., :qw].view(B, L, n_heads, D).transpose(1, 2)                        # [B, Hq, L, D]
    k = qkv[..., qw:qw + kw].view(B, L, n_kv, D).transpose(1, 2)                   # [B, Hkv, L, D]
    v = qkv[..., qw + kw:].view(B, L, n_kv, D).transpose(1, 2)
    q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
    q = q * qscale[:, None, :, None].to(q.dtype)
    slot = positions[:, None, :, None].expand(B, n_kv, L, D)
    cache_k.scatter_(2, slot, k)
    cache_v.scatter_(2, slot, v)
    return q.contiguous()


def quant_fp8_tensor_torch(x):
    scale = x.abs().amax().float().clamp_min(1e-12) / FP8_MAX                  # []
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def block_attention_torch(q, cache_k, cache_v, lengths, num_valid, causal, out_scale=None):
    B, Hq, L, D = q.shape
    Hkv, S = cache_k.shape[1], cache_k.shape[2]
    rep = Hq // Hkv
    keys = torch.arange(S, device=q.device)
    mask = keys[None, None, :] < (lengths + num_valid)[:, None, None]                 # [B, 1, S]
    if causal:
        positions = lengths[:, None] + torch.arange(L, device=q.device)                 # [B, L]
        mask = mask & (keys[None, None, :] <= positions[:, :, None])                    # [B, L, S]
    mask = mask.expand(B, L, S).repeat(1, rep, 1)[:, None]                               # [B, 1, rep*L, S]
    q = q.reshape(B, Hkv, rep * L, D)                                                    # GQA rows folded
    out = torch.nn.functional.scaled_dot_product_attention(q, cache_k, cache_v, attn_mask=mask)
    return _maybe_quant(out.reshape(B, Hq, L, D).transpose(1, 2).reshape(B, L, Hq * D), out_scale)


# ---- dispatch ------------------------------------------------------------------------------------------

def add_rmsnorm(x: torch.Tensor, res: torch.Tensor | None, weight: torch.Tensor, eps: float,
                out_scale: torch.Tensor | None = None):
    """x, res [..., N] -> (normed [..., N], x + res [..., N]) in x's dtype (res None: no add);
    normed in FP8 with `out_scale` [] when given."""
    if not _triton_ok(x):
        return add_rmsnorm_torch(x, res, weight, eps, out_scale)
    from .fused_triton import add_rmsnorm_triton
    return add_rmsnorm_triton(x, res, weight, eps, out_scale)


def silu_mul(gu: torch.Tensor, out_scale: torch.Tensor | None = None) -> torch.Tensor:
    """gu [..., 2I] (gate ++ up) -> silu(gate) * up [..., I] (FP8 with `out_scale` [] when given)."""
    if not _triton_ok(gu):
        return silu_mul_torch(gu, out_scale)
    from .fused_triton import silu_mul_triton
    return silu_mul_triton(gu, out_scale)


def quant_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> float8_e4m3fn with the calibrated per-tensor `scale` [] (x ~= q * scale)."""
    if not _triton_ok(x):
        return quant_static_torch(x, scale)
    from .fused_triton import quant_static_triton
    return quant_static_triton(x, scale)


def quant_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K] float8_e4m3fn, scale [M, 1] float32) with x ~= q * scale."""
    if not _triton_ok(x):
        return quant_fp8_torch(x)
    from .fused_triton import quant_fp8_triton
    return quant_fp8_triton(x)


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, qscale: torch.Tensor,
             positions: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, n_heads: int,
             n_kv: int) -> torch.Tensor:
    """qkv [B, L, (Hq + 2 Hkv) D], cos/sin [B, L, D], qscale [B, L] fp32, positions [B, L]; writes
    cache_k/v [B, Hkv, S, D] at the positions and returns the rotated, scaled q [B, Hq, L, D]."""
    if not _triton_ok(qkv):
        return rope_qkv_torch(qkv, cos, sin, qscale, positions, cache_k, cache_v, n_heads, n_kv)
    from .fused_triton import rope_qkv_triton
    return rope_qkv_triton(qkv, cos, sin, qscale, positions, cache_k, cache_v, n_heads, n_kv)


def quant_fp8_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K] float8_e4m3fn, scale [] float32) with x ~= q * scale."""
    if not _triton_ok(x):
        return quant_fp8_tensor_torch(x)
    from .fused_triton import quant_fp8_tensor_triton
    return quant_fp8_tensor_triton(x)


def block_attention(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, lengths: torch.Tensor,
                    num_valid: torch.Tensor, causal: bool, *, backend: str = "auto",
                    out_scale: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, L, D], cache_k/v [B, Hkv, S, D] (the block's K/V already written) -> [B, L, Hq*D]
    (FP8 with `out_scale` [] when given).
    backend: "sdpa" (torch's fused attention with a mask), "triton", or "auto" (Triton on CUDA)."""
    if backend == "sdpa" or (backend == "auto" and not _triton_ok(q)):
        return block_attention_torch(q, cache_k, cache_v, lengths, num_valid, causal, out_scale)
    from .fused_triton import block_attention_triton
    return block_attention_triton(q, cache_k, cache_v, lengths, num_valid, causal, out_scale)
