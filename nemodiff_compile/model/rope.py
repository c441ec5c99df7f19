"""YaRN rotary embedding and the Llama-4 query scale, as transformers 5.x computes them for Ministral 3.

Kept as plain functions of the config so the exporter and every backend compute the same tables.
"""

from __future__ import annotations

import math

import torch

from ..config import ModelConfig


def inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies (transformers `_compute_yarn_parameters`)."""
    r, dim = cfg.rope, cfg.head_dim
    pos_freqs = r.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    extrapolation = 1.0 / pos_freqs
    if r.rope_type == "default":
        return extrapolation
    interpolation = 1.0 / (r.factor * pos_freqs)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(r.original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (
            2 * math.log(r.rope_theta))

    truncate = r.extra.get("truncate", True)
    low, high = correction_dim(r.beta_fast or 32), correction_dim(r.beta_slow or 1)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    return interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight


def attention_factor(cfg: ModelConfig) -> float:
    """YaRN cos/sin multiplier; 1.0 for the published configs (mscale == mscale_all_dim)."""
    r = cfg.rope
    if r.rope_type == "default":
        return 1.0
    if "attention_factor" in r.extra and r.extra["attention_factor"] is not None:
        return float(r.extra["attention_factor"])

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if r.mscale and r.mscale_all_dim:
        return float(get_mscale(r.factor, r.mscale) / get_mscale(r.factor, r.mscale_all_dim))
    return get_mscale(r.factor)


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float, dtype: torch.dtype):
    """positions [B, L] int64 -> cos, sin [B, L, head_dim] in `dtype` (rotate-half layout)."""
    freqs = positions[..., None].float() * inv_freq.float()           # [B, L, D/2] fp32
    emb = torch.cat((freqs, freqs), dim=-1)                             # [B, L, D]
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, L, D]; cos/sin [B, L, D]."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


def query_scale(cfg: ModelConfig, positions: torch.Tensor) -> torch.Tensor:
    """Llama-4 query scale [B, L] fp32: 1 + beta * ln(1 + floor(pos / original_max)); 1.0 early on."""
    r = cfg.rope
    return 1 + r.llama_4_scaling_beta * torch.log(
        1 + torch.floor(positions.float() / r.original_max_position_embeddings))
