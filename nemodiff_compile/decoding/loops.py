"""The three decoding modes of Nemotron-Labs-Diffusion, written against the `Denoiser` contract.

Semantics follow the released remote code (research note §4-§6), generalised to batches whose rows
have different prompt lengths and finish at different times (each row has its own cache length).

Accounting, the same in every mode:
  nfe            forward passes run for the batch, every pass counted, the prompt prefill included
                 (`nfe_by_phase` splits it: prefill / decode / denoise / commit / draft / verify).
                 Upstream `generate` leaves the prefill out; subtract `nfe_by_phase["prefill"]` to compare.
  row_nfe[b]     passes run while row b was still generating
  tokens[b]      the row's generated ids, through its first EOS (included), at most max_new_tokens
  tokens per forward (TPF) = len(tokens[b]) / row_nfe[b], averaged over rows

Thinking budget (instruct models, `thinking=ThinkingBudget(...)`): the closing tag is forced at
generated index max_tokens in every mode (thinking.py says how each loop does it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import remask
from ..errors import InvalidArgument
from .denoiser import Denoiser
from .thinking import ThinkingBudget

MODES = ("ar", "dlm", "linear-spec")


@dataclass
class PassRecord:
    """One forward pass, for validation and tests."""

    phase: str                         # prefill | decode | denoise | commit | draft | verify
    block: int                         # block (or speculation round) index; -1 for prefill
    step: int                          # pass index inside the block
    tokens: torch.Tensor               # [B, L] input tokens
    out_token: torch.Tensor            # [B, L] candidates
    conf: torch.Tensor                 # [B, L] confidences
    committed: torch.Tensor | None = None   # [B, L] bool, positions committed by this pass (denoise/draft)
    logits: torch.Tensor | None = None      # [B, L, V] on the host, where the backend returns them


@dataclass
class Generation:
    tokens: list[list[int]]
    finish: list[str]                  # "eos" or "length" per row
    nfe: int
    nfe_by_phase: dict[str, int]
    row_nfe: list[int]
    trace: list[PassRecord] = field(default_factory=list, repr=False)

    @property
    def tokens_per_forward(self) -> float:
        rates = [len(t) / n for t, n in zip(self.tokens, self.row_nfe) if n]
        return sum(rates) / len(rates) if rates else 0.0


OnTokens = Callable[[int, list[int]], None]


class _Run:
    """Bookkeeping shared by the loops: pass counting, tracing, the noise generator, and each row's
    output (cut at its first EOS and at max_new_tokens, streamed to `on_tokens` as it grows)."""

    def __init__(self, den: Denoiser, batch: int, *, temperature: float, seed: int, trace: bool,
                 max_new_tokens: int, on_tokens: OnTokens | None, thinking: ThinkingBudget | None = None):
        self.den, self.temperature = den, temperature
        self.eos = den.config.eos_ids
        self.max_new_tokens, self.on_tokens = max_new_tokens, on_tokens
        self.generator = torch.Generator().manual_seed(seed)
        self.nfe_by_phase: dict[str, int] = {}
        self.row_nfe = torch.zeros(batch, dtype=torch.long)
        self.rows: list[list[int]] = [[] for _ in range(batch)]
        self.finish: list[str | None] = [None] * batch
        self.trace: list[PassRecord] | None = [] if trace else None
        self.thinking = thinking
        self.thought = [thinking is None] * batch          # rows that closed their thinking

    @property
    def done(self) -> torch.Tensor:
        """[B] bool: rows that hit EOS or max_new_tokens."""
        return torch.tensor([f is not None for f in self.finish])

    def step(self, phase: str, tokens: torch.Tensor, active: torch.Tensor, *, block: int = -1,
             index: int = 0, **kw):
        causal = phase in ("prefill", "decode", "commit", "verify")
        out = self.den.step(tokens, causal=causal, write=causal, temperature=self.temperature,
                            generator=self.generator, **kw)
        self.nfe_by_phase[phase] = self.nfe_by_phase.get(phase, 0) + 1
        self.row_nfe += active.long()
        if self.trace is not None:
            logits = None if out.logits is None else out.logits.detach().cpu()
            self.trace.append(PassRecord(phase, block, index, tokens.clone(), out.token.clone(),
                                         out.conf.clone(), logits=logits))
        return out

    def note_commit(self, committed: torch.Tensor) -> None:
        if self.trace is not None:
            self.trace[-1].committed = committed.clone()

    def emit(self, b: int, tokens: list[int]) -> None:
        """Append finished tokens to row b, up to its first EOS (included) and max_new_tokens."""
        if self.finish[b] is not None:
            return
        row, new = self.rows[b], []
        for t in tokens:
            if len(row) == self.max_new_tokens:
                break
            row.append(t)
            new.append(t)
            if t in self.eos:
                self.finish[b] = "eos"
                break
        if self.finish[b] is None and len(row) == self.max_new_tokens:
            self.finish[b] = "length"
        if not self.thought[b] and self.thinking.end_id in new:
            self.thought[b] = True
        if new and self.on_tokens is not None:
            self.on_tokens(b, new)

    def think(self, b: int, tokens: list[int]) -> list[int]:
        """Tokens about to be emitted to row b, with the thinking budget's closing tag forced."""
        return tokens if self.thought[b] else self.thinking.cut(len(self.rows[b]), tokens)

    def think_block(self, blk: torch.Tensor, active: torch.Tensor) -> None:
        """Put the closing tag into the block [B, L] of each row that reaches its budget there."""
        for b in active.nonzero()[:, 0].tolist():
            if not self.thought[b]:
                pos = self.thinking.block_position(len(self.rows[b]), blk.shape[1])
                if pos is not None:
                    blk[b, pos] = self.thinking.end_id

    def result(self) -> Generation:
        return Generation([list(r) for r in self.rows], [f or "length" for f in self.finish],
                          sum(self.nfe_by_phase.values()), dict(self.nfe_by_phase),
                          self.row_nfe.tolist(), self.trace or [])


