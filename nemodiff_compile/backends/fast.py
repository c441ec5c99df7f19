"""The fast torch engine: `FastModel` passes over static buffers, captured as CUDA graphs per bucket.

Two ways to drive it:
  FastDenoiser.step           the `Denoiser` contract, so every decode loop, `validate` and `bench`
                              run it unchanged (one host copy of token/confidence per pass)
  FastDenoiser.generate_dlm   block diffusion with the whole refinement pass on the device: forward,
                              fused remask, canvas update and the stop test are one captured graph;
                              the host only looks at a done flag every `check_every` passes and reads
                              the finished block once. Same tokens and NFE accounting as
                              `sampling.loops.diffusion_generate` (a test holds them equal).
Static buffers are per batch bucket (artifact/buckets.py); a new bucket reallocates and recaptures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..model.model import NemotronLabsDiffusion
from ..errors import InvalidArgument
from ..model.cache import check_room, check_trim
from ..kernels import remask as remask_op
from ..decoding import remask
from ..decoding.denoiser import StepOut
from ..decoding import loops
from ..decoding.loops import Generation, OnTokens, _eos_complete, _prefill, _Run
from ..artifact.buckets import BatchBuckets
from .fast_model import FastModel
from .graphs import GraphPool


@dataclass
class DlmPasses:
    buffers: tuple[torch.Tensor, ...]     # canvas, refining, quota, pass index, row_nfe, nfe, next seed
    denoise: Callable[[], None]           # refinement pass: forward, remask, canvas update, counters
    commit: Callable[[], None]            # causal pass writing the block's K/V; next seed
    state: tuple[torch.Tensor, ...]       # what `denoise` updates in place
    denoise_key: tuple
    commit_key: tuple


class FastDenoiser:
    def __init__(self, model: NemotronLabsDiffusion | FastModel, max_len: int, *, fp8: bool | str | None = None,
                 buckets: BatchBuckets = BatchBuckets(), graphs: bool | GraphPool = True,
                 return_logits: bool = False):
        """model: the reference (re-laid out here; fp8 None, "row", "tensor" or "static", see
        fast_model.Linear; "static" needs calibrate() before use) or an already built FastModel."""
        self.fast = model if isinstance(model, FastModel) else FastModel(model, fp8=fp8)
        self.config = self.fast.config
        self.max_len = max_len
        self.return_logits = return_logits
        self.device = self.fast.head.device
        self.buckets = buckets
        if isinstance(graphs, GraphPool):
            self.graphs = graphs
        else:
            self.graphs = GraphPool(enabled=graphs and self.device.type == "cuda")
        self.batch = 0            # rows the caller asked for
        self.bucket = 0           # rows allocated (>= batch)
        self._alloc_len = 0
        self._host_len = torch.zeros(0, dtype=torch.long)
        self._eos = torch.tensor(self.config.eos_ids, device=self.device)
        self.executed = 0         # forwards the last generate_dlm ran (>= its nfe, see there)
        # passes up to this many tokens are captured (blocks, AR steps); longer ones (prompt
        # prefills, one per request and of any length) run eagerly rather than pile up graphs
        self.graph_max_tokens = 128

    # ---- the Denoiser contract -----------------------------------------------------------------------

    def reset(self, batch: int) -> None:
        bucket = self.buckets.pick(batch)
        if bucket != self.bucket or self.max_len != self._alloc_len:
            self._allocate(bucket)
        self.batch = batch
        self.lengths_dev.zero_()
        self._host_len = torch.zeros(bucket, dtype=torch.long)

    def lengths(self) -> torch.Tensor:
        return self._host_len[: self.batch].clone()

    def assume_context(self, length: int) -> None:
        """Treat `length` cached positions of every row as filled (benchmarks: values don't matter)."""
        if not 0 <= length <= self.max_len:
            raise ValueError(f"context {length} does not fit max_len {self.max_len}")
        self._host_len[:] = length
        self.lengths_dev.fill_(length)

    def trim(self, lengths: torch.Tensor) -> None:
        check_trim(self._host_len[: self.batch], lengths)
        self._host_len[: self.batch] = lengths
        self.lengths_dev.copy_(self._host_len.to(self.device))

    @torch.no_grad()
    def step(self, tokens, *, causal, write, num_valid=None, draft_lora=False, temperature=0.0,
             generator=None) -> StepOut:
        B, L = tokens.shape
        if B != self.batch:
            raise ValueError(f"reset() was called for batch {self.batch}, step got {B} rows")
        if write and not causal:
            raise ValueError("the KV cache only holds causal K/V: bidirectional passes cannot write it")
        self._check_room(L)
        nv = torch.full((self.bucket,), L, dtype=torch.long)
        if num_valid is not None:
            nv[:B] = num_valid
        ids = self._ids(L)
        ids[:B].copy_(tokens)
        self.num_valid.copy_(nv)
        eager = temperature > 0 or self.return_logits or L > self.graph_max_tokens
        if eager:
            logits = self._forward(ids, causal, draft_lora)
            noise = None
            if temperature > 0:   # the reference's float64 noise from the loop's host generator
                noise = remask.gumbel_noise((B, L, logits.shape[-1]), generator).to(self.device)
            token, conf = remask.pick(logits[:B], temperature, noise)
        else:
            out_tok, out_conf = self._outs(L)

            def body():
                t, c = remask_op.pick(self._forward(ids, causal, draft_lora))
                out_tok.copy_(t)
                out_conf.copy_(c)

            self.graphs.run(("step", self.bucket, L, causal, bool(draft_lora)), body)
            token, conf, logits = out_tok[:B], out_conf[:B], None
        if write:
            self._advance(nv)
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
                for mode in modes:
                    loops.generate(self, prompts, mode, max_new_tokens=max_new_tokens)
        finally:
            self.graphs.enabled = enabled
            self.graphs.clear()

    # ---- block diffusion on the device ------------------------------------------------------------

    @torch.no_grad()
    def generate_dlm(self, prompts: list[list[int]], *, max_new_tokens: int, block_length: int | None = None,
                     threshold: float | None = 0.9, steps: int | None = None, check_every: int = 4,
                     on_tokens: OnTokens | None = None) -> Generation:
        """Greedy block diffusion (`diffusion_generate` at temperature 0) with device-resident passes.

        A pass whose rows have all stopped commits nothing, so checking the done flag only every
        `check_every` passes wastes at most check_every - 1 forwards per block and never changes the
        tokens; `nfe` counts the passes the reference loop would run, `executed` what the GPU ran.
        """
        cfg, B = self.config, len(prompts)
        blen, steps = loops.dlm_policy(cfg.block_size, block_length, threshold, steps)
        if check_every < 1:
            raise InvalidArgument(f"check_every must be at least 1, got {check_every}")
        n_blocks = math.ceil(max_new_tokens / blen)
        run = _Run(self, B, temperature=0.0, seed=0, trace=False, max_new_tokens=max_new_tokens,
                   on_tokens=on_tokens)
        seed_tok = _prefill(run, prompts, n_blocks * blen)                              # [B] host
        P, dev, mask_id = self.bucket, self.device, cfg.mask_token_id
        passes = steps if threshold is None else blen
        p = self.dlm_passes(blen, threshold, passes)
        canvas, refining, quota, s_idx, row_nfe, nfe, seed_dev = p.buffers
        self.num_valid.fill_(blen)
        full = torch.full((P,), blen, dtype=torch.long)
        self.executed = 1                                                               # the prefill
        for k in range(n_blocks):
            active = ~run.done                                                          # [B] host
            act = torch.zeros(P, dtype=torch.bool)
            act[:B] = active
            refining.copy_(act)
            canvas.fill_(mask_id)
            canvas[:B, 0] = seed_tok.to(dev)
            if threshold is None:
                quota.copy_(remask.even_split((canvas == mask_id).sum(1), steps))
            s_idx.zero_()
            row_nfe.zero_()
            nfe.zero_()
            self._check_room(blen)
            for s in range(passes):
                self.graphs.run(p.denoise_key, p.denoise, p.state)
                self.executed += 1
                if (s + 1) % check_every == 0 and s + 1 < passes and not bool(refining.any()):
                    break
            self.graphs.run(p.commit_key, p.commit, (seed_dev,))
            self.executed += 1
            self._advance(full)
            blk = canvas[:B].cpu()                                                       # one sync per block
            seed_tok = seed_dev[:B].cpu()
            if int(nfe):
                run.nfe_by_phase["denoise"] = run.nfe_by_phase.get("denoise", 0) + int(nfe)
            run.nfe_by_phase["commit"] = run.nfe_by_phase.get("commit", 0) + 1
            run.row_nfe += row_nfe[:B].cpu() + active.long()
            for b in active.nonzero()[:, 0].tolist():
                run.emit(b, blk[b].tolist())
            if bool(run.done.all()):
                break
        return run.result()

    def dlm_passes(self, blen: int, threshold: float | None, passes: int) -> "DlmPasses":
        """The two captured bodies of a block for the current bucket, over persistent buffers
        (captured graphs keep pointing at them across calls). The caller sets num_valid to blen."""
        P, dev, mask_id = self.bucket, self.device, self.config.mask_token_id
        key = (blen, passes)
        if key not in self._loop_bufs:
            self._loop_bufs[key] = (
                torch.zeros(P, blen, dtype=torch.long, device=dev),        # canvas [P, blen]
                torch.zeros(P, dtype=torch.bool, device=dev),              # refining [P]
                torch.zeros(P, passes, dtype=torch.long, device=dev),      # quota [P, passes] (top-k)
                torch.zeros(P, 1, dtype=torch.long, device=dev),           # pass index
                torch.zeros(P, dtype=torch.long, device=dev),              # row_nfe [P]
                torch.zeros((), dtype=torch.long, device=dev),             # nfe
                torch.zeros(P, dtype=torch.long, device=dev))              # next seed [P]
        canvas, refining, quota, s_idx, row_nfe, nfe, seed_dev = bufs = self._loop_bufs[key]

        def denoise():
            masked = canvas == mask_id
            refining.logical_and_(masked.any(1) & ~_eos_complete(canvas, masked, self._eos))
            logits = self._forward(canvas, False, False)
            q = quota.gather(1, s_idx)[:, 0] if threshold is None else None
            out, _, _, _ = remask_op.remask(logits, canvas, refining, q, mask_id=mask_id, threshold=threshold)
            canvas.copy_(out)
            row_nfe.add_(refining.long())
            nfe.add_(refining.any().long())
            s_idx.add_(1)

        def commit():
            token, _ = remask_op.pick(self._forward(canvas, True, False))
            seed_dev.copy_(token[:, -1])

        policy = "topk" if threshold is None else f"threshold={threshold}"
        return DlmPasses(bufs, denoise, commit, (canvas, refining, row_nfe, nfe, s_idx),
                         ("denoise", P, blen, passes, policy), ("commit", P, blen))

    # ---- internals ---------------------------------------------------------------------------------

    def _allocate(self, bucket: int) -> None:
        cfg = self.config
        shape = (cfg.num_hidden_layers, bucket, cfg.num_key_value_heads, self.max_len, cfg.head_dim)
        self.cache_k = torch.zeros(shape, dtype=self.fast.dtype, device=self.device)
        self.cache_v = torch.zeros(shape, dtype=self.fast.dtype, device=self.device)
        self.lengths_dev = torch.zeros(bucket, dtype=torch.long, device=self.device)
        self.num_valid = torch.zeros(bucket, dtype=torch.long, device=self.device)
        self._ids_by_len: dict[int, torch.Tensor] = {}
        self._outs_by_len: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._loop_bufs: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        self.graphs.clear()                       # captured graphs point at the old buffers
        self.bucket, self._alloc_len = bucket, self.max_len

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

    def _check_room(self, L: int) -> None:
        check_room(self._host_len, L, self.max_len)

    def _advance(self, nv: torch.Tensor) -> None:
        self._host_len += nv
        self.lengths_dev.add_(nv.to(self.device))

