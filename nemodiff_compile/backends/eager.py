"""The eager PyTorch reference as a `Denoiser`: the truth every compiled backend is validated against."""

from __future__ import annotations

import torch

from ..model.cache import StaticKVCache
from ..model.model import NemotronLabsDiffusion, Pattern
from ..decoding import remask
from ..decoding.denoiser import StepOut
from .base import BackendDenoiser


class TorchDenoiser(BackendDenoiser):
    noise_on_device = True           # the GumbelStream draws straight onto its device

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

    accepts_spans = True          # the reference also runs the bidirectional image-prefill assumption

    @property
    def accepts_embeds(self) -> bool:
        """A vision-language model's prefill takes image features (decoding/embeds.py)."""
        return hasattr(self.model, "image_features")

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels [3, H, W] -> image features [(H//28)*(W//28), hidden] (model/vision.py)."""
        return self.model.image_features(pixels)

    @torch.no_grad()
    def _pass(self, tokens, *, causal, write, num_valid, draft_lora, temperature, noise, embeds=None) -> StepOut:
        img = {}
        if embeds is not None:
            img = {"embed_mask": embeds.mask.to(self.device), "embeds": embeds.values.to(self.device),
                   "spans": None if embeds.spans is None else embeds.spans.to(self.device)}
        logits = self.model(tokens.to(self.device), cache=self.cache,
                            pattern=Pattern.CAUSAL if causal else Pattern.BIDIRECTIONAL,
                            write_cache=write, draft_lora=draft_lora, num_valid=num_valid.to(self.device), **img)
        token, conf = remask.pick(logits, temperature, None if noise is None else noise.to(self.device))
        return StepOut(token.cpu(), conf.cpu(), logits if self.return_logits else None)
