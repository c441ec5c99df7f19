"""The optional capability of a `Denoiser` to refine a whole diffusion block on its device.

`loops.diffusion_generate` is the only block-diffusion loop. For each block it either runs the
refinement passes itself (one `step` per pass, token and confidence back on the host, the commit
rule applied there) or, when the backend declares a `BlockRefiner` for the policy
(`Denoiser.block_refiner(policy)`, None by default) and the policy allows it (greedy, untraced),
hands the block to the refiner: canvas in, finished canvas and pass counts out. A backend that can
sample (temperature > 0) accepts such policies in `block_refiner` and gets the run's `GumbelStream`
(noise.py): pass s of the block draws each row's noise at `counters + s` on the device, exactly the
host loop's draw for that pass; the loop then advances the stream by the host loop's passes (`nfe`).
A backend that cannot (a compiled remask stage that only runs greedy rules) returns None for them. Inside a block the
refiner reads only a done flag (rows still refining?) every `policy.check_every` passes; its passes
follow the host loop's rules exactly, so tokens, NFE and per-row NFE are the host loop's:

  per pass   refining &= (block has a mask) & ~(block has an EOS with no mask before it)
             commit the policy's positions among the masked positions of refining rows
             (threshold rule, or quota[:, pass] of them for the fixed-steps schedule)
             canvas = committed ? candidate : canvas;  row_nfe += refining;  nfe += any(refining)
  passes     at most policy.passes (steps, or one per position); a pass after every row stopped
             commits nothing, so reading the done flag late only wastes passes (`executed` counts them)

The causal commit pass that writes the block's K/V stays with the loop (a plain `step`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .noise import GumbelStream
    from .policy import DecodePolicy


@dataclass
class Refined:
    canvas: torch.Tensor        # [B, L] int64 on the host: the block after its last refinement pass
    row_nfe: torch.Tensor       # [B] int64: passes each row was still refining in (the host loop's count)
    nfe: int                    # passes the host loop would have run for this block
    executed: int               # passes the device ran (>= nfe)


class BlockRefiner(Protocol):
    def refine(self, canvas: torch.Tensor, refining: torch.Tensor, quota: torch.Tensor | None,
               policy: "DecodePolicy", noise: "GumbelStream | None" = None) -> Refined:
        """canvas [B, L] int64 (host): [seed, MASK, ...]; refining [B] bool (host): rows still generating;
        quota [B, policy.steps] int64: masks to commit per pass (fixed-steps policy), else None;
        noise: the run's stream when policy.temperature > 0 (read, not advanced), else None.
        The rows sit at the lengths of the backend's last `step`; the cache is read, never written."""


def drive(one_pass: Callable[[], None], done: Callable[[], bool], passes: int, check_every: int) -> int:
    """Enqueue up to `passes` passes, asking `done()` (the one host read) after every check_every-th;
    returns how many ran."""
    for s in range(passes):
        one_pass()
        if (s + 1) % check_every == 0 and s + 1 < passes and done():
            return s + 1
    return passes
