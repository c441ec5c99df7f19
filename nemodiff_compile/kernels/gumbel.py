"""Gumbel-max picking with the noise computed where it is used: `decoding.remask.pick` at temperature T over
the counter-based noise of `decoding.noise.gumbel`, without writing the [B, L, V] float64 noise.

  gumbel_pick_torch   the definition: noise.gumbel(keys, counters, L, V) then remask.pick (float64 scores)
  gumbel_pick         dispatch: the Triton kernel (gumbel_triton.py) for CUDA tensors, else the definition

The kernel sweeps each (row, position)'s vocabulary once: online softmax of the raw logits for the
confidence (as the remask kernel does) and, per element, the same integer hash as noise.py (32-bit lanes),
u in float64 and g = -log(-log(u)), the score logits (as float64) + T * g, first index of the max. Same
tokens as the definition, bit for bit where the device's float64 log is the one torch uses (CUDA's); the
confidence as the remask kernel computes it. If the kernel cannot be built on this machine (a Triton
without float64 log, say) the first call says so once on stderr and the definition is used from then on.
"""

from __future__ import annotations

import sys

import torch

from . import triton_usable

_broken: str | None = None


def gumbel_pick_torch(logits: torch.Tensor, keys: torch.Tensor, counters: torch.Tensor, temperature: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, L, V]; keys, counters [B] int64 (same device) -> token [B, L] int64, conf [B, L] float32."""
    from ..decoding import remask
    from ..decoding.noise import gumbel

    B, L, V = logits.shape
    return remask.pick(logits, temperature, gumbel(keys, counters, L, V))


def gumbel_pick(logits, keys, counters, temperature: float):
    global _broken
    if _broken is None and triton_usable(logits):
        try:
            from .gumbel_triton import gumbel_pick_triton
            return gumbel_pick_triton(logits, keys, counters, temperature)
        except Exception as e:                   # compile-time failure: fall back for good, say it once
            _broken = f"{type(e).__name__}: {e}".splitlines()[0]
            print(f"[nemodiff] fused Gumbel-max kernel unavailable ({_broken}); using torch", file=sys.stderr)
    return gumbel_pick_torch(logits, keys, counters, temperature)
