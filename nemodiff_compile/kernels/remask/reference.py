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
