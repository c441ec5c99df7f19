"""The compiled refinement loop: a block's refinement passes run through a step graph with the remask stage.

Engines built with `--remask onnx|plugin` carry one refinement pass of a block in their step graph
(artifact/spec.py, stage I/O version 2): canvas in; the stop rule, the commit rule, the updated canvas,
commit flags, per-row pass counts and a done flag out. `StageRefiner` is the `BlockRefiner` of
decoding/refine.py over such a graph, written once for every backend that runs it (ONNX Runtime,
TensorRT); the backend supplies only how one pass is enqueued over pinned buffers (`StagePasses`).

Per block:
  host -> device  the block's canvas, active rows, fixed-steps quota, zeroed counters (writes only)
  per pass       one enqueue reading parity p = s % 2 and writing parity 1 - p (ping-pong buffers: the
                 canvas never leaves the device and no buffer is both input and output of a pass);
                 input_ids is bound to the same buffer as canvas
  every check_every passes   one host read: the done flag ([] bool)
  end of block   one host read each of the final canvas [B, L] and row_nfe [B]; nfe = max(row_nfe)
                 (rows stop for good, so the passes any row refined in are the longest row's)
The buffers of a (bucket, block length) are allocated once and never move, so a backend may bind them
once per parity and replay a captured CUDA graph per (bucket, block, parity).

Which policies a graph serves: every greedy fixed-steps policy (the schedule is the `quota` input), and
greedy threshold policies with exactly the threshold fixed at export (`--remask-threshold`, recorded in
`extra["remask"]`; a graph built with `--remask-threshold topk` has none). The host feeds quota -1 to
ask for the threshold rule. `stage_serves` says so; for any other policy `block_refiner` returns None and
the decode loop runs the block's passes on the host through `step` (same tokens, one host read per pass).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..decoding.policy import DecodePolicy
from ..decoding.refine import Refined, drive

# names of the stage's I/O (artifact/spec.py)
STAGE_INPUTS = ("canvas", "active", "quota", "row_nfe")
STAGE_OUTPUTS = ("canvas_out", "commit", "row_nfe_out", "done")


def stage_serves(stage: dict[str, Any] | None, policy: DecodePolicy) -> bool:
    """Whether a graph's remask stage (spec.extra["remask"]) runs `policy`'s refinement passes exactly:
    every fixed-steps policy (the schedule is an input), and the threshold it was exported with."""
    if stage is None or policy.mode != "dlm" or not policy.greedy:
        return False
    if policy.steps is not None:
        return True
    return stage["policy"] == "threshold" and float(stage["threshold"]) == float(policy.threshold)


def idle_stage_feeds(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stage's inputs for a pass that is not a refinement pass (prefill, commit, decode, draft,
    verify): no active row, so nothing commits. tokens [B, L] on the device (bound as the canvas too)."""
    B, L = tokens.shape
    dev = tokens.device
    return {"canvas": tokens, "active": torch.zeros(B, dtype=torch.bool, device=dev),
            "quota": torch.zeros(B, L, dtype=torch.long, device=dev),
            "row_nfe": torch.zeros(B, dtype=torch.long, device=dev)}


