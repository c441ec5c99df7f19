"""A model-free `Denoiser` for fast tests of the decode loops and the scheduler (milliseconds a pass).

Its "model" is a hash of the context, so every rule of the contract is observable:
  causal pass    position i predicts the next token from history + tokens[:i+1] (AR), tokens 20..79
  bidirectional  position i (at or after the block's first mask j) predicts the AR continuation of
                 history + tokens[:j] at i, with confidence falling with the distance i - j; one in five
                 is a wrong, unsure guess; without the draft LoRA every guess is wrong and unsure
  cache          per-row token history; only `write` passes append (num_valid of them; a pass with a
                 causal flag per row: its causal rows), `trim` cuts,
                 and a pass that would run past max_len fails
So AR decoding is the chain of causal predictions, linear-spec drafts are sometimes right (partial
acceptance), dlm blocks take several passes at a threshold, and EOS appears only where a test makes
one of the produced ids the EOS (`with_eos`).
"""

from __future__ import annotations

import math

import torch

from nemodiff_compile.config import PRESETS
from nemodiff_compile.decoding import remask
from nemodiff_compile.decoding.denoiser import Denoiser, StepOut
from nemodiff_compile.decoding.noise import gumbel
from nemodiff_compile.decoding.refine import Refined

CFG = PRESETS["tiny"].replace(vocab_size=128)          # mask 100, eos 11, pad 0


def _h(*key) -> int:
    return hash(key) & 0x7FFFFFFF


def next_token(ctx: tuple[int, ...]) -> int:
    """The toy's AR prediction after `ctx`."""
    return 20 + _h(ctx, 1) % 60


def ar_chain(ctx: tuple[int, ...], n: int) -> list[int]:
    out = []
    for _ in range(n):
        t = next_token(ctx)
        out.append(t)
        ctx = ctx + (t,)
    return out


class ToyDenoiser(Denoiser):
    def __init__(self, config=CFG, max_len: int = 96, certain: bool = False, logits: bool = True):
        self.config, self.max_len, self.certain = config, max_len, certain   # certain: every confidence 1.0
        self.logits = logits                                                   # return the logits (validation)
        self.calls: list[dict] = []          # one per step: causal, write, draft_lora, shape, lengths
        self.hist: list[list[int]] = []

    def with_eos(self, eos: int) -> "ToyDenoiser":
        self.config = self.config.replace(eos_token_id=eos)
        return self

    def reset(self, batch: int) -> None:
        self.hist = [[] for _ in range(batch)]

    def lengths(self) -> torch.Tensor:
        return torch.tensor([len(h) for h in self.hist])

    def trim(self, lengths: torch.Tensor) -> None:
        assert all(int(n) <= len(h) for h, n in zip(self.hist, lengths)), "trim cannot grow a row"
        self.hist = [h[: int(n)] for h, n in zip(self.hist, lengths)]

    def _bidir(self, h: list[int], blk: list[int], i: int, lora: bool) -> tuple[int, float]:
        mask = self.config.mask_token_id
        j = blk.index(mask) if mask in blk else len(blk)
        if i < j:
            return blk[i], 0.99
        key = (tuple(h), tuple(blk), i)
        if not lora or _h(key, 2) % 5 == 0:
            return 20 + _h(key, 3) % 60, 0.2 + (_h(key, 4) % 100) / 1000
        tok = ar_chain(tuple(h + blk[:j]), i - j + 1)[-1]
        return tok, 0.97 * 0.8 ** (i - j) - (_h(key, 4) % 50) / 5000

    @torch.no_grad()
    def step(self, tokens, *, causal, write, num_valid=None, draft_lora=False, temperature=0.0, generator=None,
             noise=None, rows=None, embeds=None):
        """noise: a [B, L, V] Gumbel draw to use at temperature > 0 (else drawn from generator);
        rows: the rows of the batch this pass runs over (subset passes), default all; embeds: a prefill's
        image features (embeds.PrefillEmbeds): a position they cover reads as a token hashed from them."""
        B, L = tokens.shape                                           # [B, L]
        rows = list(range(len(self.hist))) if rows is None else list(rows)
        flags = causal.tolist() if isinstance(causal, torch.Tensor) else [bool(causal)] * B   # per row
        if isinstance(causal, torch.Tensor) and not getattr(self, "row_causal", False):
            raise RuntimeError("a causal flag per row to a denoiser without row_causal")
        if len(rows) != B or len(flags) != B or (write and not any(flags)):
            raise RuntimeError(f"a pass of {B} rows over rows {rows}, write={write}, causal={causal}")
        self.calls.append(dict(causal=causal if isinstance(causal, bool) else tuple(flags), write=write,
                               draft_lora=draft_lora, shape=(B, L),
                               lengths=self.lengths().tolist(), rows=rows, temperature=temperature,
                               batch=len(self.hist), embeds=embeds))
        V = self.config.vocab_size
        logits = torch.zeros(B, L, V)                                 # [B, L, V]
        for b, r in enumerate(rows):
            h, blk = self.hist[r], tokens[b].tolist()
            if embeds is not None:
                blk = [200 + _h(tuple(embeds.values[b, i].tolist()), 6) % 50 if embeds.mask[b, i] else t
                       for i, t in enumerate(blk)]
            n = L if num_valid is None else int(num_valid[b])
            if len(h) + L > self.max_len:
                raise RuntimeError(f"row {r}: {len(h)} + {L} positions past max_len {self.max_len}")
            for i in range(L):
                if flags[b]:
                    ctx = tuple(h + blk[: i + 1])
                    tok, p = next_token(ctx), 0.5 + (_h(ctx, 5) % 400) / 1000
                else:
                    tok, p = self._bidir(h, blk, i, draft_lora)
                logits[b, i, tok] = 200.0 if self.certain else math.log(p * (V - 1) / (1 - p))   # softmax: p
            if write and flags[b]:                                   # a mixed pass writes its causal rows
                self.hist[r] = h + blk[:n]
        if temperature > 0 and noise is None:
            noise = remask.gumbel_noise(logits.shape, generator)
        tok, conf = remask.pick(logits, temperature, noise if temperature > 0 else None)
        return StepOut(tok, conf, logits if self.logits else None)


