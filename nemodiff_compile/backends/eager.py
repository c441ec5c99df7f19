"""The eager PyTorch reference as a `Denoiser`: the truth every compiled backend is validated against."""

from __future__ import annotations

import torch

from ..model.cache import StaticKVCache
from ..model.model import NemotronLabsDiffusion, Pattern
from ..decoding import remask
from ..decoding.denoiser import StepOut


class TorchDenoiser:
    def __init__(self, model: NemotronLabsDiffusion, max_len: int, *, return_logits: bool = False):
        self.model = model.eval()
        self.config = model.config
        self.max_len = max_len
        self.return_logits = return_logits
        self.device = model.diffusion_head.weight.device
        self.cache: StaticKVCache | None = None

    def reset(self, batch: int) -> None:
        """Empty `batch` rows; (re)allocates when the batch or `max_len` (which callers may change
        between generations to fit the request) differs from the cache's."""
        if self.cache is None or self.cache.batch != batch or self.cache.max_len != self.max_len:
            self.cache = StaticKVCache(self.config, batch, self.max_len, self.model.dtype, self.device)
        self.cache.reset()

    def lengths(self) -> torch.Tensor:
        return self.cache.lengths.cpu()

    def trim(self, lengths: torch.Tensor) -> None:
        self.cache.trim(lengths.to(self.device))

    @torch.no_grad()
    def step(self, tokens, *, causal, write, num_valid=None, draft_lora=False, temperature=0.0,
             generator=None) -> StepOut:
        logits = self.model(tokens.to(self.device), cache=self.cache,
                            pattern=Pattern.CAUSAL if causal else Pattern.BIDIRECTIONAL,
                            write_cache=write, draft_lora=draft_lora,
                            num_valid=None if num_valid is None else num_valid.to(self.device))
        noise = None
        if temperature > 0:
            noise = remask.gumbel_noise(logits.shape, generator).to(self.device)
        token, conf = remask.pick(logits, temperature, noise)
        return StepOut(token.cpu(), conf.cpu(), logits if self.return_logits else None)
