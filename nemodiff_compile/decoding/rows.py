"""The three decoding modes for one row at a time, as resumable programs: what a scheduler that batches
rows joining and leaving between passes drives (scheduler.py).

`loops.py` runs a whole batch in lock-step. Here a `Row` is one prompt with its own policy, Gumbel
generator, cache length and output; its `program` is a generator that yields what the row needs next:

  Pass   one engine pass over the row's tokens [1, L] (causal passes write the row's K/V: all L
         positions, or the prompt's for the prefill); it is sent back the row's `StepOut` slice [1, L]
  Trim   the row's cache length after linear-spec rejected drafts (no pass; sent back None)
  Refine a dlm block's refinement passes, where the backend declares a device block refiner for the
         policy (decoding/refine.py; sampled ones draw each row's own noise stream on the device):
         sent back the finished block [1, L] (the
         scheduler runs one refinement for every row of a batch at the same point; same tokens and
         NFE as the host passes, the refiner's contract)

and returns when the row is finished. The rules are the loops' own, applied to a batch of one: the commit
rules and EOS test of `remask`, the seed and acceptance rules, the emit rule and accounting of
`loops._Run` (tokens through the first EOS, at most max_new_tokens; NFE by phase; `Generation`). So a
row's tokens, NFE and tokens per forward are those of `loops.generate` on its prompt alone, whatever
passes it shares with other rows (tests/decoding/test_scheduler.py holds them equal), provided the backend
computes each row of a batch as it would alone. The ONNX Runtime engine does, up to float rounding: its cache
window (the longest row's length, backends/ort.py) sets the summation order of the attention, so a row's
confidences in a batch agree with its solo run's to ~1e-6 and a greedy choice could only differ on a tie that
close (none in the tests).

A row's sampling noise is drawn from its own generator (seeded by its policy), for the passes it takes
part in only: the draws of `loops.generate` on the prompt alone. A thinking budget (thinking.py) forces the
closing tag where the loops force it (`loops._Run.think` / `think_block`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from . import remask
from ..errors import InvalidArgument
from .arguments import check_room, check_token_ids
from .denoiser import Denoiser, StepOut
from .embeds import PromptImages
from .loops import Generation, OnTokens, _Run
from .noise import GumbelStream
from .policy import DecodePolicy, check_bounds
from .thinking import ThinkingBudget


@dataclass(frozen=True)
class Pass:
    phase: str                  # prefill | decode | denoise | commit | draft | verify
    tokens: torch.Tensor        # [1, L] int64
    causal: bool                # causal passes write the row's K/V (the prefill's prompt, else all L)
    draft_lora: bool = False

    @property
    def length(self) -> int:
        return self.tokens.shape[1]


@dataclass(frozen=True)
class Trim:
    length: int                 # the row's cache length from now on (only shrinks)


@dataclass(frozen=True)
class Refine:
    canvas: torch.Tensor        # [1, L] int64: [seed, MASK, ...]
    quota: torch.Tensor | None  # [1, steps] int64 (fixed-steps policy), else None

    @property
    def length(self) -> int:
        return self.canvas.shape[1]


Step = Pass | Trim | Refine


def room(policy: DecodePolicy, max_new_tokens: int) -> int:
    """Cache positions a row needs past its prompt (the loops' prefill check)."""
    if policy.mode == "ar":
        return max_new_tokens
    if policy.mode == "dlm":
        return math.ceil(max_new_tokens / policy.block_length) * policy.block_length
    return max_new_tokens + policy.block_length


class Row:
    """One prompt's decoding. `program` yields `Pass` / `Trim` steps (send each pass's `StepOut` slice back);
    `generation()` is its result. on_tokens(0, ids) is called as tokens are committed."""

    def __init__(self, den: Denoiser, prompt: list[int], policy: DecodePolicy, max_new_tokens: int, *,
                 on_tokens: OnTokens | None = None, thinking: ThinkingBudget | None = None,
                 images: PromptImages | None = None):
        if not prompt:
            raise InvalidArgument("every prompt needs at least one token")
        check_bounds(max_new_tokens=max_new_tokens)
        self.policy = policy.resolve(den.config)
        self.prompt, self.max_new_tokens = check_token_ids(prompt, den.config.vocab_size, "prompt"), max_new_tokens
        self.need = len(self.prompt) + room(self.policy, max_new_tokens)     # cache positions, at most
        if self.need > den.max_len:         # the same one line as the whole-batch loops (arguments.py)
            check_room(len(self.prompt), mode=self.policy.mode, max_new_tokens=max_new_tokens,
                       block_length=self.policy.block_length or 1, max_len=den.max_len)
            raise InvalidArgument(f"prompt ({len(self.prompt)}) + generation ({self.need - len(self.prompt)}) needs "
                                  f"{self.need} cache positions, the engine has {den.max_len}: "
                                  "shorten the prompt or lower max_new_tokens")
        self.config = den.config
        dlm = self.policy.mode == "dlm" and self.policy.device_refine      # the backend says which policies
        self.refiner = den.block_refiner(self.policy) if dlm else None
        self.thinking = thinking
        self.images = images                 # the prompt's image features (its prefill's embeddings), or None
        self.run = _Run(den, 1, self.policy, trace=False, max_new_tokens=max_new_tokens, on_tokens=on_tokens,
                        thinking=thinking)
        self.program: Iterator[Step] = _PROGRAMS[self.policy.mode](self)

    @property
    def generator(self) -> "GumbelStream":
        return self.run.generator

    @property
    def finished(self) -> bool:
        return self.run.finish[0] is not None

    def count(self, phase: str) -> None:
        """The row took part in a pass of `phase` (the loops' nfe_by_phase / row_nfe for one row)."""
        self.run.nfe_by_phase[phase] = self.run.nfe_by_phase.get(phase, 0) + 1
        self.run.row_nfe += 1

    def refined(self, row_nfe: int, executed: int) -> None:
        """A device refinement of the row's block ran `executed` passes, `row_nfe` of them with the row refining."""
        for _ in range(row_nfe):
            self.count("denoise")
        self.run.device_passes += executed

    def generation(self) -> Generation:
        return self.run.result()

    def _prefill(self) -> Pass:
        return Pass("prefill", torch.tensor([self.prompt], dtype=torch.long), causal=True)

    def _block(self, seed: int) -> torch.Tensor:
        blk = torch.full((1, self.policy.block_length), self.config.mask_token_id, dtype=torch.long)   # [1, L]
        blk[0, 0] = seed
        return blk

    def _think(self, tokens: list[int]) -> list[int]:
        """Tokens about to be emitted, with the thinking budget's closing tag forced (loops._Run.think)."""
        return tokens if self.thinking is None else self.run.think(0, tokens)


def _ar(row: Row) -> Iterator[Step]:
    """loops.ar_generate for one row."""
    run, n = row.run, len(row.prompt)
    out: StepOut = yield row._prefill()
    tok = int(out.token[0, n - 1])
    for _ in range(row.max_new_tokens):
        tok = row._think([tok])[0]
        run.emit(0, [tok])
        if row.finished:
            return
        out = yield Pass("decode", torch.tensor([[tok]]), causal=True)
        tok = int(out.token[0, 0])


def _dlm(row: Row) -> Iterator[Step]:
    """loops.diffusion_generate (host refinement) for one row."""
    run, policy, mask_id, n = row.run, row.policy, row.config.mask_token_id, len(row.prompt)
    out: StepOut = yield row._prefill()
    seed = int(out.token[0, n - 1])
    for _ in range(math.ceil(row.max_new_tokens / policy.block_length)):
        blk = row._block(seed)
        if row.thinking is not None:
            run.think_block(blk, torch.ones(1, dtype=torch.bool))
        quota = None
        if policy.steps is not None:
            quota = remask.even_split((blk == mask_id).sum(1), policy.steps)                     # [1, steps]
        if row.refiner is not None:
            blk = yield Refine(blk, quota)
        for s in range(0 if row.refiner is not None else policy.passes):
            masked = blk == mask_id
            if not bool(masked.any()) or bool(remask.eos_complete(blk, masked, run.eos)[0]):
                break
            out = yield Pass("denoise", blk, causal=False)
            if quota is not None:
                commit = remask.commit_topk(out.conf, masked, quota[:, s])
            else:
                commit = remask.commit_threshold(out.conf, masked, policy.threshold)
            blk = torch.where(commit, out.token, blk)
        out = yield Pass("commit", blk, causal=True)
        seed = int(out.token[0, -1])
        run.emit(0, blk[0].tolist())
        if row.finished:
            return


def _linear_spec(row: Row) -> Iterator[Step]:
    """loops.linear_spec_generate for one row."""
    run, threshold, mask_id, n = row.run, row.policy.threshold, row.config.mask_token_id, len(row.prompt)
    out: StepOut = yield row._prefill()
    seed, length = row._think([int(out.token[0, n - 1])])[0], n
    run.emit(0, [seed])
    while not row.finished:
        blk = row._block(seed)
        for _ in range(blk.shape[1]):
            masked = blk == mask_id
            if not bool(masked.any()):
                break
            out = yield Pass("draft", blk, causal=False, draft_lora=True)
            commit = masked
            if threshold > 0:
                commit = masked & (out.conf >= threshold)
                if not bool(commit.any()):
                    commit = remask.top1(out.conf, masked)
            blk = torch.where(commit, out.token, blk)
        verify = (yield Pass("verify", blk, causal=True)).token.clone()                        # [1, L]
        n_acc = int(torch.cumprod((verify[:, :-1] == blk[:, 1:]).long(), dim=1).sum())         # accepted drafts
        if row.thinking is not None:          # a round reaching the budget: cut, the tag is the bonus
            keep = row._think(verify[0, : n_acc + 1].tolist())
            n_acc = len(keep) - 1
            verify[0, n_acc] = keep[-1]
        length += n_acc + 1                                                                    # seed + accepted
        yield Trim(length)
        seed = int(verify[0, n_acc])                                                           # bonus token
        run.emit(0, verify[0, : n_acc + 1].tolist())


_PROGRAMS = {"ar": _ar, "dlm": _dlm, "linear-spec": _linear_spec}
