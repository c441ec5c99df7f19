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
  device_passes  refinement passes a backend's device block refiner ran (refine.py): the nfe above counts
                 the passes the host loop would run, the surplus ran after every row had stopped
The policy (mode, block length, commit rule, temperature, seed) is one `DecodePolicy` (policy.py).

Thinking budget (instruct models, `thinking=ThinkingBudget(...)`, a request's option beside the
policy): the closing tag is forced at generated index max_tokens in every mode (thinking.py says how
each loop does it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import remask
from ..errors import InvalidArgument
from .arguments import check_room, check_token_ids
from .denoiser import Denoiser
from .embeds import PrefillEmbeds, PromptImages
from .noise import GumbelStream
from .policy import MODES, DecodePolicy, check_bounds
from .refine import BlockRefiner
from .thinking import ThinkingBudget


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
    device_passes: int = 0             # refinement passes a device block refiner ran (>= the denoise passes
                                       # it counted in nfe: it reads its done flag every check_every passes)

    @property
    def tokens_per_forward(self) -> float:
        rates = [len(t) / n for t, n in zip(self.tokens, self.row_nfe) if n]
        return sum(rates) / len(rates) if rates else 0.0


OnTokens = Callable[[int, list[int]], None]
Images = list[PromptImages | None] | None      # per prompt: its image features (vision-language models)


class _Run:
    """Bookkeeping shared by the loops: pass counting, tracing, the noise generator, and each row's
    output (cut at its first EOS and at max_new_tokens, streamed to `on_tokens` as it grows)."""

    def __init__(self, den: Denoiser, batch: int, policy: DecodePolicy, *, trace: bool,
                 max_new_tokens: int, on_tokens: OnTokens | None, thinking: ThinkingBudget | None = None):
        check_bounds(max_new_tokens=max_new_tokens)
        self.den, self.policy, self.temperature = den, policy, policy.temperature
        self.eos = den.config.eos_ids
        self.max_new_tokens, self.on_tokens = max_new_tokens, on_tokens
        self.generator = GumbelStream(policy.seed, batch)          # counter-based: device loops draw the same
        self.nfe_by_phase: dict[str, int] = {}
        self.device_passes = 0
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

    def refine(self, refiner: BlockRefiner, blk: torch.Tensor, active: torch.Tensor,
               quota: torch.Tensor | None, policy: DecodePolicy) -> torch.Tensor:
        """A block's refinement passes on the backend's device; counted as the host passes would be."""
        out = refiner.refine(blk, active.clone(), quota, policy, None if policy.greedy else self.generator)
        if not policy.greedy:
            self.generator.advance(out.nfe)                     # the draws the host passes would have made
        if out.nfe:
            self.nfe_by_phase["denoise"] = self.nfe_by_phase.get("denoise", 0) + out.nfe
        self.row_nfe += out.row_nfe
        self.device_passes += out.executed
        return out.canvas

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
                          self.row_nfe.tolist(), self.trace or [], self.device_passes)


def _prefill(run: _Run, prompts: list[list[int]], room: int, images: Images = None) -> torch.Tensor:
    """Causal pass over the right-padded prompts; returns the first new token [B]. The token ids are
    checked against the vocabulary and the prompt + `room` positions against the cache first
    (arguments.py: the message blames the prompt, block_length or max_new_tokens). images: per row, the
    image features that replace its image pad tokens (embeds.py), or None."""
    if not prompts:
        raise InvalidArgument("every prompt needs at least one token")
    cfg = run.den.config
    prompts = [check_token_ids(p, cfg.vocab_size, f"prompt {i}" if len(prompts) > 1 else "prompt")
               for i, p in enumerate(prompts)]
    B = len(prompts)
    n = torch.tensor([len(p) for p in prompts])                                     # [B]
    need = int(n.max()) + room
    if need > run.den.max_len:
        check_room(int(n.max()), mode=run.policy.mode, max_new_tokens=run.max_new_tokens,
                   block_length=run.policy.block_length or 1, max_len=run.den.max_len)
        raise InvalidArgument(f"prompt ({int(n.max())}) + generation ({room}) needs {need} cache positions, "
                              f"the backend has {run.den.max_len}: raise max_len or lower max_new_tokens")
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_ids[0]   # never attended to
    ids = torch.full((B, int(n.max())), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p)
    run.den.reset(B)
    embeds = None if images is None else PrefillEmbeds.of(list(images), ids.shape[1])
    extra = {} if embeds is None else {"embeds": embeds}
    out = run.step("prefill", ids, torch.ones(B, dtype=torch.bool), num_valid=n, **extra)
    return out.token[torch.arange(B), n - 1]


def _policy(mode: str, policy: DecodePolicy | None, knobs: dict, cfg) -> DecodePolicy:
    """The loop's policy: given, or made of keywords; resolved against the model's config."""
    policy = DecodePolicy.of(policy or mode, knobs).resolve(cfg)
    if policy.mode != mode:
        raise InvalidArgument(f"the {mode} loop got a {policy.mode} policy")
    return policy


# ---- AR -------------------------------------------------------------------------------------------

def ar_generate(den: Denoiser, prompts: list[list[int]], policy: DecodePolicy | None = None, *,
                max_new_tokens: int, trace: bool = False, on_tokens: OnTokens | None = None,
                thinking: ThinkingBudget | None = None, images: Images = None, **knobs) -> Generation:
    """Causal decoding, one token per pass; each row stops at its first EOS.
    policy: a DecodePolicy("ar", ...), or its fields as keywords (temperature, seed)."""
    policy = _policy("ar", policy, knobs, den.config)
    run = _Run(den, len(prompts), policy, trace=trace, max_new_tokens=max_new_tokens, on_tokens=on_tokens,
               thinking=thinking)
    tok = _prefill(run, prompts, max_new_tokens, images)                             # [B]
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

