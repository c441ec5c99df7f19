"""PyTorch reference of Nemotron-Labs-Diffusion: a Ministral-3 decoder (`encoder.*`) plus an untied
`diffusion_head`. Parameter names equal the checkpoint's, so a state dict loads without renaming.

One forward serves every decoding phase through its attention pattern:
  causal         key j visible to query i iff j <= (cache length) + i    (prefill, AR, commit, verify)
  bidirectional  every cached key and every key of the block is visible  (refinement, draft)
With a `StaticKVCache`, the block's positions continue from each row's cache length; causal passes
may write the block's K/V into the cache, bidirectional passes only read it.
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from . import rope
from .cache import StaticKVCache


class Pattern(str, Enum):
    CAUSAL = "causal"
    BIDIRECTIONAL = "bidirectional"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # variance in fp32, cast back, then scale (transformers Ministral3RMSNorm order); divided by the root
        # rather than times rsqrt: ONNX Runtime fuses this form into one SimplifiedLayerNormalization node
        h = x.float()
        h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    # explicit: MatMul, Add, Softmax, MatMul in place of scaled_dot_product_attention. Export twins set it
    # (`explicit_attention`): SDPA's ONNX translation copies and rescales the keys and guards the softmax
    # against all-masked rows in every layer (with RMSNorm's former rsqrt form, 16-22% of a two-thread
    # pass on ONNX Runtime's CPU provider at batch 1-8: scripts/compare_passes.py); eager torch keeps
    # SDPA's fused kernel.
    explicit = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.q_width, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_width, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_width, bias=False)
        self.o_proj = nn.Linear(cfg.q_width, cfg.hidden_size, bias=False)
        # Optional draft LoRA on o_proj (linear self-speculation); not part of the state dict.
        self.lora_a: torch.Tensor | None = None      # [r, q_width]
        self.lora_b: torch.Tensor | None = None      # [hidden, r]
        self.lora_scale = 0.0

    def forward(self, x, cos, sin, qscale, bias, past_k, past_v, lora):
        """x [B, L, H]; past_k/v [B, Hkv, S, D] or None -> (y [B, L, H], k, v [B, Hkv, L, D] post-RoPE).

        bias: `attention_bias` [B, 1, rep*L, S+L] in x's dtype, or None. lora: use the draft LoRA; a bool, or a 0-d
        bool tensor (exported graphs switch it per pass)."""
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)   # [B, Hq, L, D]
        k = self.k_proj(x).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)      # [B, Hkv, L, D]
        v = self.v_proj(x).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
        q = q * (qscale[:, None, :, None] * self.head_dim ** -0.5).to(q.dtype)       # Llama-4 and softmax scales
        keys, values = k, v
        if past_k is not None:
            keys = torch.cat([past_k.to(q.dtype), k], dim=2)                          # [B, Hkv, S+L, D]
            values = torch.cat([past_v.to(q.dtype), v], dim=2)
        # GQA without copying K/V: the rep query heads sharing a KV head become rep*L query rows
        # (q head h reads KV head h // rep, as repeat_interleave would give it).
        rep = self.n_heads // self.n_kv
        q = q.reshape(B, self.n_kv, rep * L, self.head_dim)                          # [B, Hkv, rep*L, D]
        if self.explicit:
            scores = torch.matmul(q, keys.transpose(-1, -2))                          # [B, Hkv, rep*L, S+L]
            if bias is not None:
                scores = scores + bias
            out = torch.matmul(torch.softmax(scores, dim=-1), values)                 # [B, Hkv, rep*L, D]
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=1.0)
        out = out.reshape(B, self.n_heads, L, self.head_dim)                         # [B, Hq, L, D]
        out = out.transpose(1, 2).reshape(B, L, -1)                                  # [B, L, Hq*D]
        y = self.o_proj(out)
        if self.lora_a is not None and lora is not False:
            delta = (out @ self.lora_a.t() @ self.lora_b.t()) * self.lora_scale
            y = y + (delta if lora is True else delta * lora.to(delta.dtype))
        return y, k, v


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)). cfg: a ModelConfig or VisionConfig (hidden_size, intermediate_size);
    act: SiLU in the decoder, the vision tower's hidden_act there."""

    def __init__(self, cfg, act=F.silu):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h, cos, sin, qscale, bias, past_k, past_v, lora):
        a, k, v = self.self_attn(self.input_layernorm(h), cos, sin, qscale, bias, past_k, past_v, lora)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h)), k, v


