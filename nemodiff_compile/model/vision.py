"""The vision half of Nemotron-Labs-Diffusion-VLM: a Pixtral-style vision tower and a Mistral3-style
projector, under the checkpoint's names `encoder.vision_tower.*` and `encoder.multi_modal_projector.*`.

  pixels [3, H, W] (H, W multiples of patch_size * spatial_merge_size after preprocessing; any size works:
  a partial patch at the bottom/right is dropped, as Pixtral does)
    patch_conv (patch x patch, stride patch, no bias) -> [h*w, D] (h = H // patch, w = W // patch), ln_pre
    layers: x += attn(attention_norm(x)) with 2-D RoPE (rows on half the frequencies, columns on the
            other half), full attention over the image's patches; x += SwiGLU(ffn_norm(x))
  projector: RMSNorm -> 2x2 patch merger (concat each 2x2 patch window's features, channel-major, one
             linear to D) -> linear_1 -> GELU -> linear_2 -> [(h//2)*(w//2), text hidden]
Each image runs alone (Pixtral's block-diagonal mask over a packed batch gives the same features).
The image features replace the prompt's image pad tokens (image_prompt.py); `NemotronLabsDiffusionVLM`
is the text model plus these two modules and `image_features`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .model import MLP, NemotronLabsDiffusion, RMSNorm
from .vision_config import VisionConfig

_ACTS = {"silu": F.silu, "gelu": F.gelu}
_VISION_EPS = 1e-5        # Pixtral's ln_pre / attention_norm / ffn_norm eps (fixed in the released code)


def rope_2d(cfg: VisionConfig, h: int, w: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [h*w, head_dim] for the patch grid (row-major): angle = row * f[0::2] on the first quarter,
    col * f[1::2] on the second, the half repeated (rotate-half convention)."""
    d = cfg.head_dim
    f = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))   # [d/2]
    rows = torch.arange(h, device=device, dtype=torch.float32)[:, None, None] * f[0::2]            # [h, 1, d/4]
    cols = torch.arange(w, device=device, dtype=torch.float32)[None, :, None] * f[1::2]            # [1, w, d/4]
    # broadcast by addition, not expand/repeat: the exported graph keeps h and w dynamic that way
    ang = torch.cat([rows + 0 * cols, cols + 0 * rows], dim=-1).reshape(-1, d // 2)                # [h*w, d/2]
    ang = torch.cat([ang, ang], dim=-1)                                                           # [h*w, d]
    return ang.cos(), ang.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        inner = cfg.num_attention_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, inner, bias=False)
        self.o_proj = nn.Linear(inner, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [N, D] (one image's patches) -> [N, D]."""
        N = x.shape[0]
        q, k, v = (p(x).view(N, self.heads, self.head_dim).transpose(0, 1) for p in (self.q_proj, self.k_proj,
                                                                                   self.v_proj))  # [Hh, N, d]
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out = F.scaled_dot_product_attention(q[None], k[None], v[None])[0]                         # [Hh, N, d]
        return self.o_proj(out.transpose(0, 1).reshape(N, -1))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, _VISION_EPS)
        self.attention = VisionAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, _VISION_EPS)
        self.feed_forward = MLP(cfg, _ACTS[cfg.hidden_act])

    def forward(self, x, cos, sin):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))


class VisionTower(nn.Module):
    """Stored as `encoder.vision_tower.*`: patch_conv, ln_pre, transformer.layers.N.*"""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_conv = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.ln_pre = RMSNorm(cfg.hidden_size, _VISION_EPS)
        self.transformer = VisionTransformer(cfg)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """pixels [3, H, W] -> (features [h*w, D] row-major over the patch grid, h, w)."""
        x = self.patch_conv(pixels[None].to(self.patch_conv.weight.dtype))[0]     # [D, h, w]
        _, h, w = x.shape
        x = self.ln_pre(x.flatten(1).t())                                          # [h*w, D]
        cos, sin = rope_2d(self.cfg, h, w, x.device)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for layer in self.transformer.layers:
            x = layer(x, cos, sin)
        return x, h, w


class PatchMerger(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.s = cfg.spatial_merge_size
        self.merging_layer = nn.Linear(cfg.hidden_size * self.s ** 2, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """x [h*w, D] -> [(h//s)*(w//s), D]: each s x s window's features, channel-major then window
        row-major (torch's unfold order), through one linear. A trailing odd row/column is dropped."""
        s, D = self.s, x.shape[-1]
        hs, ws = h // s, w // s
        g = x.view(h, w, D)[: hs * s, : ws * s]                                   # [hs*s, ws*s, D]
        g = g.view(hs, s, ws, s, D).permute(0, 2, 4, 1, 3)                         # [hs, ws, D, s, s]
        return self.merging_layer(g.reshape(hs * ws, D * s * s))


class MultiModalProjector(nn.Module):
    """Stored as `encoder.multi_modal_projector.*`: norm, patch_merger.merging_layer, linear_1, linear_2."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.patch_merger = PatchMerger(cfg)
        self.linear_1 = nn.Linear(cfg.hidden_size, cfg.text_hidden_size, bias=cfg.projector_bias)
        self.linear_2 = nn.Linear(cfg.text_hidden_size, cfg.text_hidden_size, bias=cfg.projector_bias)
        self.act = _ACTS[cfg.projector_hidden_act]

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.patch_merger(self.norm(x), h, w))))


class VisionEncoder(nn.Module):
    """Tower + projector as one module (what the exported vision graph computes)."""

    def __init__(self, tower: VisionTower, projector: MultiModalProjector):
        super().__init__()
        self.tower, self.projector = tower, projector

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [3, H, W] -> image features [(H//28)*(W//28), text hidden] (28 = patch * merge)."""
        x, h, w = self.tower(pixels)
        return self.projector(x, h, w)


class NemotronLabsDiffusionVLM(NemotronLabsDiffusion):
    """The text model plus `encoder.vision_tower` and `encoder.multi_modal_projector`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.vision_config = VisionConfig.of(cfg)
        self.encoder.vision_tower = VisionTower(self.vision_config)
        self.encoder.multi_modal_projector = MultiModalProjector(self.vision_config)

    @property
    def vision_encoder(self) -> VisionEncoder:
        return VisionEncoder(self.encoder.vision_tower, self.encoder.multi_modal_projector)

    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [3, H, W] (preprocessed) -> [(H//28)*(W//28), hidden] in the model dtype."""
        return self.vision_encoder(pixels.to(self.diffusion_head.weight.device))
