"""Model config mirroring the checkpoint's `config.json`, and the named presets. Stdlib only.

`ModelConfig.from_hf(dict)` reads a Nemotron-Labs-Diffusion `config.json` (model_type
"nemotron_labs_diffusion"), checks it, and keeps every field it does not use in `extra` so that
`to_hf()` writes the same file back. The presets carry the published geometry of the 3B/8B/14B
checkpoints (sources in `PRESET_SOURCES`) and a `tiny` model for tests and the demo.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

MODEL_TYPE = "nemotron_labs_diffusion"
# The vision-language checkpoint: the same text fields at the top level plus a `vision_config` (and the
# projector / image-token fields), all kept in `extra` (model/vision_config.py reads them).
VLM_MODEL_TYPE = "nemotron_labs_diffusion_vlm"

# The fields `ModelConfig` reads; anything else in config.json goes to `extra` untouched.
_REQUIRED = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "mask_token_id", "eos_token_id",
)
_ROPE_KEYS = (
    "rope_type", "rope_theta", "factor", "original_max_position_embeddings",
    "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "llama_4_scaling_beta",
)


@dataclass(frozen=True)
class RopeParameters:
    """`config.json["rope_parameters"]`: YaRN RoPE plus the Llama-4 position-dependent query scale."""

    rope_theta: float = 1e6
    rope_type: str = "yarn"                    # "yarn" or "default"
    factor: float = 16.0
    original_max_position_embeddings: int = 16384
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    llama_4_scaling_beta: float = 0.1          # q *= 1 + beta * ln(1 + floor(pos / original_max))
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_hf(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in _ROPE_KEYS}
        out.update(self.extra)
        return out


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    mask_token_id: int
    eos_token_id: int | tuple[int, ...]
    bos_token_id: int | None = 1
    pad_token_id: int | None = None
    block_size: int = 32
    max_position_embeddings: int = 262144
    rms_norm_eps: float = 1e-5
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    dtype: str = "bfloat16"
    rope: RopeParameters = field(default_factory=RopeParameters)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    # ---- derived sizes ------------------------------------------------------------------------

    @property
    def q_width(self) -> int:
        """Width of q_proj / o_proj: heads * head_dim (4096 at every published size)."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def is_vlm(self) -> bool:
        """A vision-language checkpoint (vision tower + projector beside the decoder)."""
        return self.extra.get("model_type") == VLM_MODEL_TYPE

    @property
    def eos_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        return (e,) if isinstance(e, int) else tuple(e)

    def num_parameters(self) -> int:
        """Parameter count of the checkpoint (embedding and untied head both counted)."""
        h, L = self.hidden_size, self.num_hidden_layers
        attn = h * self.q_width * 2 + h * self.kv_width * 2          # q, o and k, v projections
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h                                  # + two RMSNorm weights
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + L * per_layer + h + head

    def kv_cache_bytes(self, batch: int, max_len: int, bytes_per_elem: int = 2) -> int:
        return 2 * self.num_hidden_layers * batch * max_len * self.kv_width * bytes_per_elem

    # ---- config.json ---------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build from a parsed config.json; `source` names the file in error messages."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        raw = copy.deepcopy(raw)
        model_type = raw.pop("model_type", MODEL_TYPE)
        if model_type not in (MODEL_TYPE, VLM_MODEL_TYPE):
            raise ConfigError(f"{source}: model_type is {model_type!r}, expected {MODEL_TYPE!r}")
        if model_type == VLM_MODEL_TYPE:
            raw["model_type"] = model_type          # kept in `extra`: to_hf writes it back, is_vlm reads it
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise ConfigError(f"{source}: missing required field(s) {', '.join(missing)}")

        rope_raw = raw.pop("rope_parameters", None)
        if rope_raw is None:  # older layout: rope_theta at top level, scaling under rope_scaling
            rope_raw = dict(raw.pop("rope_scaling", None) or {})
            if "rope_theta" in raw:
                rope_raw["rope_theta"] = raw.pop("rope_theta")
            rope_raw.setdefault("rope_type", rope_raw.pop("type", "default"))
        if not isinstance(rope_raw, dict):
            raise ConfigError(f"{source}: rope_parameters must be an object")
        rope_raw = dict(rope_raw)
        rope_kwargs = {k: rope_raw.pop(k) for k in _ROPE_KEYS if k in rope_raw}
        if rope_kwargs.get("rope_type", "yarn") == "default":
            rope_kwargs.setdefault("factor", 1.0)
            rope_kwargs.setdefault("llama_4_scaling_beta", 0.0)
        rope = RopeParameters(**rope_kwargs, extra=rope_raw)

        dtype = raw.pop("dtype", None) or raw.pop("torch_dtype", None) or "bfloat16"
        raw.pop("torch_dtype", None)
        known = {f.name for f in dataclasses.fields(cls)} - {"rope", "extra", "dtype"}
        kwargs = {k: raw.pop(k) for k in list(raw) if k in known}
        if "head_dim" not in kwargs or kwargs["head_dim"] is None:
            kwargs["head_dim"] = kwargs["hidden_size"] // kwargs["num_attention_heads"]
        if isinstance(kwargs["eos_token_id"], list):
            kwargs["eos_token_id"] = tuple(kwargs["eos_token_id"])
        try:
            cfg = cls(**kwargs, dtype=dtype, rope=rope, extra=raw)
        except TypeError as e:  # pragma: no cover - dataclass signature errors
            raise ConfigError(f"{source}: {e}") from None
        cfg.validate(source)
        return cfg

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict (the `extra` fields, auto_map and friends, written back as they came)."""
        out: dict[str, Any] = {"model_type": MODEL_TYPE}
        for f in dataclasses.fields(self):
            if f.name in ("rope", "extra"):
                continue
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        out["rope_parameters"] = self.rope.to_hf()
        out.update(self.extra)
        return out

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf(raw, source=str(path))

    def validate(self, source: str = "config") -> None:
        def need(cond: bool, what: str) -> None:
            if not cond:
                raise ConfigError(f"{source}: {what}")

        ints = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "block_size",
                "max_position_embeddings", "mask_token_id")
        for name in ints:
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                 f"{name} must be a non-negative integer, got {v!r}")
            if name != "mask_token_id":
                need(v > 0, f"{name} must be positive, got {v}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
             f"num_key_value_heads ({self.num_key_value_heads})")
        need(self.head_dim % 2 == 0, f"head_dim must be even for RoPE, got {self.head_dim}")
        need(self.mask_token_id < self.vocab_size,
             f"mask_token_id {self.mask_token_id} is outside the vocabulary ({self.vocab_size})")
        need(len(self.eos_ids) > 0 and all(isinstance(e, int) and 0 <= e < self.vocab_size
                                          for e in self.eos_ids),
             f"eos_token_id {self.eos_token_id!r} must be token id(s) below vocab_size {self.vocab_size}")
        need(self.mask_token_id not in self.eos_ids, "mask_token_id must differ from eos_token_id")
        need(self.hidden_act == "silu", f"hidden_act must be 'silu', got {self.hidden_act!r}")
        need(self.rms_norm_eps > 0, f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        need(self.dtype in ("bfloat16", "float16", "float32"),
             f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")
        r = self.rope
        need(r.rope_type in ("yarn", "default"),
             f"rope_parameters.rope_type must be 'yarn' or 'default', got {r.rope_type!r}")
        need(r.rope_theta > 0, f"rope_parameters.rope_theta must be positive, got {r.rope_theta}")
        need(r.original_max_position_embeddings > 0,
             "rope_parameters.original_max_position_embeddings must be positive")
        # factor < 1 is legal: the 3B-Base checkpoint ships yarn with factor 0.25
        need(r.factor > 0, f"rope_parameters.factor must be positive, got {r.factor}")
        need(math.isfinite(r.llama_4_scaling_beta), "rope_parameters.llama_4_scaling_beta must be finite")

    def replace(self, **changes: Any) -> "ModelConfig":
        cfg = dataclasses.replace(self, **changes)
        cfg.validate("config")
        return cfg


# ---- presets ------------------------------------------------------------------------------------

# Fields shared by every published size (confirmed against the public config.json copies listed
# in PRESET_SOURCES; see ../shared/research/nemotron_labs_diffusion.md §2.2).
_PUBLISHED = dict(
    vocab_size=131072, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    mask_token_id=100, eos_token_id=11, bos_token_id=1, pad_token_id=None, block_size=32,
    max_position_embeddings=262144, rms_norm_eps=1e-5, hidden_act="silu",
    tie_word_embeddings=False, dtype="bfloat16",
)
_EXTRA = {
    "architectures": ["NemotronLabsDiffusionModel"],
    "auto_map": {
        "AutoConfig": "configuration_nemotron_labs_diffusion.NemotronLabsDiffusionConfig",
        "AutoModel": "modeling_nemotron_labs_diffusion.NemotronLabsDiffusionModel",
    },
    "dlm_paradigm": "bidirectional",
    "attention_bias": False,
    "mlp_bias": False,
}

PRESETS: dict[str, ModelConfig] = {
    "3b": ModelConfig(hidden_size=3072, intermediate_size=9216, num_hidden_layers=26,
                      rope=RopeParameters(rope_theta=1e6), extra=dict(_EXTRA), **_PUBLISHED),
    "8b": ModelConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=34,
                      rope=RopeParameters(rope_theta=1e6), extra=dict(_EXTRA), **_PUBLISHED),
    "14b": ModelConfig(hidden_size=5120, intermediate_size=16384, num_hidden_layers=40,
                       rope=RopeParameters(rope_theta=1e9), extra=dict(_EXTRA), **_PUBLISHED),
    # Test/demo model: same token-id conventions (mask 100, EOS 11, BOS 1), q width (8*32=256)
    # different from hidden (192) as at 3B/14B, and a short original context (128) so the
    # Llama-4 query scale changes value inside sequences the tests actually run.
    "tiny": ModelConfig(
        vocab_size=1024, hidden_size=192, intermediate_size=512, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, mask_token_id=100,
        eos_token_id=11, bos_token_id=1, pad_token_id=0, block_size=16,
        max_position_embeddings=2048, dtype="float32",
        rope=RopeParameters(rope_theta=10000.0, factor=16.0, original_max_position_embeddings=128),
        extra=dict(_EXTRA),
    ),
}

# Published parameter counts (Hugging Face model pages; embedding and head both counted).
PUBLISHED_PARAMS = {"3b": 3.83e9, "8b": 8.49e9, "14b": 13.51e9}

# Where each preset field was confirmed (public copies of the checkpoints' config.json: tests and
# ports pinned to the real files; the Hugging Face pages themselves were not reachable): see
# docs/config_sources.md, which also lists the one disagreeing copy and the 3B-Base differences.
PRESET_SOURCES = "docs/config_sources.md"


def preset(name: str) -> ModelConfig:
    key = name.lower()
    if key not in PRESETS:
        raise ConfigError(f"--size: unknown preset {name!r}, expected one of {', '.join(PRESETS)}")
    return PRESETS[key]
