"""Torch reference of `nemodiff::Remask`, built from the sampling rules the decode loops use."""

from __future__ import annotations

import torch

from ...decoding import remask


def remask_reference(logits: torch.Tensor, canvas: torch.Tensor, active: torch.Tensor,
                     quota: torch.Tensor | None = None, *, mask_id: int, threshold: float | None,
                     temperature: float = 0.0, noise: torch.Tensor | None = None):
    """logits [B, L, V], canvas [B, L] int64, active [B] bool, quota [B] int64 (threshold None: top-k)
    -> canvas_out [B, L] int64, token [B, L] int64, conf [B, L] float32, commit [B, L] bool."""
    token, conf = remask.pick(logits, temperature, noise)
    masked = (canvas == mask_id) & active[:, None]
    if threshold is None:
        if quota is None:
            raise ValueError("the top-k policy (threshold None) needs a quota per row")
        commit = remask.commit_topk(conf, masked, quota)
    else:
        commit = remask.commit_threshold(conf, masked, threshold)
    return torch.where(commit, token, canvas), token, conf, commit


def stage_commit(conf: torch.Tensor, masked: torch.Tensor, quota: torch.Tensor, *, policy: str,
                 threshold: float) -> torch.Tensor:
    """The rule of the exported remask stage (export/remask_graph.py) and of the plugin node: policy "topk"
    commits quota[b] per row; policy "threshold" per row: quota[b] >= 0 the top-k rule, < 0 the threshold
    rule. conf [B, L], masked [B, L] bool, quota [B] int64 -> commit [B, L] bool."""
    topk = remask.commit_topk(conf, masked, quota.clamp(min=0))
    if policy == "topk":
        return topk
    return torch.where(quota[:, None] >= 0, topk, remask.commit_threshold(conf, masked, threshold))


def remask_node(logits, canvas, active, quota, noise, *, mask_id: int, policy: str, threshold: float,
                temperature: float):
    """The `nemodiff::Remask` node (kernels/remask/spec.py): active [B] bool (or 0/1), quota [B] int64 ->
    canvas_out, token, conf, commit [B, L] bool."""
    token, conf = remask.pick(logits, temperature, noise if temperature > 0 else None)
    masked = (canvas == mask_id) & (active != 0)[:, None]
    commit = stage_commit(conf, masked, quota, policy=policy, threshold=threshold)
    return torch.where(commit, token, canvas), token, conf, commit
