"""Teacher forcing without storing logits: a `Denoiser` proxy that drives the reference and mirrors
every call, with the same arguments, onto the engine.

The decode loop sees only the reference's outputs, so its trajectory is the reference's; the engine
runs each pass on the reference's exact inputs and cache state (reset / step / trim in the same
order, the same Gumbel noise via a clone of the generator state). Each pass is compared as it
happens and only small per-pass results are kept, so [B, L, V] logits never accumulate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..decoding.denoiser import Denoiser, StepOut
from ..decoding.noise import GumbelStream
from . import metrics


@dataclass
class ShadowPass:
    """One mirrored `step` call."""

    tokens: torch.Tensor               # [B, L] input (shared)
    num_valid: torch.Tensor | None     # [B]
    ref_token: torch.Tensor            # [B, L]
    ref_conf: torch.Tensor             # [B, L]
    eng_token: torch.Tensor            # [B, L]
    eng_conf: torch.Tensor             # [B, L]
    logits: dict | None                # metrics.logits_metrics(...) where both sides return logits
    divergence: dict | None            # metrics.position_divergence(...): per-position cos, KL, row
    lengths_ok: bool                   # cache lengths equal after this pass (and after a following trim)


class ShadowDenoiser(Denoiser):
    def __init__(self, reference: Denoiser, engine: Denoiser, *, logits_atol: float | None = None,
                 logits_rtol: float | None = None):
        self.reference, self.engine = reference, engine
        self.config = reference.config
        self.max_len = min(reference.max_len, engine.max_len)
        self.atol, self.rtol = logits_atol, logits_rtol
        self.passes: list[ShadowPass] = []

    def reset(self, batch: int) -> None:
        self.reference.reset(batch)
        self.engine.reset(batch)

    def lengths(self) -> torch.Tensor:
        return self.reference.lengths()

    def trim(self, lengths: torch.Tensor) -> None:
        self.reference.trim(lengths)
        self.engine.trim(lengths.clone())
        if self.passes:
            self.passes[-1].lengths_ok &= self._lengths_equal()

    def step(self, tokens, *, causal, write, num_valid=None, draft_lora=False, temperature=0.0,
             generator=None, embeds=None) -> StepOut:
        eng_gen = None
        if isinstance(generator, GumbelStream):           # the engine draws the same noise
            eng_gen = generator.clone()
        elif generator is not None:
            eng_gen = torch.Generator(generator.device)
            eng_gen.set_state(generator.get_state())
        kw = dict(causal=causal, write=write, draft_lora=draft_lora, temperature=temperature)
        if embeds is not None:                            # an image prompt's prefill: the same features
            kw["embeds"] = embeds
        nv = None if num_valid is None else num_valid.clone()
        ref = self.reference.step(tokens, num_valid=num_valid, generator=generator, **kw)
        eng = self.engine.step(tokens.clone(), num_valid=None if nv is None else nv.clone(), generator=eng_gen, **kw)
        logits = div = None
        if ref.logits is not None and eng.logits is not None:
            valid = metrics.valid_positions(tokens, nv)
            logits = metrics.logits_metrics(eng.logits, ref.logits, valid, self.atol, self.rtol)
            div = metrics.position_divergence(eng.logits, ref.logits, valid)
        self.passes.append(ShadowPass(tokens.clone(), nv, ref.token.clone(), ref.conf.clone(),
                                      eng.token.cpu().clone(), eng.conf.cpu().clone(), logits, div,
                                      self._lengths_equal()))
        return StepOut(ref.token, ref.conf)               # the loop needs no logits

    def _lengths_equal(self) -> bool:
        return bool(torch.equal(self.reference.lengths().cpu(), self.engine.lengths().cpu()))
