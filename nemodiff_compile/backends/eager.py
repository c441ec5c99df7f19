"""The eager PyTorch reference as a `Denoiser`: the truth every compiled backend is validated against."""

from __future__ import annotations

import torch

from ..model.cache import StaticKVCache
from ..model.model import NemotronLabsDiffusion, Pattern
from ..decoding import remask
from ..decoding.denoiser import StepOut
from .base import BackendDenoiser


class TorchDenoiser(BackendDenoiser):
    def __init__(self, model: NemotronLabsDiffusion, max_len: int, *, return_logits: bool = False):
        self.model = model.eval()
        super().__init__(model.config, max_len, model.diffusion_head.weight.device, return_logits=return_logits)
        self.cache: StaticKVCache | None = None

    def _allocate(self, rows: int) -> None:
        self.cache = StaticKVCache(self.config, rows, self.max_len, self.model.dtype, self.device)

    def _set_lengths(self, lengths: torch.Tensor) -> None:
        super()._set_lengths(lengths)
        self.cache.lengths.copy_(lengths)            # the model reads and advances the cache's own copy

    def _kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.k, self.cache.v

    @torch.no_grad()
    def _pass(self, tokens, *, causal, write, num_valid, draft_lora, temperature, noise) -> StepOut:
        logits = self.model(tokens.to(self.device), cache=self.cache,
                            pattern=Pattern.CAUSAL if causal else Pattern.BIDIRECTIONAL,
                            write_cache=write, draft_lora=draft_lora, num_valid=num_valid.to(self.device))
        token, conf = remask.pick(logits, temperature, None if noise is None else noise.to(self.device))
        return StepOut(token.cpu(), conf.cpu(), logits if self.return_logits else None)
