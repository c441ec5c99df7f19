"""Continuous batching over one engine: requests join and leave the engine's batch between passes.

One thread owns the `Denoiser`. Each request is a `decoding.rows.Row` (its own policy, Gumbel generator,
cache length and output) in one row of the engine's batch. Every engine pass is one step kind, and the
rows whose next step is of that kind run in it together:

  step kind   prefill (causal; the joiners' prompts, right-padded) | a causal pass of L tokens (AR decode,
              dlm commit, linear-spec verify) | a bidirectional pass of L tokens (dlm denoise; linear-spec
              draft, with the draft LoRA) | a device block refinement (dlm on backends with one for the policy)
              and the sampling temperature (rows sampled at different temperatures never share a pass)
  mixed       on backends whose graph takes `causal` per row (`row_causal`: ONNX Runtime and TensorRT engines
              exported since), causal and bidirectional rows of one length share a pass (a row's dlm commit or
              linear-spec verify beside other rows' denoise passes; not a draft, whose LoRA switch is per pass):
              only the causal rows write. Rows finish their blocks after different numbers of denoise passes,
              so without it a commit runs apart, over the few rows that reached it
  which next  the kind with the most rows waiting plus the longest any of them has waited (in passes), so
              the rows of one mode move in lock-step as in `loops.generate`, and nothing starves
  riders      a text prefill whose prompt fits in a causal pass of L tokens (dlm commit, linear-spec verify; where
              passes mix, any pass but a draft) may run in it (its prompt right-padded, num_valid its length; a
              causal pass writes and reads the same either way): a row that joins mid-block costs no pass of its
              own
  other rows  ride along idle: their outputs are dropped, causal passes write nothing for them (their
              cache length is trimmed back after the pass; what the pass wrote past it is never read)

So rows join as soon as a row is free (one prefill pass for all joiners) and leave when they finish or are
cancelled; between passes the batch is regrouped to the live rows (`BackendDenoiser.regroup`: the
backend's buckets, K/V carried over), or, for a denoiser without `regroup`, rows are slots of a fixed batch.
A row's tokens do not depend on its batch mates (greedy: its solo `loops.generate` tokens; sampled: its own
generator's draws, only for the passes it takes part in). Requests beyond the largest batch wait in a
queue; beyond `max_queue` waiting, `submit` raises `QueueFull`.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from . import remask
from .denoiser import Denoiser, StepOut
from .embeds import PrefillEmbeds
from .loops import Generation
from .policy import DecodePolicy
from .noise import GumbelStream
from .rows import Pass, Refine, Row, Step, Trim
from .thinking import ThinkingBudget
from ..errors import NemodiffError

DEFAULT_MAX_BATCH = 8


class QueueFull(NemodiffError):
    """The scheduler's waiting queue is full (a server answers 503 and asks to retry)."""


class Cancelled(NemodiffError):
    """The request was cancelled before it finished."""


class SchedulerClosed(NemodiffError):
    """The scheduler was closed before the request finished."""