class Encoder(nn.Module):
    """The Ministral-3 trunk; stored under `encoder.*` in the checkpoint."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class NemotronLabsDiffusion(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.diffusion_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # fp32 on the CPU whatever the model's dtype/device (a buffer would follow .to(bfloat16))
        self.inv_freq = rope.inv_freq(cfg)
        self.rope_scale = rope.attention_factor(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.diffusion_head.weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor,                     # [B, L] int64
        *,
        cache: StaticKVCache | None = None,
        pattern: Pattern | str = Pattern.CAUSAL,
        write_cache: bool | None = None,             # default: True for causal passes with a cache
        num_valid: torch.Tensor | None = None,       # [B] real tokens per row (right padding); default L
        draft_lora: bool = False,
        positions: torch.Tensor | None = None,       # [B, L] override (training layouts; no cache)
        attn_mask: torch.Tensor | None = None,       # [B or 1, L, L] bool override (training; no cache)
        embed_mask: torch.Tensor | None = None,      # [B, L] bool: positions that take `embeds` (image pads)
        embeds: torch.Tensor | None = None,          # [B, L, H] input embeddings there (image features)
        spans: torch.Tensor | None = None,           # [B, L] int64: >0 = image span id; a causal pass then lets
                                                     # a span's positions see each other (image_prefill=bidirectional)
    ) -> torch.Tensor:                               # logits [B, L, V] in the model dtype
        pattern = Pattern(pattern)
        B, L = input_ids.shape
        dev = input_ids.device
        ar = torch.arange(L, device=dev)
        write = cache is not None and (pattern is Pattern.CAUSAL if write_cache is None else write_cache)
        if write and pattern is Pattern.BIDIRECTIONAL:
            raise ValueError("the KV cache only holds causal K/V: bidirectional passes cannot write it")
        if num_valid is None:
            num_valid = torch.full((B,), L, dtype=torch.long, device=dev)

        if cache is not None:
            if positions is not None or attn_mask is not None:
                raise ValueError("positions/attn_mask overrides are for cache-free calls")
            if cache.batch != B:
                raise ValueError(f"cache batch {cache.batch} != input batch {B}")
            cache.check_room(L)
            positions = cache.lengths[:, None] + ar                                  # [B, L]
            mask = block_mask(pattern is Pattern.CAUSAL, cache.lengths, cache.max_len, L, num_valid)
        else:
            if positions is None:
                positions = ar.expand(B, L)
            if attn_mask is not None:
                mask = attn_mask[:, None]
            else:
                mask = block_mask(pattern is Pattern.CAUSAL, None, 0, L, num_valid)

        if spans is not None:
            same = (spans[:, :, None] == spans[:, None, :]) & (spans[:, :, None] > 0)   # [B, L, L]
            mask = mask.clone()
            mask[:, 0, :, -L:] |= same
        logits, k_new, v_new = self.step(input_ids, positions, mask,
                                         None if cache is None else cache.k,
                                         None if cache is None else cache.v, draft_lora, embed_mask, embeds)
        if write:
            for i in range(self.config.num_hidden_layers):
                cache.write(i, k_new[i], v_new[i])
            cache.advance(num_valid)
        return logits

    def step(self, input_ids, positions, mask, past_k=None, past_v=None, draft_lora=False,
             embed_mask=None, embeds=None):
        """The pure function every backend compiles.

        input_ids [B, L], positions [B, L], mask [B, 1, L, S+L] bool over [cache ; block] keys,
        past_k/v [layers, B, Hkv, S, D] or None -> logits [B, L, V], k_new/v_new [layers, B, Hkv, L, D].
        embed_mask [B, L] bool / embeds [B, L, H]: input embeddings that replace the token embedding where
        the mask is set (a VLM prefill's image features).
        """
        h = self.encoder.embed_tokens(input_ids)                                      # [B, L, H]
        if embed_mask is not None:
            h = torch.where(embed_mask[..., None], embeds.to(h.dtype), h)
        cos, sin = rope.cos_sin(positions, self.inv_freq.to(h.device), self.rope_scale, h.dtype)
        qscale = rope.query_scale(self.config, positions)
        bias = attention_bias(mask, self.config.num_attention_heads // self.config.num_key_value_heads, h.dtype)
        ks, vs = [], []
        for i, layer in enumerate(self.encoder.layers):
            h, k, v = layer(h, cos, sin, qscale, bias,
                            None if past_k is None else past_k[i],
                            None if past_v is None else past_v[i], draft_lora)
            ks.append(k)
            vs.append(v)
        return self.diffusion_head(self.encoder.norm(h)), torch.stack(ks), torch.stack(vs)

    # ---- draft LoRA ------------------------------------------------------------------------------

    def set_draft_lora(self, a: list[torch.Tensor], b: list[torch.Tensor], scale: float) -> None:
        """Attach per-layer o_proj LoRA factors A [r, q_width], B [hidden, r]; used when draft_lora=True."""
        for layer, la, lb in zip(self.encoder.layers, a, b, strict=True):
            attn = layer.self_attn
            dev = attn.o_proj.weight.device
            attn.lora_a, attn.lora_b, attn.lora_scale = la.to(dev, self.dtype), lb.to(dev, self.dtype), scale

    @property
    def has_draft_lora(self) -> bool:
        return self.encoder.layers[0].self_attn.lora_a is not None

    @torch.no_grad()
    def merge_draft_lora(self) -> None:
        """Fold the LoRA into o_proj for good (every pass then uses it; linear-spec is no longer lossless)."""
        for layer in self.encoder.layers:
            attn = layer.self_attn
            if attn.lora_a is not None:
                attn.o_proj.weight += (attn.lora_b.float() @ attn.lora_a.float() * attn.lora_scale).to(self.dtype)
                attn.lora_a = attn.lora_b = None


def explicit_attention(model: nn.Module) -> nn.Module:
    """Set every decoder attention of `model` to the explicit form (`Attention.explicit`); returns model."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.explicit = True
    return model


def attention_bias(mask: torch.Tensor | None, rep: int, dtype: torch.dtype) -> torch.Tensor | None:
    """mask [B, 1, L, S+L] bool (True = may attend) -> the additive bias [B, 1, rep*L, S+L] of every layer's
    scores: 0, or the dtype's lowest finite value (weight 0 after the softmax; every query row sees at least
    the block's first position, so no row is all masked), tiled for the rep query heads that share a KV head
    and attend as rep*L rows (`Attention`). Built once per pass, not converted from the mask in every layer."""
    if mask is None:
        return None
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    low = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=mask.device)
    return torch.where(mask, zero, low).repeat(1, 1, rep, 1)