def _prefill(run: _Run, prompts: list[list[int]], room: int) -> torch.Tensor:
    """Causal pass over the right-padded prompts; returns the first new token [B]."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InvalidArgument("every prompt needs at least one token")
    B = len(prompts)
    n = torch.tensor([len(p) for p in prompts])                                     # [B]
    need = int(n.max()) + room
    if need > run.den.max_len:
        raise InvalidArgument(f"prompt ({int(n.max())}) + generation ({room}) needs {need} cache positions, "
                         f"the backend has {run.den.max_len}: raise max_len or lower max_new_tokens")
    cfg = run.den.config
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_ids[0]   # never attended to
    ids = torch.full((B, int(n.max())), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p)
    run.den.reset(B)
    out = run.step("prefill", ids, torch.ones(B, dtype=torch.bool), num_valid=n)
    return out.token[torch.arange(B), n - 1]


def _eos_mask(t: torch.Tensor, eos: tuple[int, ...] | torch.Tensor) -> torch.Tensor:
    """eos: the ids as a tuple, or already a tensor on t's device (graph-captured callers)."""
    if not isinstance(eos, torch.Tensor):
        eos = torch.tensor(eos, dtype=t.dtype, device=t.device)
    return (t[..., None] == eos).any(-1)                  # a handful of ids: no sort, no host sync


# ---- AR -------------------------------------------------------------------------------------------

def ar_generate(den: Denoiser, prompts: list[list[int]], *, max_new_tokens: int,
                temperature: float = 0.0, seed: int = 0, trace: bool = False,
                on_tokens: OnTokens | None = None, thinking: ThinkingBudget | None = None) -> Generation:
    """Causal decoding, one token per pass; each row stops at its first EOS."""
    run = _Run(den, len(prompts), temperature=temperature, seed=seed, trace=trace,
               max_new_tokens=max_new_tokens, on_tokens=on_tokens, thinking=thinking)
    tok = _prefill(run, prompts, max_new_tokens)                                     # [B]
    for i in range(max_new_tokens):
        active = ~run.done
        for b in active.nonzero()[:, 0].tolist():
            tok[b] = run.think(b, [int(tok[b])])[0]
            run.emit(b, [int(tok[b])])
        if bool(run.done.all()):
            break
        tok = run.step("decode", tok[:, None], ~run.done, block=i).token[:, 0]
    return run.result()


