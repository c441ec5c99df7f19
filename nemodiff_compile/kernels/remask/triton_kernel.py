"""Triton implementation of `nemodiff::Remask` (CUDA, or the CPU interpreter with TRITON_INTERPRET=1).

Two launches per refinement pass:
  _pick      one program per (row, position): a single sweep over the vocabulary keeping the running
             max, its first index and the rescaled sum of exponentials (online softmax), so the
             [B, L, V] probabilities are never written; confidence = exp(l[token] - max) / sum.
  _commit    one program per row: the commit rule over the block (threshold with at-least-one, or
             top-k by rank), writing canvas_out and the commit flags.
Ties go to the lower vocabulary index and the lower position, as torch's argmax/stable sort give.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..rounding import round_as


@triton.jit
def _pick(logits_ptr, noise_ptr, token_ptr, conf_ptr, V, temperature,
          HAS_NOISE: tl.constexpr, ROUND_BF16: tl.constexpr, ROUND_FP16: tl.constexpr,
          BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * V
    offs = tl.arange(0, BLOCK_V)
    m = -float("inf")                 # running max of the raw logits
    s = 0.0                           # sum of exp(l - m)
    best = -float("inf")              # running max of the pick score (logits, or logits + T * noise)
    best_i = 0
    best_l = 0.0                      # raw logit at best_i
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        ok = idx < V
        x = tl.load(base + idx, mask=ok, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.where(ok, tl.exp(x - m_new), 0.0), 0)
        m = m_new
        if HAS_NOISE:
            g = tl.load(noise_ptr + row * V + idx, mask=ok, other=0.0).to(tl.float32)
            score = tl.where(ok, x + temperature * g, -float("inf"))
        else:
            score = x
        c_best = tl.max(score, 0)
        c_i = tl.min(tl.where(score == c_best, idx, V), 0)           # first index of the chunk's max
        c_l = tl.sum(tl.where(idx == c_i, x, 0.0), 0)
        take = c_best > best                                         # strict: earlier chunks win ties
        best_l = tl.where(take, c_l, best_l)
        best_i = tl.where(take, c_i, best_i)
        best = tl.where(take, c_best, best)
    conf = tl.exp(best_l - m) / s
    if ROUND_BF16:                    # the reference's softmax returns the logits' dtype
        conf = round_as(conf, tl.bfloat16)
    if ROUND_FP16:
        conf = round_as(conf, tl.float16)
    tl.store(token_ptr + row, best_i.to(tl.int64))
    tl.store(conf_ptr + row, conf)


@triton.jit
def _commit(canvas_ptr, token_ptr, conf_ptr, active_ptr, quota_ptr, out_ptr, commit_ptr, L, mask_id,
            threshold, TOPK: tl.constexpr, BLOCK_L: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pos = tl.arange(0, BLOCK_L)
    ok = pos < L
    canvas = tl.load(canvas_ptr + b * L + pos, mask=ok, other=0)
    token = tl.load(token_ptr + b * L + pos, mask=ok, other=0)
    conf = tl.load(conf_ptr + b * L + pos, mask=ok, other=0.0)
    active = tl.load(active_ptr + b) != 0
    masked = ok & (canvas == mask_id) & active
    score = tl.where(masked, conf, -1.0)                             # conf in [0, 1]; -1: not masked
    if TOPK:
        # rank[i] = positions ahead of i: a higher score, or the same score at a lower position
        si = score[:, None]
        sj = score[None, :]
        ahead = (sj > si) | ((sj == si) & (pos[None, :] < pos[:, None]))
        ahead = ahead & ok[None, :]
        rank = tl.sum(ahead.to(tl.int32), 1)
        quota = tl.load(quota_ptr + b)
        commit = masked & (rank < quota)
    else:
        top = tl.max(score, 0)
        first = tl.min(tl.where(score == top, pos, BLOCK_L), 0)
        commit = masked & ((pos == first) | (conf >= threshold))
    tl.store(out_ptr + b * L + pos, tl.where(commit, token, canvas), mask=ok)
    tl.store(commit_ptr + b * L + pos, commit.to(tl.int8), mask=ok)


def pick(logits: torch.Tensor, temperature: float = 0.0, noise: torch.Tensor | None = None,
         *, out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, L, V] -> token [B, L] int64, conf [B, L] float32 (`decoding.remask.pick`)."""
    B, L, V = logits.shape
    logits = logits.contiguous()
    if temperature > 0 and noise is None:
        raise ValueError("temperature > 0 needs Gumbel noise")
    token, conf = out if out is not None else (
        torch.empty(B, L, dtype=torch.int64, device=logits.device),
        torch.empty(B, L, dtype=torch.float32, device=logits.device))
    has_noise = temperature > 0
    _pick[(B * L,)](logits, noise.contiguous() if has_noise else logits, token, conf, V,
                    float(temperature), HAS_NOISE=has_noise,
                    ROUND_BF16=logits.dtype == torch.bfloat16, ROUND_FP16=logits.dtype == torch.float16,
                    BLOCK_V=min(4096, triton.next_power_of_2(V)))
    return token, conf


def commit(canvas: torch.Tensor, token: torch.Tensor, conf: torch.Tensor, active: torch.Tensor,
           quota: torch.Tensor | None, *, mask_id: int, threshold: float | None,
           out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The commit rule over each row's block -> canvas_out [B, L] int64, commit [B, L] bool."""
    B, L = canvas.shape
    topk = threshold is None
    if topk and quota is None:
        raise ValueError("the top-k policy (threshold None) needs a quota per row")
    canvas_out, flags = out if out is not None else (
        torch.empty_like(canvas), torch.empty(B, L, dtype=torch.bool, device=canvas.device))
    flags_i8 = flags.view(torch.int8)
    _commit[(B,)](canvas.contiguous(), token.contiguous(), conf.contiguous(), active.contiguous(),
                  quota if topk else active, canvas_out, flags_i8, L, int(mask_id),
                  0.0 if topk else float(threshold), TOPK=topk, BLOCK_L=triton.next_power_of_2(L))
    return canvas_out, flags


def remask_triton(logits: torch.Tensor, canvas: torch.Tensor, active: torch.Tensor,
                  quota: torch.Tensor | None = None, *, mask_id: int, threshold: float | None,
                  temperature: float = 0.0, noise: torch.Tensor | None = None):
    """Same contract as `reference.remask_reference`."""
    token, conf = pick(logits, temperature, noise)
    canvas_out, flags = commit(canvas, token, conf, active, quota, mask_id=mask_id, threshold=threshold)
    return canvas_out, token, conf, flags
