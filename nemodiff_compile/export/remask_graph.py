"""The remask stage inside the exported step: one refinement pass of a diffusion block (decoding/refine.py).

`remask_stage` is the whole stage, on top of the step's logits:
  refining   active & the block still has a mask before its first EOS (the stop rule)
  quota      the row's fixed-steps quota for its pass index row_nfe (quota[b, row_nfe[b]])
  pick       token / confidence (argmax or Gumbel-max, max-softmax): standard ops, or inside the plugin
  commit     the commit rule among the masked positions of refining rows, in standard ops
             (`commit_by_rank`) or one `nemodiff::Remask` node (variant "plugin")
  counters   row_nfe_out = row_nfe + refining; done = no row of the new canvas refines any more
`commit_by_rank` is the rule of `decoding.remask`, per row: a row with quota >= 0 commits its quota most
confident masked positions (top-k, the fixed-steps schedule), a row with quota < 0 the threshold rule
(top-1 masked + masked with conf >= the threshold baked at export; nothing in a top-k-only graph); ties
to the lower position. So one graph serves the fixed-steps policy and its threshold. It is written
without sort, TopK or ArgMax, whose tie order TensorRT does not promise: each position's rank is the
number of positions ahead of it, counted pairwise over the block ([B, L, L] booleans; L is the block
length).
The stop rule uses first positions (ReduceMin) rather than a cumulative sum.

The plugin node takes and gives no BOOL tensors (TensorRT documents kBOOL as unsupported at a plugin's
boundary): `active` goes in as INT32 and `commit` comes out as INT32, cast in the graph.
"""

from __future__ import annotations

import torch

from ..kernels.remask.spec import REMASK

_FAR = 1 << 30          # "no such position": past any block


def still_refining(canvas: torch.Tensor, mask_id: int, eos_ids) -> torch.Tensor:
    """canvas [B, L] int64 -> [B] bool: the block has a mask before its first EOS (refine.py's stop rule:
    a mask left, and not `eos_complete`)."""
    pos = torch.arange(canvas.shape[1], device=canvas.device)[None, :]                  # [1, L]
    far = torch.full_like(canvas, _FAR)
    is_eos = canvas == int(eos_ids[0])                                                   # [B, L]
    for e in eos_ids[1:]:                   # a handful of ids, as graph constants (no tensor to bind)
        is_eos = is_eos | (canvas == int(e))
    first_mask = torch.where(canvas == mask_id, pos, far).amin(1)                        # [B]
    first_eos = torch.where(is_eos, pos, far).amin(1)
    return first_mask < first_eos


def commit_by_rank(conf: torch.Tensor, masked: torch.Tensor, threshold: float | None,
                   quota: torch.Tensor) -> torch.Tensor:
    """conf [B, L] float32, masked [B, L] bool, quota [B] int64 (< 0: the threshold rule) -> commit [B, L] bool."""
    score = torch.where(masked, conf, torch.full_like(conf, -1.0))           # conf in [0, 1]
    idx = torch.arange(score.shape[1], device=score.device)
    s_i, s_j = score[:, :, None], score[:, None, :]                           # [B, L, 1], [B, 1, L]
    ahead = (s_j > s_i) | ((s_j == s_i) & (idx[None, None, :] < idx[None, :, None]))
    rank = ahead.to(torch.int64).sum(-1)                                     # [B, L]
    topk = masked & (rank < quota[:, None])
    if threshold is None:
        return topk
    by_quota = quota[:, None] >= 0                       # [B, 1]; And/Or, not Where: ORT's CPU Where has no bool
    return (by_quota & topk) | (~by_quota & masked & ((rank == 0) | (conf >= threshold)))


def remask_stage(logits, noise, canvas, active, quota, row_nfe, opts: dict):
    """logits [B, L, V], noise [B, L, V] (temperature-scaled), canvas [B, L] int64, active [B] bool,
    quota [B, L] int64, row_nfe [B] int64 -> token, conf, canvas_out, commit, row_nfe_out, done."""
    mask_id, eos = int(opts["mask_id"]), opts["eos_ids"]
    refining = active & still_refining(canvas, mask_id, eos)                             # [B]
    q = quota.gather(1, row_nfe[:, None])[:, 0]                                          # [B]
    if opts["variant"] == "plugin":
        canvas_out, token, conf, commit = remask_plugin_node(logits, canvas, refining.to(torch.int32), q, noise,
                                                             opts)
        commit = commit != 0
    else:
        scores = logits.float() + noise                                                  # [B, L, V]
        token = scores.argmax(-1)                                                        # [B, L]
        conf = torch.softmax(logits, dim=-1).gather(-1, token[..., None])[..., 0].float()  # [B, L]
        masked = (canvas == mask_id) & refining[:, None]
        commit = commit_by_rank(conf, masked, opts["threshold"], q)
        canvas_out = torch.where(commit, token, canvas)
    row_nfe_out = row_nfe + refining.to(torch.int64)
    done = ~(active & still_refining(canvas_out, mask_id, eos)).any()
    return token, conf, canvas_out, commit, row_nfe_out, done


def remask_plugin_node(logits, canvas, active, quota, noise, opts: dict):
    """One `nemodiff::Remask` node (name/version/namespace from kernels/remask/spec.py); active [B] int32,
    noise already temperature-scaled (so the node's temperature attribute is 1) -> canvas_out, token,
    conf, commit [B, L] int32."""
    threshold = opts["threshold"]
    attrs = {"mask_id": int(opts["mask_id"]), "policy": opts["policy"],
             "threshold": float(threshold if threshold is not None else 0.0), "temperature": 1.0,
             "plugin_version": REMASK.version, "plugin_namespace": REMASK.namespace}
    shape = list(canvas.shape)
    outs = torch.onnx.ops.symbolic_multi_out(
        f"{REMASK.namespace}::{REMASK.name}", (logits, canvas, active, quota, noise), attrs,
        dtypes=(torch.int64, torch.int64, torch.float32, torch.int32), shapes=(shape, shape, shape, shape),
        version=int(REMASK.version))
    # the symbolic op's outputs are made on the CPU; the traced step runs on the meta device (no-op in ONNX)
    return tuple(o.to(canvas.device) for o in outs)