@dataclass
class LoopBuffers:
    """Every tensor one refinement pass binds, for one (bucket, block length); allocated once."""
    rows: int                                                          # the bucket
    block: int                                                         # canvas positions
    feeds: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]     # parity -> graph input name -> tensor
    outputs: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]   # parity -> graph output name -> tensor

    @property
    def done(self) -> torch.Tensor:
        return self.outputs[0]["done"]                                 # shared by both parities

    def state(self, parity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(canvas [P, L], row_nfe [P]) that a pass of this parity reads."""
        return self.feeds[parity]["canvas"], self.feeds[parity]["row_nfe"]


def loop_buffers(spec, *, rows: int, block: int, vocab: int, device: torch.device, dtypes: dict[str, torch.dtype],
                 cache: tuple[torch.Tensor, torch.Tensor]) -> LoopBuffers:
    """The pinned buffers of a refinement pass over `rows` rows (the bucket) and a `block`-position canvas.
    spec: the IOSpec; dtypes: I/O spec dtype name -> torch dtype; cache: the backend's (K, V)."""
    z = lambda *shape, dt=torch.long: torch.zeros(shape, dtype=dt, device=device)
    canvas, row_nfe = (z(rows, block), z(rows, block)), (z(rows), z(rows))
    causal = z(rows, dt=torch.bool) if spec.causal_per_row else z(dt=torch.bool)   # [rows], older graphs []
    shared = {"cache_lengths": z(rows), "num_valid": z(rows), "causal": causal,
              "temperature": z(dt=torch.float32), "gumbel_noise": z(rows, block, vocab, dt=torch.float32),
              "past_keys": cache[0], "past_values": cache[1], "draft_lora": z(dt=torch.bool),
              "active": z(rows, dt=torch.bool), "quota": z(rows, block)}
    dims = {"batch": rows, "block": block}
    scratch = {t.name: torch.zeros([dims.get(d, d) for d in t.shape], dtype=dtypes[t.dtype], device=device)
               for t in spec.outputs if t.name not in ("canvas_out", "row_nfe_out")}
    feeds, outputs = [], []
    for p in (0, 1):
        f = {"input_ids": canvas[p], "canvas": canvas[p], "row_nfe": row_nfe[p], **shared}
        feeds.append({t.name: f[t.name] for t in spec.inputs})
        outputs.append({**scratch, "canvas_out": canvas[1 - p], "row_nfe_out": row_nfe[1 - p]})
    return LoopBuffers(rows, block, tuple(feeds), tuple(outputs))


class StagePasses(Protocol):
    """What a backend gives `StageRefiner` (OrtDenoiser, TrtDenoiser)."""
    config: Any
    bucket: int

    def check_pass(self, batch: int, block: int, *, causal: bool = False, write: bool = False) -> None: ...
    def lengths(self) -> torch.Tensor: ...
    def stage_buffers(self, block: int) -> LoopBuffers:
        """The pinned buffers for the current bucket and this block length (made once)."""
    def stage_pass(self, bufs: LoopBuffers, parity: int) -> None:
        """Enqueue one refinement pass reading parity `parity` (no host read, no host sync)."""


class StageRefiner:
    """decoding/refine.py's `BlockRefiner` over a step graph with the remask stage (module docstring)."""

    def __init__(self, backend: StagePasses, stage: dict[str, Any]):
        self.backend, self.stage = backend, stage
        self.host_reads = 0          # device -> host reads so far (done flags and final results)

    @torch.no_grad()
    def refine(self, canvas: torch.Tensor, refining: torch.Tensor, quota: torch.Tensor | None,
               policy: DecodePolicy, noise=None) -> Refined:
        if noise is not None or not policy.greedy:     # block_refiner never hands out a sampled policy
            raise ValueError("the compiled remask stage refines greedy policies only")
        be = self.backend
        B, blen = canvas.shape
        be.check_pass(B, blen)
        bufs = be.stage_buffers(blen)
        P = be.bucket
        with getattr(be, "on_stream", nullcontext)():
            c0, n0 = bufs.state(0)
            f = bufs.feeds[0]
            c0.fill_(be.config.mask_token_id)                 # padding rows: all masks, never active
            c0[:B].copy_(canvas)
            n0.zero_()
            f["active"].zero_()
            f["active"][:B].copy_(refining)
            if quota is not None:                               # pass s commits quota[:, s] (top-k rule)
                f["quota"].zero_()
                f["quota"][:B, : quota.shape[1]].copy_(quota)
            else:                                               # -1: the graph's threshold rule
                f["quota"].fill_(-1)
            lengths = torch.zeros(P, dtype=torch.long)
            lengths[:B] = be.lengths()
            f["cache_lengths"].copy_(lengths)
            f["num_valid"].fill_(blen)
            runs = [0]

            def one_pass():
                be.stage_pass(bufs, runs[0] % 2)
                runs[0] += 1

            executed = drive(one_pass, lambda: bool(self._read(bufs.done)), policy.passes, policy.check_every)
            canvas_out, row_nfe = (self._read(t[:B]) for t in bufs.state(executed % 2))
        be.executed += executed
        nfe = int(row_nfe.max()) if B else 0
        return Refined(canvas_out, row_nfe, nfe, executed)

    def _read(self, t: torch.Tensor) -> torch.Tensor:
        """The one way results come back to the host (counted)."""
        self.host_reads += 1
        return t.to("cpu", copy=True)
