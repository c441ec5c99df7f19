"""Per-pass comparison of two `StepOut`s computed on identical inputs: logits, confidence, token ids,
and the set of positions the decode rule commits. Pure tensor code; Polygraphy is imported late."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def valid_positions(tokens: torch.Tensor, num_valid: torch.Tensor | None) -> torch.Tensor:
    """tokens [B, L], num_valid [B] or None -> [B, L] bool: the real (not right-padding) positions."""
    B, L = tokens.shape
    if num_valid is None:
        return torch.ones(B, L, dtype=torch.bool)
    return torch.arange(L)[None, :] < num_valid.cpu()[:, None]


def token_matches(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> int:
    """a, b [B, L] int64, valid [B, L] bool -> number of valid positions with equal ids."""
    return int(((a == b) & valid).sum())


def conf_max_abs_diff(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> float:
    if not bool(valid.any()):
        return 0.0
    return float((a.float() - b.float()).abs()[valid].max())


def logits_metrics(eng: torch.Tensor, ref: torch.Tensor, valid: torch.Tensor,
                   atol: float | None, rtol: float | None) -> dict:
    """eng, ref [B, L, V] (any float dtype, any device), valid [B, L] -> error metrics over valid rows.

    close: Polygraphy's elementwise verdict (|e-r| <= atol or |e-r| <= rtol*|r| everywhere), None if
    atol/rtol are not enforced. cosine_min: the smallest per-position cosine similarity.
    """
    vm = valid.to(eng.device)
    e = eng[vm].float().cpu()                                                    # [N, V]
    r = ref.to(eng.device)[vm].float().cpu()                                     # [N, V]
    if e.numel() == 0:
        return dict(max_abs_diff=0.0, max_rel_diff=0.0, mean_abs_diff=0.0, cosine_min=1.0,
                    close=None if atol is None else True)
    cos = torch.nn.functional.cosine_similarity(e.double(), r.double(), dim=-1)  # [N]
    cosine_min = float(cos.min()) if not bool(torch.isnan(cos).any()) else math.nan
    stats = _error_stats(e, r, atol, rtol)
    stats["cosine_min"] = cosine_min
    return stats


def position_divergence(eng: torch.Tensor, ref: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """eng, ref [B, L, V] logits, valid [B, L] -> per valid position (row-major order), float32 [N]:
    cos  the cosine of the two logit vectors
    kl   KL(reference || engine) of the two softmax distributions, in nats
    row  the batch row of each position (int64), to attribute it to its prompt"""
    vm = valid.to(eng.device)
    e = eng[vm].double().cpu()                                                   # [N, V]
    r = ref.to(eng.device)[vm].double().cpu()                                    # [N, V]
    rows = torch.arange(valid.shape[0])[:, None].expand_as(valid)[valid.cpu()]   # [N]
    if e.numel() == 0:
        z = torch.zeros(0)
        return dict(cos=z, kl=z, row=rows)
    cos = torch.nn.functional.cosine_similarity(e, r, dim=-1)                    # [N]
    lr, le = torch.log_softmax(r, -1), torch.log_softmax(e, -1)
    kl = (lr.exp() * (lr - le)).sum(-1)                                          # [N]
    return dict(cos=cos.float(), kl=kl.clamp_min(0).float(), row=rows)


def _error_stats(e: torch.Tensor, r: torch.Tensor, atol: float | None, rtol: float | None) -> dict:
    """Max / mean abs and max rel difference; `close` by Polygraphy's elementwise rule where a bound is
    enforced (the torch fallback applies the same rule; it also serves when nothing is judged)."""
    enforce = atol is not None or rtol is not None
    a = atol if atol is not None else 0.0
    t = rtol if rtol is not None else 0.0
    if enforce:
        try:
            return _polygraphy_stats(e, r, a, t)
        except ImportError:
            pass
    absdiff = (e - r).abs()
    ref_abs = r.abs().masked_fill(r == 0, 2.220446049250313e-16)
    reldiff = absdiff / ref_abs
    bad = ((absdiff > a) | absdiff.isnan()) & ((reldiff > t) | reldiff.isnan())
    return dict(max_abs_diff=float(absdiff.max()), max_rel_diff=float(reldiff.max()),
                mean_abs_diff=float(absdiff.mean()), close=(not bool(bad.any())) if enforce else None)


def _polygraphy_stats(e: torch.Tensor, r: torch.Tensor, atol: float, rtol: float) -> dict:
    from polygraphy.comparator.compare import SimpleCompareFunc
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.logger import G_LOGGER

    compare = SimpleCompareFunc(atol=atol, rtol=rtol, check_error_stat="elemwise")
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        res = compare(IterationResult({"logits": e.numpy()}, runner_name="engine"),
                      IterationResult({"logits": r.numpy()}, runner_name="reference"))["logits"]
    return dict(max_abs_diff=res.max_absdiff, max_rel_diff=res.max_reldiff, mean_abs_diff=res.mean_absdiff,
                close=bool(res))


# ---- the commit rule, recomputed from each side's confidences ------------------------------------

@dataclass(frozen=True)
class CommitRule:
    """The commit rule of a denoise / draft pass, as the decode loop applies it.

    kind: "threshold" (dlm threshold policy), "topk" (dlm fixed-steps policy), "spec" (linear-spec draft).
    Which rows take part and how many positions a top-k pass commits are read off the reference's
    committed mask, so both sides are judged against the same eligible set.

    Written here a second time, row by row in plain Python from the definitions in decoding/remask.py
    (rank = order by confidence descending, ties to the lower position), not by calling the functions
    the loop commits with: a fault in those shows up as a disagreement with the loop's own commits.
    """

    kind: str
    threshold: float = 0.0

    def apply(self, conf: torch.Tensor, tokens: torch.Tensor, ref_committed: torch.Tensor,
              mask_id: int) -> torch.Tensor:
        """conf [B, L], tokens [B, L] (pass input), ref_committed [B, L] bool -> commit [B, L] bool."""
        masked = self.eligible(tokens, ref_committed, mask_id)
        commit = torch.zeros_like(masked)
        for b in range(masked.shape[0]):
            c = conf[b].tolist()
            ranked = sorted(masked[b].nonzero()[:, 0].tolist(), key=lambda i: (-c[i], i))
            commit[b, self._pick(ranked, c, int(ref_committed[b].sum()))] = True
        return commit

    def _pick(self, ranked: list[int], c: list[float], k: int) -> list[int]:
        """ranked: a row's eligible positions, most confident first -> the positions it commits."""
        if not ranked:
            return []
        sure = [i for i in ranked if c[i] >= self.threshold]
        if self.kind == "threshold":                        # the top one, and every one at/above threshold
            return [ranked[0]] + sure
        if self.kind == "topk":                             # the k most confident
            return ranked[:k]
        if self.threshold > 0:                              # spec, multi-pass draft: the top one if none is sure
            return sure or [ranked[0]]
        return ranked                                       # spec, one-pass draft: every mask

    @staticmethod
    def eligible(tokens: torch.Tensor, ref_committed: torch.Tensor, mask_id: int) -> torch.Tensor:
        """[B, L] bool: masked positions of rows that took part (every taking-part row commits >= 1)."""
        return (tokens == mask_id) & ref_committed.any(1, keepdim=True)


def commit_matches(rule: CommitRule, tokens: torch.Tensor, ref_committed: torch.Tensor,
                   conf_ref: torch.Tensor, conf_eng: torch.Tensor, mask_id: int) -> tuple[int, int]:
    """(eligible positions where the rule, applied to each side's conf, decides the same, eligible positions)."""
    eligible = rule.eligible(tokens, ref_committed, mask_id)
    a = rule.apply(conf_ref.float(), tokens, ref_committed, mask_id)
    b = rule.apply(conf_eng.float(), tokens, ref_committed, mask_id)
    return int(((a == b) & eligible).sum()), int(eligible.sum())
