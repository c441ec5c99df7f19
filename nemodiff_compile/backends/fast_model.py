"""The denoiser step re-laid out for speed: the arithmetic of `model.NemotronLabsDiffusion.step`, with

  - fused projections: one [q + k + v] GEMM and one [gate + up] GEMM per layer (fewer, larger
    weight reads: at batch 1 a pass is a sweep over the weights, so GEMM count and size matter);
  - the block's K/V written straight into the static cache at positions lengths[b] + i, and the
    attention reading the cache in place (no [cache ; block] concatenation per layer). Bidirectional
    passes write there too: those slots are past the row's length, scratch until a causal pass
    overwrites them with the committed block, and the mask never shows stale slots;
  - fused residual-add + RMSNorm and SiLU * up (kernels/fused.py);
  - optionally FP8 E4M3 weights and dynamic FP8 activations through `torch._scaled_mm` on Hopper
    (per channel / per row, or per tensor); embedding, norms and the diffusion head stay in the
    model dtype.

Every shape is fixed by (batch, block length, cache length), and nothing reads device values on the
host, so a pass can be captured as a CUDA graph (backends/graphs.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model import rope
from ..model.model import NemotronLabsDiffusion
from ..kernels import fused as kernels
from ..kernels import gemv as gemv_kernel


FP8_MODES = ("row", "tensor", "static")


class Linear:
    """y = x @ W.T in the model dtype, or through FP8 E4M3 (`torch._scaled_mm` on Hopper):
      row     W scaled per output channel, x per row at run time (rowwise scaling, CUTLASS)
      tensor  one scale for W, one for x computed at run time (tensorwise, cuBLASLt)
      static  one scale for W, one for x calibrated beforehand (FastModel.calibrating); the kernel
              producing x can then emit FP8 directly (x arrives as float8_e4m3fn)
    """

    def __init__(self, weight: torch.Tensor, fp8: str | None, gemv: bool = False):
        """gemv: products of at most 64 rows on CUDA go through the split-K kernel (kernels/gemv.py), FP8
        scales applied in its epilogue; off by default until measured on a GPU (scripts/gpu_check.py)."""
        if fp8 not in (None, *FP8_MODES):
            raise ValueError(f"fp8 mode must be one of {FP8_MODES} or None, got {fp8!r}")
        self.fp8, self.gemv = fp8, gemv
        self.x_scale: torch.Tensor | None = None        # static: [] float32 once calibrated
        self.amax: torch.Tensor | None = None           # static: running |x| max while calibrating
        if fp8:
            w = weight.float()
            amax = w.abs().amax(1, keepdim=True) if fp8 == "row" else w.abs().amax()
            scale = amax.clamp_min(1e-12) / kernels.FP8_MAX                             # [N, 1] or []
            self.weight = (w / scale).clamp(-kernels.FP8_MAX, kernels.FP8_MAX).to(torch.float8_e4m3fn)
            self.scale = scale.t().contiguous() if fp8 == "row" else scale               # [1, N] or []
            self.out_dtype = weight.dtype
        else:
            self.weight = weight                                                       # [N, K]

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    @property
    def in_scale(self) -> torch.Tensor | None:
        """The static input scale a producer kernel should quantize with (None: give bf16)."""
        return self.x_scale if self.fp8 == "static" and self.amax is None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fp8:
            if self.gemv and gemv_kernel.usable(x):
                return gemv_kernel.gemv(x, self.weight)
            return F.linear(x, self.weight)
        lead, K = x.shape[:-1], x.shape[-1]
        x = x.reshape(-1, K)
        if self.fp8 == "static":
            if self.amax is not None:                    # calibrating: observe, multiply dequantized
                self.amax = torch.maximum(self.amax, x.abs().amax().float())
                y = F.linear(x, (self.weight.float() * self.scale).to(self.out_dtype))
                return y.view(*lead, -1)
            if self.x_scale is None:
                raise RuntimeError("static FP8 scales are not calibrated: run FastDenoiser.calibrate(prompts)")
            q = x if x.dtype == torch.float8_e4m3fn else kernels.quant_static(x, self.x_scale)
            sx = self.x_scale
        else:
            quant = kernels.quant_fp8 if self.fp8 == "row" else kernels.quant_fp8_tensor
            q, sx = quant(x)                                                           # [M, K]; [M, 1] or []
        if self.gemv and gemv_kernel.usable(q):       # scales [M, 1] x [1, N] in the kernel's epilogue
            M, N = q.shape[0], self.weight.shape[0]
            y = gemv_kernel.gemv(q, self.weight, sx.float().expand(M, 1), self.scale.float().expand(1, N),
                                 out_dtype=self.out_dtype)
        elif q.is_cuda:
            y = torch._scaled_mm(q, self.weight.t(), scale_a=sx, scale_b=self.scale, out_dtype=self.out_dtype)
        else:   # the same product on the CPU: dequantize, multiply in fp32
            w = self.weight.float() * (self.scale.t() if self.fp8 == "row" else self.scale)
            y = ((q.float() * sx) @ w.t()).to(self.out_dtype)
        return y.view(*lead, -1)


@dataclass
class Layer:
    attn_norm: torch.Tensor           # [H]
    qkv: Linear                       # [q_width + 2 kv_width, H]
    o: Linear                         # [H, q_width]
    mlp_norm: torch.Tensor            # [H]
    gate_up: Linear                   # [2 I, H]
    down: Linear                      # [H, I]
    lora_a: torch.Tensor | None       # [r, q_width]
    lora_b: torch.Tensor | None       # [H, r]
    lora_scale: float


class FastModel:
    """Weights of `model` in the fast layout (fused copies; unfused tensors are shared, not copied)."""

    def __init__(self, model: NemotronLabsDiffusion, *, fp8: bool | str | None = None,
                 attention: str = "auto", gemv: bool = False):
        """fp8: None (the model dtype), "row", "tensor" or "static" (see Linear); True means "row".
        attention: "auto" (Triton on CUDA, torch SDPA elsewhere), "triton" or "sdpa".
        gemv: the split-K small-M kernel for the decoder's projections (Linear; default off)."""
        fp8 = "row" if fp8 is True else (fp8 or None)
        self.attention, self.gemv = attention, gemv
        cfg = self.config = model.config
        self.dtype = model.dtype
        self.fp8 = fp8
        self.eps = cfg.rms_norm_eps
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        enc = model.encoder
        self.embed = enc.embed_tokens.weight                                            # [V, H]
        self.norm = enc.norm.weight
        self.head = model.diffusion_head.weight                                         # [V, H]
        self.inv_freq = model.inv_freq.to(self.head.device)
        self.rope_scale = model.rope_scale
        self.layers = []
        with torch.no_grad():
            for layer in enc.layers:
                a, m = layer.self_attn, layer.mlp
                self.layers.append(Layer(
                    attn_norm=layer.input_layernorm.weight,
                    qkv=Linear(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), fp8, gemv),
                    o=Linear(a.o_proj.weight, fp8, gemv),
                    mlp_norm=layer.post_attention_layernorm.weight,
                    gate_up=Linear(torch.cat([m.gate_proj.weight, m.up_proj.weight]), fp8, gemv),
                    down=Linear(m.down_proj.weight, fp8, gemv),
                    lora_a=a.lora_a, lora_b=a.lora_b, lora_scale=a.lora_scale))

    def linears(self) -> list[Linear]:
        return [lin for layer in self.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)]

    @contextmanager
    def calibrating(self):
        """Static FP8: inside, every projection records the |max| of its input (passes run in the
        model dtype on dequantized weights); on exit each input scale is amax / 448."""
        if self.fp8 != "static":
            raise ValueError("calibration is for the static FP8 mode")
        dev = self.head.device
        for lin in self.linears():
            lin.amax = torch.zeros((), dtype=torch.float32, device=dev)
        try:
            yield
        finally:
            for lin in self.linears():
                lin.x_scale = lin.amax.clamp_min(1e-12) / kernels.FP8_MAX
                lin.amax = None

    @property
    def weight_bytes(self) -> int:
        """Bytes one pass reads at least: every weight once (the embedding reads only B*L rows)."""
        per_layer = sum(lin.nbytes for layer in self.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down))
        small = sum(t.numel() * t.element_size() for t in (self.norm, self.head))
        return per_layer + small + sum(2 * layer.attn_norm.numel() * layer.attn_norm.element_size()
                                       for layer in self.layers)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, lengths: torch.Tensor, num_valid: torch.Tensor, *,
                causal: bool, cache_k: torch.Tensor, cache_v: torch.Tensor, lora: bool = False
                ) -> torch.Tensor:
        """ids [B, L] at positions lengths[b] + 0..L-1; writes the block's K/V into cache_k/v
        [layers, B, Hkv, S, D] at those positions; returns logits [B, L, V].

        Key j of row b is visible to query i iff j < lengths[b] + num_valid[b] and, when causal,
        j <= lengths[b] + i (cache_lengths + L <= S is the caller's to check, on the host).
        """
        B, L = ids.shape
        dev = ids.device
        positions = lengths[:, None] + torch.arange(L, device=dev)                      # [B, L]
        cos, sin = rope.cos_sin(positions, self.inv_freq, self.rope_scale, self.dtype)  # [B, L, D]
        qscale = rope.query_scale(self.config, positions)                              # [B, L] fp32

        h = F.embedding(ids, self.embed)                                               # [B, L, H]
        x, _ = kernels.add_rmsnorm(h, None, self.layers[0].attn_norm, self.eps, self.layers[0].qkv.in_scale)
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(x)                                                         # [B, L, qw + 2kw]
            q = kernels.rope_qkv(qkv, cos, sin, qscale, positions, cache_k[i], cache_v[i],
                                 self.n_heads, self.n_kv)                              # [B, Hq, L, D]
            use_lora = lora and layer.lora_a is not None      # the LoRA reads the attention output in bf16
            out = kernels.block_attention(q, cache_k[i], cache_v[i], lengths, num_valid, causal,
                                          backend=self.attention,
                                          out_scale=None if use_lora else layer.o.in_scale)   # [B, L, qw]
            a = layer.o(out)
            if use_lora:
                a = a + (out @ layer.lora_a.t() @ layer.lora_b.t()) * layer.lora_scale
            x, h = kernels.add_rmsnorm(h, a, layer.mlp_norm, self.eps, layer.gate_up.in_scale)
            m = layer.down(kernels.silu_mul(layer.gate_up(x), layer.down.in_scale))
            if i + 1 < len(self.layers):
                nxt, scale = self.layers[i + 1].attn_norm, self.layers[i + 1].qkv.in_scale
            else:
                nxt, scale = self.norm, None
            x, h = kernels.add_rmsnorm(h, m, nxt, self.eps, scale)
        return F.linear(x, self.head)                                                  # [B, L, V]
