"""The contract the decode loops are written against: one compiled or eager step over a static KV cache.

Every backend (the eager torch reference, ONNX Runtime, TensorRT, the fast engine) implements `Denoiser`
(the backends through `backends/base.py`); the loops in `loops.py` never see anything else, so one loop
drives them all. A class declares that it implements the contract by subclassing `Denoiser`, which also
gives it the default of the one optional capability, `block_refiner` (see `refine.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from ..config import ModelConfig

if TYPE_CHECKING:  # pragma: no cover
    from .policy import DecodePolicy
    from .refine import BlockRefiner


@dataclass
class StepOut:
    token: torch.Tensor                   # [B, L] int64: candidate per position (argmax, or Gumbel-max if T > 0)
    conf: torch.Tensor                    # [B, L] float32: softmax probability of `token` under the raw logits
    logits: torch.Tensor | None = None    # [B, L, V]: only where the backend returns them (validation)


class Denoiser(Protocol):
    config: ModelConfig
    max_len: int                          # KV cache positions per row

    def reset(self, batch: int) -> None:
        """Start `batch` empty rows (cache lengths 0)."""

    def lengths(self) -> torch.Tensor:
        """[B] int64 cache length of each row."""

    def trim(self, lengths: torch.Tensor) -> None:
        """Shorten rows to `lengths` [B] (linear-spec rejects)."""

    def step(self, tokens: torch.Tensor, *, causal: "bool | torch.Tensor", write: bool,
             num_valid: torch.Tensor | None = None, draft_lora: bool = False,
             temperature: float = 0.0, generator: torch.Generator | None = None, embeds=None) -> StepOut:
        """Run tokens [B, L] at positions lengths[b] + 0..L-1 over the cached prefix.

        causal: causal attention inside the block (else bidirectional), a bool or, on backends with
        `row_causal`, a [B] bool tensor; write: append the causal rows' K/V and advance their lengths by
        num_valid [B] (default L). embeds: a prefill's input
        embeddings (embeds.PrefillEmbeds, vision-language models; backends without image input refuse it).
        """

    def block_refiner(self, policy: "DecodePolicy") -> "BlockRefiner | None":
        """The backend's device-resident block refinement for `policy` (a resolved greedy dlm policy),
        or None: the loop then runs the block's passes through `step`."""
        return None
