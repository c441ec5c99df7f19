"""Token picking and the commit ("remask") rules of block diffusion. Pure tensor code, no host syncs.

Definitions (upstream `generate`, research note §4):
  candidate  argmax over the vocabulary of logits + T * Gumbel noise (T = 0: plain argmax); the same
             as sampling from softmax(logits / T)
  confidence softmax(logits)[candidate], from the raw logits (no temperature, no noise), computed in
             the logits' dtype (bf16 on the real model) as the shipped code does
  threshold  commit the most confident masked position, plus every other masked position whose
             confidence >= threshold
  top-k      commit the k most confident masked positions (LLaDA-style fixed-steps schedule)
Ties are broken towards the lower position, so every backend commits the same set.
"""

from __future__ import annotations

import torch

from .noise import GumbelStream


def gumbel_noise(shape: torch.Size | tuple[int, ...], generator: "torch.Generator | GumbelStream | None",
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard Gumbel noise, float64 (upstream draws its uniforms in float64). The decode loops pass a
    `GumbelStream` (noise.py: counter-based, so device loops draw the same); a torch.Generator still works."""
    if isinstance(generator, GumbelStream):
        return generator.draw(shape, device)
    u = torch.rand(shape, dtype=torch.float64, generator=generator, device=device)
    return -torch.log(-torch.log(u.clamp_min(1e-300)))


def pick(logits: torch.Tensor, temperature: float = 0.0, noise: torch.Tensor | None = None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [..., V] -> (candidate [...] int64, confidence [...] float32)."""
    if temperature > 0:
        if noise is None:
            raise ValueError("temperature > 0 needs Gumbel noise")
        cand = (logits.double() + temperature * noise).argmax(-1)
    else:
        cand = logits.argmax(-1)
    conf = torch.softmax(logits, dim=-1).gather(-1, cand[..., None])[..., 0]
    return cand, conf.float()


def top1(conf: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """conf [B, L], masked [B, L] bool -> [B, L] bool: the most confident masked position of each row."""
    score = conf.masked_fill(~masked, -1.0)                  # conf is in [0, 1]; -1 marks "not masked"
    best = torch.zeros_like(masked)
    best.scatter_(1, score.argmax(1, keepdim=True), True)    # argmax: first index on ties
    return masked & best


def commit_threshold(conf: torch.Tensor, masked: torch.Tensor, threshold: float) -> torch.Tensor:
    """conf [B, L], masked [B, L] bool -> commit [B, L] bool: top-1 masked + masked with conf >= threshold."""
    return top1(conf, masked) | (masked & (conf >= threshold))


def commit_topk(conf: torch.Tensor, masked: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """conf [B, L], masked [B, L] bool, k [B] int -> commit [B, L] bool: the k[b] most confident masked."""
    score = conf.masked_fill(~masked, -1.0)
    order = torch.sort(score, dim=1, descending=True, stable=True).indices     # [B, L]
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return masked & (rank < k[:, None])


def even_split(num_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """num_masked [B] -> quota [B, steps]: an even split over the passes, remainder to the first ones."""
    base = num_masked[:, None] // steps
    rem = num_masked[:, None] % steps
    return base + (torch.arange(steps, device=num_masked.device)[None, :] < rem).long()


def eos_mask(t: torch.Tensor, eos: tuple[int, ...] | torch.Tensor) -> torch.Tensor:
    """[...] bool: t is one of the EOS ids (a tuple, or already a tensor on t's device for graph-captured callers)."""
    if not isinstance(eos, torch.Tensor):
        eos = torch.tensor(eos, dtype=t.dtype, device=t.device)
    return (t[..., None] == eos).any(-1)                  # a handful of ids: no sort, no host sync


def eos_complete(blk: torch.Tensor, masked: torch.Tensor, eos: tuple[int, ...] | torch.Tensor) -> torch.Tensor:
    """[B] bool: the block holds an EOS with no mask before its first EOS (the row is finished)."""
    is_eos = eos_mask(blk, eos)
    before_first = torch.cumsum(is_eos.long(), dim=1) == 0
    return is_eos.any(1) & ~(masked & before_first).any(1)
