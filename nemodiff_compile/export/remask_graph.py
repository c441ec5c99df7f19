"""The remask stage inside the exported step: the commit rule in standard ops, or the plugin node.

`commit_by_rank` is the rule of `decoding.remask` (threshold: top-1 masked + masked with conf >=
threshold; top-k: the quota[b] most confident masked; ties to the lower position) written without
sort, TopK or ArgMax, whose tie order TensorRT does not promise: each position's rank is the number
of positions ahead of it, counted pairwise over the block ([B, L, L] booleans; L is the block length).
"""

from __future__ import annotations

import torch

from ..kernels.remask.spec import REMASK


def commit_by_rank(conf: torch.Tensor, masked: torch.Tensor, threshold: float | None,
                   quota: torch.Tensor) -> torch.Tensor:
    """conf [B, L] float32, masked [B, L] bool, quota [B] int64 -> commit [B, L] bool."""
    score = torch.where(masked, conf, torch.full_like(conf, -1.0))           # conf in [0, 1]
    idx = torch.arange(score.shape[1], device=score.device)
    s_i, s_j = score[:, :, None], score[:, None, :]                           # [B, L, 1], [B, 1, L]
    ahead = (s_j > s_i) | ((s_j == s_i) & (idx[None, None, :] < idx[None, :, None]))
    rank = ahead.to(torch.int64).sum(-1)                                     # [B, L]
    if threshold is None:
        return masked & (rank < quota[:, None])
    return masked & ((rank == 0) | (conf >= threshold))


def remask_plugin_node(logits, canvas, active, quota, noise, opts: dict):
    """One `nemodiff::Remask` node (name/version/namespace from kernels/remask/spec.py); noise is
    already temperature-scaled, so the node's temperature attribute is 1."""
    threshold = opts["threshold"]
    attrs = {"mask_id": int(opts["mask_id"]), "policy": opts["policy"],
             "threshold": float(threshold if threshold is not None else 0.0), "temperature": 1.0,
             "plugin_version": REMASK.version, "plugin_namespace": REMASK.namespace}
    shape = list(canvas.shape)
    return torch.onnx.ops.symbolic_multi_out(
        f"{REMASK.namespace}::{REMASK.name}", (logits, canvas, active, quota, noise), attrs,
        dtypes=(torch.int64, torch.int64, torch.float32, torch.bool), shapes=(shape, shape, shape, shape),
        version=int(REMASK.version))
