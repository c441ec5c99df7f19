"""The spread behind a mode's figures: per pass kind, the distribution over positions of the
teacher-forced logit cosine and KL(reference || engine); over prompts, the distribution of the
free-running trajectory agreement. One pooled number hides whether a mode is uniformly a little off
or mostly exact with a few prompts far off; these say which.

    phase_spread(passes)      {phase: {"passes", "positions", "token_agreement",
                                       "cosine": {"min", "p01", "p05", "median"},
                                       "kl": {"mean", "p99", "max"}}}   (phases in run order)
    prompt_spread(agreement)  {"prompts", "mean", "min", "p10", "p25", "median", "exact"}

Quantiles are the "lower" order statistic (no interpolation): p01 over 1000 positions is the 10th
smallest value.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

QUANTILES = {"p01": 0.01, "p05": 0.05, "median": 0.5}


def quantile(x: torch.Tensor, q: float) -> float | None:
    """The q-quantile of a 1-D tensor (lower order statistic); None for an empty one."""
    if x.numel() == 0:
        return None
    return float(torch.quantile(x.double(), q, interpolation="lower"))


def phase_spread(passes: Iterable[Any]) -> dict[str, dict[str, Any]]:
    """Per pass kind (prefill, decode, denoise, commit, draft, verify) over `passes` (PassStats)."""
    by: dict[str, list] = {}
    for p in passes:
        by.setdefault(p.phase, []).append(p)
    out = {}
    for phase, ps in by.items():
        positions = sum(p.positions for p in ps)
        d: dict[str, Any] = dict(passes=len(ps), positions=positions,
                                 token_agreement=sum(p.token_matches for p in ps) / positions if positions else 1.0)
        divs = [p.divergence for p in ps if p.divergence is not None]
        if divs:
            cos = torch.cat([v["cos"] for v in divs])                          # [N]
            kl = torch.cat([v["kl"] for v in divs])                            # [N]
            d["cosine"] = dict(min=quantile(cos, 0.0), **{k: quantile(cos, q) for k, q in QUANTILES.items()})
            d["kl"] = dict(mean=float(kl.double().mean()) if kl.numel() else None, p99=quantile(kl, 0.99),
                           max=quantile(kl, 1.0))
        out[phase] = d
    return out


def mode_kl(passes: Iterable[Any]) -> float | None:
    """Mean teacher-forced KL(reference || engine) over every compared position of a mode."""
    kl = [p.divergence["kl"] for p in passes if p.divergence is not None]
    if not kl:
        return None
    x = torch.cat(kl)
    return float(x.double().mean()) if x.numel() else None


def prompt_spread(agreement: list[float]) -> dict[str, Any]:
    """The distribution of per-prompt trajectory agreement (mean: unweighted over prompts)."""
    x = torch.tensor(agreement, dtype=torch.float64)
    if x.numel() == 0:
        return dict(prompts=0, mean=None, min=None, p10=None, p25=None, median=None, exact=None)
    return dict(prompts=len(agreement), mean=float(x.mean()), min=float(x.min()), p10=quantile(x, 0.10),
                p25=quantile(x, 0.25), median=quantile(x, 0.5), exact=float((x == 1.0).double().mean()))