class BatchToy(ToyDenoiser):
    """The toy with a backend's batching capabilities: `regroup` (rows carried over), subset passes, and with
    mixed=True a causal flag per row (`row_causal`: causal and bidirectional rows in one pass)."""

    can_regroup = True

    def __init__(self, subset: bool = True, mixed: bool = False, **kw):
        super().__init__(**kw)
        self.subset_passes, self.row_causal = subset, mixed
        self.regroups: list[tuple[list[int], int]] = []

    def regroup(self, keep: list[int], batch: int) -> None:
        if len(keep) > batch or len(set(keep)) != len(keep):
            raise ValueError(f"regroup {keep} into {batch}")
        self.regroups.append((list(keep), batch))
        self.hist = [self.hist[k] for k in keep] + [[] for _ in range(batch - len(keep))]


class HostRefiner:
    """A 'device' block refiner that runs the rules of refine.py with the toy's passes and reports `extra` wasted passes."""

    def __init__(self, den, extra):
        self.den, self.extra, self.seen = den, extra, []

    def refine(self, canvas, refining, quota, policy, noise=None):
        """noise: the run's GumbelStream for a sampled policy: pass s draws at counters + s (not advanced)."""
        assert (noise is None) == policy.greedy
        assert canvas.dtype == torch.long and refining.dtype == torch.bool                 # the contract's types
        assert quota is None or (quota.dtype == torch.long and quota.shape == (len(canvas), policy.steps))
        self.seen.append((canvas.clone(), refining.clone(), None if quota is None else quota.clone()))
        row_nfe, nfe = torch.zeros(len(canvas), dtype=torch.long), 0
        for s in range(policy.passes):
            masked = canvas == self.den.config.mask_token_id
            refining &= masked.any(1) & ~remask.eos_complete(canvas, masked, self.den.config.eos_ids)
            if not refining.any():
                break
            kw = {} if noise is None else dict(temperature=policy.temperature, noise=gumbel(
                noise.keys, noise.counters + s, canvas.shape[1], self.den.config.vocab_size))
            out = self.den.step(canvas, causal=False, write=False, **kw)
            masked &= refining[:, None]
            commit = (remask.commit_topk(out.conf, masked, quota[:, s]) if quota is not None
                      else remask.commit_threshold(out.conf, masked, policy.threshold))
            canvas = torch.where(commit, out.token, canvas)
            row_nfe += refining.long()
            nfe += 1
        return Refined(canvas, row_nfe, nfe, nfe + self.extra)
