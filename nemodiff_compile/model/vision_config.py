"""The vision half of a Nemotron-Labs-Diffusion-VLM config.json, read from `ModelConfig.extra`. Stdlib only.

The VLM's config.json is the text model's flat config plus (../shared/research/nld_vlm.md; the field names
are transformers' Mistral3 / Pixtral ones, which the public sources use):
  vision_config               model_type "pixtral": hidden_size, intermediate_size, num_hidden_layers,
                              num_attention_heads, head_dim, patch_size, num_channels, image_size,
                              rope_theta (or rope_parameters.rope_theta), hidden_act
  spatial_merge_size          2 (the projector's 2x2 patch merger)
  projector_hidden_act        "gelu"; multimodal_projector_bias false; vision_feature_layer -1
  image_token_id / image_*_token_id   optional: the tokenizer's own ids win where the config has none
Missing optional fields take the defaults above (Pixtral-12B / Mistral3's); a missing vision_config or a
wrong type is a ConfigError naming config.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import ModelConfig
from ..errors import ConfigError

# The tokens the chat template and the expansion use (research note: <|image_start|> once per image,
# expanded to start, rows of pad separated by break, end). Their ids come from the tokenizer/config.
IMAGE_TOKENS = {"start": "<|image_start|>", "pad": "<|image_pad|>", "break": "<|image_break|>",
                "end": "<|image_end|>"}
# config.json keys that may name the ids instead (Mistral3 writes image_token_id for the pad token)
_ID_KEYS = {"start": "image_start_token_id", "pad": "image_token_id", "break": "image_break_token_id",
            "end": "image_end_token_id"}


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    patch_size: int
    image_size: int                   # the longest side an image is downscaled to (max_image_size)
    num_channels: int = 3
    rope_theta: float = 10000.0
    hidden_act: str = "silu"          # the vision MLP's activation (Pixtral-12B: silu)
    spatial_merge_size: int = 2
    projector_hidden_act: str = "gelu"
    projector_bias: bool = False
    feature_layer: int = -1
    text_hidden_size: int = 0
    rms_norm_eps: float = 1e-5        # the projector's RMSNorm (the text config's eps, as in Mistral3)

    @property
    def merge_patch(self) -> int:
        """Pixels per side of one image token: patch_size * spatial_merge_size (28 at 8B)."""
        return self.patch_size * self.spatial_merge_size

    @classmethod
    def of(cls, cfg: ModelConfig, source: str = "config.json") -> "VisionConfig":
        raw = cfg.extra.get("vision_config")
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: a vision-language config needs a \"vision_config\" object")
        vc = dict(raw)
        theta = vc.get("rope_theta", (vc.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        heads = vc.get("num_attention_heads", 16)
        hidden = vc.get("hidden_size", 1024)
        try:
            out = cls(
                hidden_size=int(hidden), intermediate_size=int(vc.get("intermediate_size", 4096)),
                num_hidden_layers=int(vc.get("num_hidden_layers", 24)), num_attention_heads=int(heads),
                head_dim=int(vc.get("head_dim") or hidden // heads), patch_size=int(vc.get("patch_size", 14)),
                image_size=int(cfg.extra.get("max_image_size") or vc.get("image_size", 1540)),
                num_channels=int(vc.get("num_channels", 3)), rope_theta=float(theta),
                hidden_act=str(vc.get("hidden_act", "silu")),
                spatial_merge_size=int(cfg.extra.get("spatial_merge_size", 2)),
                projector_hidden_act=str(cfg.extra.get("projector_hidden_act", "gelu")),
                projector_bias=bool(cfg.extra.get("multimodal_projector_bias", False)),
                feature_layer=int(cfg.extra.get("vision_feature_layer", -1)),
                text_hidden_size=cfg.hidden_size, rms_norm_eps=cfg.rms_norm_eps)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: vision_config: {e}") from None
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "patch_size", "image_size", "spatial_merge_size"):
            if getattr(out, name) <= 0:
                raise ConfigError(f"{source}: vision_config.{name} must be positive, got {getattr(out, name)}")
        if out.head_dim % 4:
            raise ConfigError(f"{source}: vision_config.head_dim must be a multiple of 4 (2-D RoPE), "
                              f"got {out.head_dim}")
        if out.feature_layer != -1:
            raise ConfigError(f"{source}: vision_feature_layer {out.feature_layer} is not supported (only -1)")
        for act, name in ((out.hidden_act, "vision_config.hidden_act"),
                          (out.projector_hidden_act, "projector_hidden_act")):
            if act not in ("silu", "gelu"):
                raise ConfigError(f"{source}: {name} must be 'silu' or 'gelu', got {act!r}")
        return out


@dataclass(frozen=True)
class ImageTokenIds:
    start: int
    pad: int
    brk: int
    end: int

    @classmethod
    def of(cls, cfg: ModelConfig, tokenizer: Any = None) -> "ImageTokenIds":
        """The ids from config.json where it names them, else from the tokenizer's vocabulary; never
        constants. A token found in neither is a ConfigError naming it."""
        ids = {}
        for role, token in IMAGE_TOKENS.items():
            v = cfg.extra.get(_ID_KEYS[role])
            if v is None and tokenizer is not None:
                v = tokenizer.convert_tokens_to_ids(token)
                if v is None or v == getattr(tokenizer, "unk_token_id", None):
                    v = None
            if not isinstance(v, int) or not 0 <= v < cfg.vocab_size:
                raise ConfigError(f"config.json / tokenizer: no id for the image token {token} "
                                  f"(config key {_ID_KEYS[role]} or the tokenizer's vocabulary)")
            ids[role] = v
        return cls(ids["start"], ids["pad"], ids["break"], ids["end"])