# ---- block diffusion --------------------------------------------------------------------------------

def dlm_policy(block_size: int, block_length: int | None, threshold: float | None,
               steps: int | None) -> tuple[int, int | None]:
    """Check a block-diffusion policy -> (block length, steps: the fixed-steps budget or None)."""
    blen = block_length or block_size
    if blen < 2:
        raise InvalidArgument(f"block_length must be at least 2, got {blen}")
    if threshold is None:
        steps = steps or blen
        if not 1 <= steps <= blen:
            raise InvalidArgument(f"steps must be between 1 and block_length ({blen}), got {steps}")
    elif not 0.0 <= threshold <= 1.0:
        raise InvalidArgument(f"threshold must be in [0, 1], got {threshold}")
    return blen, steps


def diffusion_generate(den: Denoiser, prompts: list[list[int]], *, max_new_tokens: int,
                       block_length: int | None = None, threshold: float | None = 0.9,
                       steps: int | None = None, temperature: float = 0.0, seed: int = 0,
                       trace: bool = False, on_tokens: OnTokens | None = None,
                       thinking: ThinkingBudget | None = None) -> Generation:
    """Block diffusion with a causal prefix cache (upstream `generate`, causal_context=True).

    Each block starts as [seed, MASK x (B-1)] where the seed is the AR prediction of the previous
    causal pass. Bidirectional refinement passes read the cache and commit masked positions:
      threshold policy (threshold set): top-1 plus every masked position with confidence >= threshold;
      fixed-steps policy (threshold None): `steps` passes (default block_length) committing an even
      split of the block's masks per pass, the LLaDA schedule, a hard budget on passes per block.
    A row stops refining once its block has no mask left, or has an EOS with no mask before it.
    Then a causal commit pass writes the block's K/V and its last position gives the next seed.
    """
    cfg, B = den.config, len(prompts)
    blen, steps = dlm_policy(cfg.block_size, block_length, threshold, steps)
    n_blocks = math.ceil(max_new_tokens / blen)
    mask_id, eos = cfg.mask_token_id, cfg.eos_ids
    run = _Run(den, B, temperature=temperature, seed=seed, trace=trace,
               max_new_tokens=max_new_tokens, on_tokens=on_tokens, thinking=thinking)
    seed_tok = _prefill(run, prompts, n_blocks * blen)                               # [B]
    for k in range(n_blocks):
        active = ~run.done
        blk = torch.full((B, blen), mask_id, dtype=torch.long)                       # [B, blen]
        blk[:, 0] = seed_tok
        if thinking is not None:
            run.think_block(blk, active)
        if threshold is None:
            quota = remask.even_split((blk == mask_id).sum(1), steps)                # [B, steps]
        refining = active.clone()
        for s in range(blen):
            masked = blk == mask_id
            refining &= masked.any(1) & ~_eos_complete(blk, masked, eos)
            if not bool(refining.any()) or (threshold is None and s >= steps):
                break
            out = run.step("denoise", blk, refining, block=k, index=s)
            masked &= refining[:, None]
            if threshold is None:
                commit = remask.commit_topk(out.conf, masked, quota[:, s])
            else:
                commit = remask.commit_threshold(out.conf, masked, threshold)
            run.note_commit(commit)
            blk = torch.where(commit, out.token, blk)
        seed_tok = run.step("commit", blk, active, block=k).token[:, -1]
        for b in active.nonzero()[:, 0].tolist():
            run.emit(b, blk[b].tolist())
        if bool(run.done.all()):
            break
    return run.result()


def _eos_complete(blk: torch.Tensor, masked: torch.Tensor, eos: tuple[int, ...] | torch.Tensor) -> torch.Tensor:
    """[B] bool: the block holds an EOS with no mask before its first EOS (the row is finished)."""
    is_eos = _eos_mask(blk, eos)
    before_first = torch.cumsum(is_eos.long(), dim=1) == 0
    return is_eos.any(1) & ~(masked & before_first).any(1)


# ---- linear self-speculation ----------------------------------------------------------------------

