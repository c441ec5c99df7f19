"""A `Denoiser` proxy that times each `step` call, results ready on the host, and names each call's phase;
it forwards the inner denoiser's device block refiner (decoding/refine.py), timing each refined block.

Phases are told from the call order, without a trace: the first pass after `reset` is the prefill; then a
causal pass is the mode's decode / commit / verify and a bidirectional one its denoise / draft pass."""

from __future__ import annotations

import time

import torch

from ..decoding.denoiser import Denoiser, StepOut
from ..decoding.refine import Refined

CAUSAL_PHASE = {"ar": "decode", "dlm": "commit", "linear-spec": "verify"}
BIDIRECTIONAL_PHASE = {"ar": "denoise", "dlm": "denoise", "linear-spec": "draft"}


class TimingDenoiser(Denoiser):
    def __init__(self, inner: Denoiser, mode: str = "dlm"):
        self.inner, self.mode = inner, mode
        self.config, self.max_len = inner.config, inner.max_len
        self.step_s: list[float] = []                 # seconds per step call, in call order
        self.phases: list[str] = []                   # the phase of each step call
        self.refine_s: list[tuple[float, int]] = []   # per device-refined block: (seconds, passes the device ran)
        self._fresh = True

    def reset(self, batch: int) -> None:
        self.inner.reset(batch)
        self._fresh = True

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
        phase = CAUSAL_PHASE[self.mode] if kw.get("causal") else BIDIRECTIONAL_PHASE[self.mode]
        self.phases.append("prefill" if self._fresh else phase)
        self._fresh = False
        return out

    def block_refiner(self, policy):
        refiner = self.inner.block_refiner(policy)
        return None if refiner is None else _TimedRefiner(refiner, self.refine_s)


class _TimedRefiner:
    def __init__(self, inner, record: list[tuple[float, int]]):
        self.inner, self.record = inner, record

    def refine(self, canvas, refining, quota, policy, noise=None) -> Refined:
        t0 = time.perf_counter()
        out = self.inner.refine(canvas, refining, quota, policy, noise)    # host tensors back: the device is done
        self.record.append((time.perf_counter() - t0, out.executed))
        return out
