"""A `Denoiser` proxy that times each `step` call, results ready on the host (so it declares no device
block refiner: every pass goes through `step`)."""

from __future__ import annotations

import time

import torch

from ..decoding.denoiser import Denoiser, StepOut


class TimingDenoiser(Denoiser):
    def __init__(self, inner: Denoiser):
        self.inner = inner
        self.config, self.max_len = inner.config, inner.max_len
        self.step_s: list[float] = []                 # seconds per step call, in call order

    def reset(self, batch: int) -> None:
        self.inner.reset(batch)

    def lengths(self) -> torch.Tensor:
        return self.inner.lengths()

    def trim(self, lengths: torch.Tensor) -> None:
        self.inner.trim(lengths)

    def step(self, tokens, **kw) -> StepOut:
        t0 = time.perf_counter()
        out = self.inner.step(tokens, **kw)
        if out.token.is_cuda or out.conf.is_cuda:     # the contract returns host tensors; be safe
            torch.cuda.synchronize()
        self.step_s.append(time.perf_counter() - t0)
        return out