def linear_spec_generate(den: Denoiser, prompts: list[list[int]], *, max_new_tokens: int,
                         block_length: int | None = None, threshold: float = 0.0,
                         temperature: float = 0.0, seed: int = 0, trace: bool = False,
                         on_tokens: OnTokens | None = None, thinking: ThinkingBudget | None = None) -> Generation:
    """Draft a block bidirectionally (draft LoRA on), verify it causally (LoRA off), keep the
    agreeing prefix plus the verifier's next token, and trim the rejected K/V.

    With threshold 0 one draft pass fills every mask; with threshold > 0 drafting repeats, each pass
    committing masks with confidence >= threshold (or the most confident one if none passes).
    At temperature 0 the output equals greedy AR decoding of the base model.
    """
    cfg, B = den.config, len(prompts)
    blen = block_length or cfg.block_size
    if blen < 2:
        raise InvalidArgument(f"block_length must be at least 2, got {blen}")
    run = _Run(den, B, temperature=temperature, seed=seed, trace=trace,
               max_new_tokens=max_new_tokens, on_tokens=on_tokens, thinking=thinking)
    seed_tok = _prefill(run, prompts, max_new_tokens + blen)                         # [B]
    for b in range(B):
        seed_tok[b] = run.think(b, [int(seed_tok[b])])[0]
        run.emit(b, [int(seed_tok[b])])
    k = 0
    while not bool(run.done.all()):
        active = ~run.done
        start = den.lengths().clone()                                                 # [B]
        blk = torch.full((B, blen), cfg.mask_token_id, dtype=torch.long)
        blk[:, 0] = seed_tok
        for s in range(blen):
            masked = (blk == cfg.mask_token_id) & active[:, None]
            if not bool(masked.any()):
                break
            out = run.step("draft", blk, active, block=k, index=s, draft_lora=True)
            if threshold > 0:
                commit = masked & (out.conf >= threshold)
                none = ~commit.any(1)
                commit |= remask.top1(out.conf, masked) & none[:, None]
            else:
                commit = masked
            run.note_commit(commit)
            blk = torch.where(commit, out.token, blk)
        verify = run.step("verify", blk, active, block=k).token                     # [B, blen]
        agree = (verify[:, :-1] == blk[:, 1:]).long()                                # [B, blen-1]
        n_acc = torch.cumprod(agree, dim=1).sum(1)                                   # [B] accepted drafts
        if thinking is not None:               # a round reaching the budget: cut, the tag is the bonus
            for b in active.nonzero()[:, 0].tolist():
                keep = run.think(b, verify[b, : int(n_acc[b]) + 1].tolist())
                n_acc[b] = len(keep) - 1
                verify[b, n_acc[b]] = keep[-1]
        den.trim(torch.where(active, start + n_acc + 1, start))                      # keep seed + accepted
        seed_tok = verify[torch.arange(B), n_acc]                                    # bonus token
        for b in active.nonzero()[:, 0].tolist():
            run.emit(b, verify[b, : int(n_acc[b]) + 1].tolist())
        k += 1
    return run.result()


DEFAULT_THRESHOLD = {"dlm": 0.9, "linear-spec": 0.0}


def generate(den: Denoiser, prompts: list[list[int]], mode: str, *, threshold: float | None = None,
             steps: int | None = None, block_length: int | None = None, **kw) -> Generation:
    """Dispatch on mode with the per-mode defaults: dlm uses the threshold rule (0.9) unless `steps`
    asks for the fixed-steps schedule; linear-spec drafts in one pass (threshold 0)."""
    if mode not in MODES:
        raise InvalidArgument(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if steps is not None and (mode != "dlm" or threshold is not None):
        raise InvalidArgument("steps (the fixed-steps schedule) is a dlm policy and excludes threshold")
    if mode == "ar":
        return ar_generate(den, prompts, **kw)
    if threshold is None and steps is None:
        threshold = DEFAULT_THRESHOLD[mode]
    if mode == "dlm":
        return diffusion_generate(den, prompts, block_length=block_length, threshold=threshold, steps=steps, **kw)
    return linear_spec_generate(den, prompts, block_length=block_length, threshold=threshold, **kw)