class Request:
    """A submitted prompt: `result()` waits for its `Generation`; `cancel()` frees its row."""

    _ids = itertools.count()

    def __init__(self, on_tokens: Callable[[list[int]], None] | None):
        self.id = next(self._ids)
        self.row: Row | None = None                 # set by Scheduler.submit
        self.on_tokens = on_tokens
        self.passes: list[tuple[int, str]] = []      # (engine pass index, phase) this row took part in
        self.submitted = time.monotonic()
        self.first_token: float | None = None
        self.finished: float | None = None
        self.error: BaseException | None = None
        self._done = threading.Event()
        self._cancelled = False
        self._lock = threading.Lock()
        self._callbacks: list[Callable[["Request"], None]] = []
        self._step: Step | None = None              # what the row needs next
        self._waited = 0                            # passes since its step was ready

    def cancel(self) -> None:
        """Free the row at the next pass boundary (or drop the request from the queue)."""
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Generation:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.row.generation()

    def add_done_callback(self, fn: Callable[["Request"], None]) -> None:
        """fn(request) once it finished, failed or was cancelled (on the scheduler's thread, or now)."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def _emit(self, _row: int, ids: list[int]) -> None:
        if self.first_token is None:
            self.first_token = time.monotonic()
        if self.on_tokens is not None and not self._cancelled:
            try:
                self.on_tokens(ids)
            except Exception as e:        # a broken consumer cancels its own request, nobody else's
                self.error = e
                self._cancelled = True

    def _finish(self, error: BaseException | None = None) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self.error = self.error or error
            self.finished = time.monotonic()
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception:             # a consumer's callback never stops the scheduler
                pass


class Scheduler:
    def __init__(self, denoiser: Denoiser, *, max_batch: int | None = None, max_queue: int = 256,
                 observer: Any = None):
        """max_batch: rows run at once (default: the denoiser's largest bucket, else 8); max_queue: requests
        waiting for a row before `submit` refuses; observer: gets on_pass / on_request / on_queue calls
        (serve/metrics.py)."""
        self.den = denoiser
        buckets = getattr(denoiser, "buckets", None)
        self.max_batch = max_batch or (buckets.sizes[-1] if buckets is not None else DEFAULT_MAX_BATCH)
        if buckets is not None and self.max_batch > buckets.sizes[-1]:
            buckets.pick(self.max_batch)                 # the one-line error naming the buckets
        self.max_queue = max_queue
        self.observer = observer
        self.passes = 0                                  # engine passes run
        self._regroup = bool(getattr(denoiser, "can_regroup", False))   # backends/base.py
        self._mixed = bool(getattr(denoiser, "row_causal", False))      # causal and bidirectional rows in a pass
        self._queue: deque[Request] = deque()
        self._slots: list[Request | None] = []           # row b of the engine's batch
        self._fresh = True                               # the engine's rows must be (re)started
        self._cond = threading.Condition()
        self._closing = False
        self._drain = True
        self._exclusive = 0                              # callers waiting for / holding the whole engine
        self._idle = True                                # no row in the engine, no pass in flight
        self._thread = threading.Thread(target=self._loop, name="nemodiff-scheduler", daemon=True)
        self._thread.start()

    # ---- the caller's side ----------------------------------------------------------------------------

    def submit(self, prompt: list[int], policy: DecodePolicy, max_new_tokens: int, *,
               on_tokens: Callable[[list[int]], None] | None = None, thinking: ThinkingBudget | None = None,
               images: Any = None) -> Request:
        """Queue a prompt (token ids); on_tokens(ids) is called (on the scheduler's thread) as tokens commit;
        thinking: the row's thinking budget; images: its image features (embeds.PromptImages) for the prefill.
        Raises InvalidArgument (the request cannot run on this engine), QueueFull or SchedulerClosed."""
        req = Request(on_tokens)
        req.row = Row(self.den, prompt, policy, max_new_tokens, on_tokens=req._emit, thinking=thinking, images=images)
        with self._cond:
            if self._closing:
                raise SchedulerClosed("the engine is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are already waiting (max_queue {self.max_queue})")
            self._queue.append(req)
            self._observe("on_queue", len(self._queue))
            self._cond.notify_all()
        return req

    def stats(self) -> dict[str, int]:
        with self._cond:
            return dict(queued=len(self._queue), running=sum(r is not None for r in self._slots),
                        batch=len(self._slots), max_batch=self.max_batch, passes=self.passes)

    @contextmanager
    def exclusive(self) -> Iterator[Denoiser]:
        """The whole engine for the caller (e.g. a traced whole-batch `loops.generate`): admission stops, the
        running rows finish, the caller runs; afterwards the scheduler restarts the engine's rows."""
        with self._cond:
            if self._closing:
                raise SchedulerClosed("the engine is shutting down")
            self._exclusive += 1
            self._cond.notify_all()
            while not self._idle:
                self._cond.wait()
        try:
            yield self.den
        finally:
            with self._cond:
                self._exclusive -= 1
                self._fresh = True
                self._cond.notify_all()

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting requests; drain=True finishes the queued and running ones first, else they fail
        with SchedulerClosed. Joins the scheduler's thread."""
        with self._cond:
            self._closing, self._drain = True, self._drain and drain
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ---- the scheduler's thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    self._drop_cancelled()
                    if self._closing and not self._drain:
                        self._fail_all(SchedulerClosed("the engine was shut down"))
                    if any(self._slots) or (self._queue and not self._exclusive):
                        break
                    self._idle = True                    # no row in the engine
                    self._cond.notify_all()
                    if self._closing and not self._queue:
                        return
                    self._cond.wait()
                self._idle = False
                joiners = self._admit()
            try:
                self._layout(joiners)
                self._one_pass()
            except Exception as e:                   # the engine failed: fail its rows, restart them
                with self._cond:
                    self._fail_running(e)
                    for req in joiners:              # joiners the failed regroup did not place
                        req._finish(e)
                    self._fresh = True

    def _drop_cancelled(self) -> None:
        for req in [r for r in self._queue if r.cancelled]:
            self._queue.remove(req)
            req._finish(req.error or Cancelled(f"request {req.id} was cancelled"))
        for b, req in enumerate(self._slots):
            if req is not None and req.cancelled:
                self._free(b, req.error or Cancelled(f"request {req.id} was cancelled"))

    def _admit(self) -> list[Request]:
        free = self.max_batch - sum(r is not None for r in self._slots)
        joiners = []
        while self._queue and len(joiners) < free and not self._exclusive:
            req = self._queue.popleft()
            req._step = next(req.row.program)            # its prefill
            joiners.append(req)
        if joiners:
            self._observe("on_queue", len(self._queue))
        return joiners

    def _layout(self, joiners: list[Request]) -> None:
        """Make the engine's batch the running rows (in order) plus the joiners."""
        if self._fresh:                              # no running rows: start the engine's rows afresh
            self._slots = [r for r in self._slots if r is not None]
            assert not self._slots, "the engine restarts only without running rows"
            if not self._regroup:
                self.den.reset(self.max_batch)
                self._slots = [None] * self.max_batch
        if self._regroup:
            keep = [b for b, r in enumerate(self._slots) if r is not None]
            if self._fresh or joiners or len(keep) < len(self._slots):
                self.den.regroup(keep, len(keep) + len(joiners))
            self._slots = [self._slots[b] for b in keep] + joiners
        else:
            for req in joiners:
                b = self._slots.index(None)
                self._slots[b] = req
                self._set_length(b, 0)
        self._fresh = False

    def _one_pass(self) -> None:
        groups: dict[tuple, list[int]] = {}
        for b, req in enumerate(self._slots):
            if req is not None:
                groups.setdefault(_key(req, self._mixed), []).append(b)
        lengths = self.den.lengths()                                     # [B]
        subset = getattr(self.den, "subset_passes", False)

        def fits(members: list[int]) -> bool:   # the pass's rows (all of them, unless subset passes) have room
            rows = lengths[members] if subset and not isinstance(self._slots[members[0]]._step, Refine) else lengths
            return int(rows.max()) + max(self._slots[b]._step.length for b in members) <= self.den.max_len

        for k, bs in list(groups.items()):            # prefills ride along a causal pass that covers their prompt
            if k[0] == "pass" and k[1] is not False and not k[3]:   # (text prompts: an image prefill feeds embeddings)
                groups[k] = sorted(bs + [b for pk, ps in groups.items() if pk[0] == "prefill" and pk[4] == k[4]
                                         for b in ps if self._slots[b]._step.length <= k[2]
                                         and self._slots[b].row.images is None])
        runnable = {k: bs for k, bs in groups.items() if fits(bs)}
        if not runnable:       # cannot happen: the longest row's own next pass always fits (Row checks room)
            raise RuntimeError(f"no pass fits the KV cache (lengths {lengths.tolist()})")
        key, members = max(runnable.items(), key=lambda kv: len(kv[1]) + max(self._slots[b]._waited for b in kv[1]))
        t0 = time.perf_counter()
        if key[0] == "refine":
            self._refine(members)
        else:
            self._pass(members, lengths, subset)
        for b, req in enumerate(self._slots):
            if req is not None:
                req._waited = 0 if b in members else req._waited + 1
        self._observe("on_pass", time.perf_counter() - t0, len(members), len(members) if subset else len(self._slots),
                      self.max_batch)

    def _pass(self, members: list[int], lengths: torch.Tensor, subset: bool) -> None:
        """One engine pass for the member rows: over them alone (subset passes), or over the whole batch with
        the other rows idle."""
        den, cfg = self.den, self.den.config
        steps = {b: self._slots[b]._step for b in members}
        first: Pass = steps[members[0]]
        rows = members if subset else list(range(len(self._slots)))
        at = {b: i for i, b in enumerate(rows)}                          # batch row -> row of this pass
        B, L = len(rows), max(s.length for s in steps.values())
        temperature = self._slots[members[0]].row.policy.temperature
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_ids[0]
        tokens = torch.full((B, L), pad, dtype=torch.long)               # [B, L]; idle rows: pad tokens
        num_valid = torch.full((B,), L, dtype=torch.long)                # idle rows: a whole (unwritten) block
        noise = torch.zeros(B, L, cfg.vocab_size, dtype=torch.float64) if temperature > 0 else None
        for b, s in steps.items():
            tokens[at[b], : s.length] = s.tokens[0]
            num_valid[at[b]] = s.length
            if noise is not None:                    # the row's own draw, as its solo run makes it
                noise[at[b], : s.length] = remask.gumbel_noise((1, s.length, cfg.vocab_size),
                                                               self._slots[b].row.generator)[0]
        kw = dict(rows=members) if subset else {}
        if first.phase == "prefill" and any(self._slots[b].row.images is not None for b in members):
            kw["embeds"] = PrefillEmbeds.of([self._slots[b].row.images if b in steps else None for b in rows], L)
        write = any(s.causal for s in steps.values())      # causal rows write (a dlm commit, a verify, a prefill)
        causal = write
        if write and not all(s.causal for s in steps.values()):   # a mixed pass (row_causal backends): per row
            causal = torch.tensor([b in steps and steps[b].causal for b in rows])              # [B] bool
        out = den.step(tokens, causal=causal, write=write, num_valid=num_valid,
                       draft_lora=first.draft_lora, temperature=temperature, noise=noise, **kw)
        if write and not subset and len(members) < B:                 # idle rows keep their lengths
            idle = torch.ones(B, dtype=torch.bool)
            idle[members] = False
            den.trim(torch.where(idle, lengths, den.lengths()))
        index = self._count_passes(1)
        for b, s in steps.items():
            req = self._slots[b]
            req.row.count(s.phase)
            req.passes.append((index, s.phase))
            i = at[b]
            self._advance(b, StepOut(out.token[i : i + 1, : s.length], out.conf[i : i + 1, : s.length]))

    def _refine(self, members: list[int]) -> None:
        """One device block refinement for the member rows (the others: all masks, not refining)."""
        cfg = self.den.config
        B = len(self._slots)
        steps = {b: self._slots[b]._step for b in members}
        first: Refine = steps[members[0]]
        row = self._slots[members[0]].row
        canvas = torch.full((B, first.length), cfg.mask_token_id, dtype=torch.long)
        refining = torch.zeros(B, dtype=torch.bool)
        quota = None if first.quota is None else torch.zeros(B, first.quota.shape[1], dtype=torch.long)
        for b, s in steps.items():
            canvas[b] = s.canvas[0]
            refining[b] = True
            if quota is not None:
                quota[b] = s.quota[0]
        noise = None
        if not row.policy.greedy:                  # each row's own stream, advanced by the passes it took part in
            noise = GumbelStream.of_rows([self._slots[b].row.generator if b in steps else None for b in range(B)])
        out = row.refiner.refine(canvas, refining, quota, row.policy, noise)
        index = self._count_passes(out.nfe)
        for b in members:
            req, n = self._slots[b], int(out.row_nfe[b])
            req.row.refined(n, out.executed)
            if noise is not None:
                req.row.generator.advance(n)
            req.passes.extend((index + i, "denoise") for i in range(n))
            self._advance(b, out.canvas[b : b + 1])

    def _advance(self, b: int, result: Any) -> None:
        """Send the row its result; run its trims; keep its next step, or finish it."""
        req = self._slots[b]
        try:
            step = req.row.program.send(result)
            while isinstance(step, Trim):
                self._set_length(b, step.length)
                step = req.row.program.send(None)
        except StopIteration:
            with self._cond:
                self._free(b, None)
            return
        req._step = step

    def _set_length(self, b: int, length: int) -> None:
        lengths = self.den.lengths()
        lengths[b] = length
        self.den.trim(lengths)

    def _count_passes(self, n: int) -> int:
        index, self.passes = self.passes, self.passes + n
        return index

    def _free(self, b: int, error: BaseException | None) -> None:
        req = self._slots[b]
        self._slots[b] = None
        if not self._regroup and not self._fresh:
            self._set_length(b, 0)
        req._finish(error)
        self._observe("on_request", req)

    def _fail_running(self, error: BaseException) -> None:
        for b, req in enumerate(self._slots):
            if req is not None:
                self._slots[b] = None
                req._finish(error)
                self._observe("on_request", req)

    def _fail_all(self, error: BaseException) -> None:
        self._fail_running(error)
        while self._queue:
            self._queue.popleft()._finish(error)

    def _observe(self, event: str, *args) -> None:
        fn = getattr(self.observer, event, None)
        if fn is not None:
            try:
                fn(*args)
            except Exception:                        # metrics never break decoding
                pass


def _key(req: Request, mixed: bool) -> tuple:
    """Rows with equal keys can share an engine pass. mixed: the engine takes `causal` per row, so causal and
    bidirectional passes of one length share a pass (its second field None)."""
    step, policy = req._step, req.row.policy
    if isinstance(step, Refine):
        return ("refine", step.length, policy.threshold, policy.steps, policy.check_every, policy.temperature)
    length = None if step.phase == "prefill" else step.length      # prompts of any length prefill together
    causal = None if mixed and not step.draft_lora else step.causal
    return ("prefill" if step.phase == "prefill" else "pass", causal, length, step.draft_lora,
            policy.temperature)
