"""The fast torch engine: `FastModel` passes over static buffers, captured as CUDA graphs per bucket.

Two ways the decode loops drive it:
  FastDenoiser.step     the `Denoiser` contract, so every decode loop, `validate` and `bench` run it
                        unchanged (one host copy of token/confidence per pass)
  FastDenoiser.refine   the device block refiner (decoding/refine.py) that `loops.diffusion_generate`
                        hands dlm blocks to (greedy, or sampled with the Gumbel noise drawn on the
                        device, decoding/noise.py): forward, remask, canvas update and the stop test
                        are one captured graph; the host only looks at a done flag every `check_every`
                        passes and reads the finished block once. Same tokens and NFE as the host
                        passes (a test holds them equal).
Static buffers are per batch bucket (artifact/buckets.py); a new bucket reallocates and recaptures.
Padding rows stay at cache length 0 (they compute, nobody reads them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..model.model import NemotronLabsDiffusion
from ..errors import InvalidArgument
from ..kernels import remask as remask_op
from ..kernels.gumbel import gumbel_pick
from ..decoding import loops, remask
from ..decoding.noise import GumbelStream
from ..decoding.denoiser import StepOut
from ..decoding.policy import DecodePolicy
from ..decoding.refine import Refined, drive
from ..artifact.buckets import BatchBuckets
from .base import BackendDenoiser
from .fast_model import FastModel
from .graphs import GraphPool


@dataclass
class DlmPasses:
    buffers: tuple[torch.Tensor, ...]     # canvas, refining, quota, pass index, row_nfe, nfe
    denoise: Callable[[], None]           # refinement pass: forward, remask, canvas update, counters
    state: tuple[torch.Tensor, ...]       # what `denoise` updates in place
    denoise_key: tuple


class FastDenoiser(BackendDenoiser):
    noise_on_device = True           # the GumbelStream draws straight onto the GPU (no [B, L, V] copy)

    def __init__(self, model: NemotronLabsDiffusion | FastModel, max_len: int, *, fp8: bool | str | None = None,
                 buckets: BatchBuckets = BatchBuckets(), graphs: bool | GraphPool = True,
                 return_logits: bool = False, gemv: bool = False):
        """model: the reference (re-laid out here; fp8 None, "row", "tensor" or "static", see
        fast_model.Linear; "static" needs calibrate() before use; gemv: the split-K small-M projection
        kernel, kernels/gemv.py) or an already built FastModel."""
        self.fast = model if isinstance(model, FastModel) else FastModel(model, fp8=fp8, gemv=gemv)
        super().__init__(self.fast.config, max_len, self.fast.head.device, buckets=buckets,
                         return_logits=return_logits)
        if isinstance(graphs, GraphPool):
            self.graphs = graphs
        else:
            self.graphs = GraphPool(enabled=graphs and self.device.type == "cuda")
        self._eos = torch.tensor(self.config.eos_ids, device=self.device)
        # passes up to this many tokens are captured (blocks, AR steps); longer ones (prompt
        # prefills, one per request and of any length) run eagerly rather than pile up graphs
        self.graph_max_tokens = 128

    def assume_context(self, length: int) -> None:
        """Treat `length` cached positions of every row as filled (benchmarks: values don't matter)."""
        if not 0 <= length <= self.max_len:
            raise ValueError(f"context {length} does not fit max_len {self.max_len}")
        self._set_lengths(torch.full((self.batch,), length, dtype=torch.long))

    def _set_lengths(self, lengths: torch.Tensor) -> None:
        super()._set_lengths(lengths)
        padded = torch.zeros(self.bucket, dtype=torch.long)                # padding rows stay empty
        padded[: len(lengths)] = lengths
        self.lengths_dev.copy_(padded)

    @torch.no_grad()
    def _pass(self, tokens, *, causal, write, num_valid, draft_lora, temperature, noise) -> StepOut:
        B, L = tokens.shape
        ids = self._ids(L)
        ids[:B].copy_(tokens)
        nv = torch.full((self.bucket,), L, dtype=torch.long)
        nv[:B] = num_valid
        self.num_valid.copy_(nv)
        if temperature > 0 or self.return_logits or L > self.graph_max_tokens:
            logits = self._forward(ids, causal, draft_lora)
            token, conf = remask.pick(logits[:B], temperature, None if noise is None else noise.to(self.device))
        else:
            out_tok, out_conf = self._outs(L)

            def body():
                t, c = remask_op.pick(self._forward(ids, causal, draft_lora))
                out_tok.copy_(t)
                out_conf.copy_(c)

            self.graphs.run(("step", self.bucket, L, causal, bool(draft_lora)), body)
            token, conf, logits = out_tok[:B], out_conf[:B], None
        return StepOut(token.cpu(), conf.cpu(), logits[:B] if self.return_logits else None)

    def calibrate(self, prompts: list[list[int]], *, modes: tuple[str, ...] = ("dlm", "ar"),
                  max_new_tokens: int = 32) -> None:
        """Static FP8: set every projection's input scale from real decoding passes on `prompts`
        (prefill, bidirectional refinement and commit passes, AR steps: a denoiser sees masked
        canvases AR calibration never shows it), run eagerly; previously captured graphs are dropped."""
        if self.fast.fp8 != "static":
            raise InvalidArgument("calibrate() is for the static FP8 mode (fp8='static')")
        enabled, self.graphs.enabled = self.graphs.enabled, False
        try:
            with self.fast.calibrating():
                for mode in modes:          # host passes: calibration sees exactly the passes decoding runs
                    loops.generate(self, prompts, mode, max_new_tokens=max_new_tokens, device_refine=False)
        finally:
            self.graphs.enabled = enabled
            self.graphs.clear()

    # ---- block refinement on the device (decoding/refine.py) -------------------------------------------

    def block_refiner(self, policy: DecodePolicy) -> "FastDenoiser":
        return self          # both rules (threshold, fixed steps), greedy or sampled (Gumbel drawn on the device)

    @torch.no_grad()
    def refine(self, canvas: torch.Tensor, refining: torch.Tensor, quota: torch.Tensor | None,
               policy: DecodePolicy, noise: GumbelStream | None = None) -> Refined:
        B, blen = canvas.shape
        self.check_pass(B, blen)
        if (noise is None) != policy.greedy:
            raise ValueError("a sampled policy needs the run's noise stream, a greedy one none")
        p = self.dlm_passes(blen, policy.threshold, policy.passes, policy.temperature)
        dev_canvas, dev_refining, dev_quota, s_idx, row_nfe, nfe = p.buffers
        if noise is not None:                                          # rows' keys and draw counters
            keys, counters = self._noise_bufs
            keys.zero_()
            counters.zero_()
            keys[:B].copy_(noise.keys)
            counters[:B].copy_(noise.counters)
        self.num_valid.fill_(blen)
        dev_canvas.fill_(self.config.mask_token_id)                   # padding rows: all masks, not refining
        dev_canvas[:B].copy_(canvas)
        dev_refining.zero_()
        dev_refining[:B].copy_(refining)
        if quota is not None:
            dev_quota.zero_()
            dev_quota[:B].copy_(quota)
        for t in (s_idx, row_nfe, nfe):
            t.zero_()
        executed = drive(lambda: self.graphs.run(p.denoise_key, p.denoise, p.state),
                         lambda: not bool(dev_refining.any()), policy.passes, policy.check_every)
        self.executed += executed
        return Refined(dev_canvas[:B].cpu(), row_nfe[:B].cpu(), int(nfe), executed)

    def dlm_passes(self, blen: int, threshold: float | None, passes: int, temperature: float = 0.0) -> "DlmPasses":
        """The captured refinement pass of a block for the current bucket, over persistent buffers
        (captured graphs keep pointing at them across calls). The caller sets num_valid to blen, and at
        temperature > 0 the rows' noise keys and counters (`_noise_bufs`): pass s draws at counters + s,
        the host loop's draw (decoding/noise.py), and picks in float64 as `remask.pick` does on the host
        (kernels/gumbel.py: on CUDA the noise is computed inside the pick kernel, never written)."""
        P, dev, mask_id = self.bucket, self.device, self.config.mask_token_id
        key = (blen, passes)
        if key not in self._loop_bufs:
            self._loop_bufs[key] = (
                torch.zeros(P, blen, dtype=torch.long, device=dev),        # canvas [P, blen]
                torch.zeros(P, dtype=torch.bool, device=dev),              # refining [P]
                torch.zeros(P, passes, dtype=torch.long, device=dev),      # quota [P, passes] (top-k)
                torch.zeros(P, 1, dtype=torch.long, device=dev),           # pass index
                torch.zeros(P, dtype=torch.long, device=dev),              # row_nfe [P]
                torch.zeros((), dtype=torch.long, device=dev))             # nfe
        canvas, refining, quota, s_idx, row_nfe, nfe = bufs = self._loop_bufs[key]

        def denoise():
            masked = canvas == mask_id
            refining.logical_and_(masked.any(1) & ~remask.eos_complete(canvas, masked, self._eos))
            logits = self._forward(canvas, False, False)
            q = quota.gather(1, s_idx)[:, 0] if threshold is None else None
            if temperature > 0:                    # the host's float64 Gumbel-max, noise computed here
                keys, counters = self._noise_bufs
                token, conf = gumbel_pick(logits, keys, counters + s_idx[:, 0], temperature)   # [P, blen]
                masked = (canvas == mask_id) & refining[:, None]
                commit = (remask.commit_topk(conf, masked, q) if threshold is None
                          else remask.commit_threshold(conf, masked, threshold))
                out = torch.where(commit, token, canvas)
            else:
                out, _, _, _ = remask_op.remask(logits, canvas, refining, q, mask_id=mask_id, threshold=threshold)
            canvas.copy_(out)
            row_nfe.add_(refining.long())
            nfe.add_(refining.any().long())
            s_idx.add_(1)

        policy = "topk" if threshold is None else f"threshold={threshold}"
        return DlmPasses(bufs, denoise, (canvas, refining, row_nfe, nfe, s_idx),
                         ("denoise", P, blen, passes, policy, float(temperature)))

    # ---- internals ---------------------------------------------------------------------------------

    def _allocate(self, rows: int) -> None:
        self.cache_k, self.cache_v = self.kv_cache(rows, self.fast.dtype)
        self.lengths_dev = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.num_valid = torch.zeros(rows, dtype=torch.long, device=self.device)
        self._ids_by_len: dict[int, torch.Tensor] = {}
        self._outs_by_len: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._loop_bufs: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        self._noise_bufs = (torch.zeros(rows, dtype=torch.long, device=self.device),   # keys [P]
                            torch.zeros(rows, dtype=torch.long, device=self.device))   # counters [P]
        self.graphs.clear()                       # captured graphs point at the old buffers

    def _kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache_k, self.cache_v

    def _ids(self, L: int) -> torch.Tensor:
        if L not in self._ids_by_len:
            self._ids_by_len[L] = torch.zeros(self.bucket, L, dtype=torch.long, device=self.device)
        return self._ids_by_len[L]

    def _outs(self, L: int):
        if L not in self._outs_by_len:
            self._outs_by_len[L] = (torch.zeros(self.bucket, L, dtype=torch.long, device=self.device),
                                    torch.zeros(self.bucket, L, dtype=torch.float32, device=self.device))
        return self._outs_by_len[L]

    def _forward(self, ids, causal, lora):
        return self.fast.forward(ids, self.lengths_dev, self.num_valid, causal=causal,
                                 cache_k=self.cache_k, cache_v=self.cache_v, lora=bool(lora))