def diffusion_generate(den: Denoiser, prompts: list[list[int]], policy: DecodePolicy | None = None, *,
                       max_new_tokens: int, trace: bool = False, on_tokens: OnTokens | None = None,
                       thinking: ThinkingBudget | None = None, images: Images = None, **knobs) -> Generation:
    """Block diffusion with a causal prefix cache (upstream `generate`, causal_context=True).
    policy: a DecodePolicy("dlm", ...), or its fields as keywords (block_length, threshold, steps, ...).

    Each block starts as [seed, MASK x (B-1)] where the seed is the AR prediction of the previous
    causal pass. Bidirectional refinement passes read the cache and commit masked positions:
      threshold policy: top-1 plus every masked position with confidence >= threshold;
      fixed-steps policy (steps set): `steps` passes committing an even split of the block's masks
      per pass, the LLaDA schedule, a hard budget on passes per block.
    A row stops refining once its block has no mask left, or has an EOS with no mask before it.
    Then a causal commit pass writes the block's K/V and its last position gives the next seed.
    Untraced blocks go to the backend's device block refiner where it has one for the policy (`refine.py`;
    sampled blocks too where the backend samples on its device).
    """
    cfg, B = den.config, len(prompts)
    policy = _policy("dlm", policy, knobs, cfg)
    blen = policy.block_length
    n_blocks = math.ceil(max_new_tokens / blen)
    run = _Run(den, B, policy, trace=trace, max_new_tokens=max_new_tokens, on_tokens=on_tokens,
               thinking=thinking)
    seed_tok = _prefill(run, prompts, n_blocks * blen, images)                       # [B]
    refiner = den.block_refiner(policy) if policy.device_refine and not trace else None   # None: not this policy
    for k in range(n_blocks):
        active = ~run.done
        blk = torch.full((B, blen), cfg.mask_token_id, dtype=torch.long)             # [B, blen]
        blk[:, 0] = seed_tok
        if thinking is not None:
            run.think_block(blk, active)
        quota = None
        if policy.steps is not None:
            quota = remask.even_split((blk == cfg.mask_token_id).sum(1), policy.steps)   # [B, steps]
        if refiner is not None:
            blk = run.refine(refiner, blk, active, quota, policy)
        else:
            blk = _refine_on_host(run, blk, active, quota, policy, k)
        seed_tok = run.step("commit", blk, active, block=k).token[:, -1]
        for b in active.nonzero()[:, 0].tolist():
            run.emit(b, blk[b].tolist())
        if bool(run.done.all()):
            break
    return run.result()


def _refine_on_host(run: _Run, blk: torch.Tensor, active: torch.Tensor, quota: torch.Tensor | None,
                    policy: DecodePolicy, k: int) -> torch.Tensor:
    """The refinement passes of block k, one `step` each (the rules of refine.py)."""
    mask_id = run.den.config.mask_token_id
    refining = active.clone()
    for s in range(policy.passes):
        masked = blk == mask_id
        refining &= masked.any(1) & ~remask.eos_complete(blk, masked, run.eos)
        if not bool(refining.any()):
            break
        out = run.step("denoise", blk, refining, block=k, index=s)
        masked &= refining[:, None]
        if quota is not None:
            commit = remask.commit_topk(out.conf, masked, quota[:, s])
        else:
            commit = remask.commit_threshold(out.conf, masked, policy.threshold)
        run.note_commit(commit)
        blk = torch.where(commit, out.token, blk)
    return blk


# ---- linear self-speculation ----------------------------------------------------------------------

def linear_spec_generate(den: Denoiser, prompts: list[list[int]], policy: DecodePolicy | None = None, *,
                         max_new_tokens: int, trace: bool = False, on_tokens: OnTokens | None = None,
                         thinking: ThinkingBudget | None = None, images: Images = None, **knobs) -> Generation:
    """Draft a block bidirectionally (draft LoRA on), verify it causally (LoRA off), keep the
    agreeing prefix plus the verifier's next token, and trim the rejected K/V.
    policy: a DecodePolicy("linear-spec", ...), or its fields as keywords (block_length, threshold, ...).

    With threshold 0 one draft pass fills every mask; with threshold > 0 drafting repeats, each pass
    committing masks with confidence >= threshold (or the most confident one if none passes).
    At temperature 0 the output equals greedy AR decoding of the base model.
    """
    cfg, B = den.config, len(prompts)
    policy = _policy("linear-spec", policy, knobs, cfg)
    blen, threshold = policy.block_length, policy.threshold
    run = _Run(den, B, policy, trace=trace, max_new_tokens=max_new_tokens, on_tokens=on_tokens,
               thinking=thinking)
    seed_tok = _prefill(run, prompts, max_new_tokens + blen, images)                 # [B]
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


_LOOPS = {"ar": ar_generate, "dlm": diffusion_generate, "linear-spec": linear_spec_generate}


def generate(den: Denoiser, prompts: list[list[int]], policy: DecodePolicy | str, *, max_new_tokens: int,
             trace: bool = False, on_tokens: OnTokens | None = None, thinking: ThinkingBudget | None = None,
             images: Images = None, **knobs) -> Generation:
    """Decode with `policy`: a DecodePolicy, or a mode name with the policy's fields as keywords
    (block_length, threshold, steps, temperature, seed, ...; their defaults: policy.py).
    thinking: the instruct models' thinking budget (thinking.py), None for none. images: per prompt, its
    image features (embeds.PromptImages, vision-language models) or None."""
    policy = DecodePolicy.of(policy, knobs)
    return _LOOPS[policy.mode](den, prompts, policy, max_new_tokens=max_new_tokens, trace=trace,
                               on_tokens=on_tokens, thinking=thinking, images=images)