def block_mask(causal: bool | torch.Tensor, lengths: torch.Tensor | None, max_len: int, L: int,
               num_valid: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask [B, 1, L, max_len + L] (True = may attend) over [cache ; block] keys.

    Cache key j of row b is visible iff j < lengths[b]; block key j iff j < num_valid[b] and, when
    causal, j <= i. causal: a bool, or a bool tensor, 0-d or [B] (a flag per row), so one exported graph
    serves both patterns and one pass may mix them.
    """
    dev = num_valid.device
    ar = torch.arange(L, device=dev)
    block = ar[None, :] < num_valid[:, None]                                     # [B, L] valid block keys
    block = block[:, None, :].expand(-1, L, L)                                    # [B, L(q), L(k)]
    tril = ar[None, :] <= ar[:, None]                                             # [L, L]
    row_causal = torch.as_tensor(causal, device=dev).reshape(-1, 1, 1)          # [1 or B, 1, 1]
    block = block & (tril | ~row_causal)
    if lengths is None:
        return block[:, None]
    cached = torch.arange(max_len, device=dev)[None, :] < lengths[:, None]       # [B, S]
    cached = cached[:, None, :].expand(-1, L, max_len)                            # [B, L, S]
    return torch.cat([cached, block], dim=-1)[:, None]
