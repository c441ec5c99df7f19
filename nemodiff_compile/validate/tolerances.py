"""How close an engine must stay to the PyTorch reference, per precision. Stdlib only.

Four kinds of bound:
  per pass (teacher-forced: the engine runs the reference's exact inputs) - logits and confidence of
      each forward pass;
  per mode, over all teacher-forced passes - the fraction of positions with the same token id and of
      eligible positions with the same commit decision (pooled, because one pass can hold a single
      position: an AR decode at batch 1);
  per pass kind, over all its teacher-forced positions in a mode - the 5th percentile of the logit
      cosine and the mean KL(reference || engine): distribution-level, so a large prompt set does
      not fail a sound engine on its single most extreme position;
  per trajectory (free-running: each backend decodes on its own outputs) - the fraction of
      generated token positions that agree, for every prompt and pooled over the prompts, and the
      change in tokens per forward (a quantized engine must not silently commit fewer tokens per pass).
A bound of None is reported but not enforced. Quantized precisions take their bounds from their
recipe (`quant.recipe.RECIPES[...].thresholds`), recorded in the engine's manifest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from ..errors import InvalidArgument


@dataclass(frozen=True)
class Tolerances:
    precision: str
    logits_atol: float | None           # elementwise: |e - r| <= atol OR |e - r| <= rtol * |r|  (Polygraphy rule)
    logits_rtol: float | None
    cosine_min: float | None            # min over positions of cos(logits_e[b, l, :], logits_r[b, l, :])
    conf_atol: float | None             # max |conf_e - conf_r| over valid positions
    forced_token_agreement: float | None  # teacher-forced valid positions with equal token ids, per mode
    commit_agreement: float | None      # eligible positions of denoise/draft passes with the same decision, per mode
    token_agreement: float | None       # min whole-trajectory agreement of any prompt in any mode
    mean_token_agreement: float | None = None   # trajectory agreement pooled over the prompts, per mode
    tpf_drop_max: float | None = None   # max relative drop of tokens per forward (engine vs reference), per mode
    # per pass kind (prefill, decode, denoise, commit, draft, verify) in each mode, over every
    # teacher-forced position of that kind (distribution-level: they settle as prompts are added,
    # where a minimum keeps falling):
    cosine_p05: float | None = None     # the 5th percentile of the per-position logit cosine, at least
    kl_mean_max: float | None = None    # the mean KL(reference || engine) in nats, at most

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def with_(self, **kw) -> "Tolerances":
        return replace(self, **kw)


TOLERANCES: dict[str, Tolerances] = {
    # fp32 vs the fp32 reference: only reduction order differs (ORT matches torch to ~1e-6 on logits),
    # so every decision must be identical.
    "fp32": Tolerances("fp32", logits_atol=1e-4, logits_rtol=1e-4, cosine_min=0.99999, conf_atol=1e-4,
                       forced_token_agreement=1.0, commit_agreement=1.0, token_agreement=1.0),
    # fp16 (10-bit mantissa, eps ~1e-3): logit errors of ~1e-2 absolute after a few dozen layers are
    # normal, so elementwise logits are reported, not enforced; the direction of each logit vector
    # (cosine) and the decisions are. Low-confidence positions can flip their argmax between near-ties,
    # hence teacher-forced token agreement 0.95 and trajectory agreement 0.9 (one flip early in a
    # block changes the rest of the row).
    "fp16": Tolerances("fp16", logits_atol=None, logits_rtol=None, cosine_min=0.999, conf_atol=2e-2,
                       forced_token_agreement=0.95, commit_agreement=0.95, token_agreement=0.9),
    # bf16 (7-bit mantissa, eps ~8e-3): about 8x coarser than fp16, same cosine bound (it holds on the
    # published checkpoints' bf16 vs fp32 logits), looser confidence and decision bounds.
    "bf16": Tolerances("bf16", logits_atol=None, logits_rtol=None, cosine_min=0.999, conf_atol=5e-2,
                       forced_token_agreement=0.9, commit_agreement=0.9, token_agreement=0.9),
}

_ALIASES = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16",
            "float8": "fp8", "float8_e4m3fn": "fp8", "fp8_e4m3": "fp8"}


def tolerances_for(precision: str, thresholds: dict[str, Any] | None = None) -> Tolerances:
    """The bounds for a precision name ("fp32", "bf16", "bfloat16", ...); a quantized precision's
    come from `thresholds` (its manifest's record) or else from its built-in recipe."""
    key = _ALIASES.get(precision.lower(), precision.lower())
    if thresholds is None and key not in TOLERANCES:
        from ..quant.recipe import RECIPES

        if key in RECIPES:
            thresholds = RECIPES[key].thresholds
    if thresholds is not None:
        fields = set(Tolerances.__dataclass_fields__) - {"precision"}
        unknown = set(thresholds) - fields
        if unknown:
            raise InvalidArgument(f"thresholds for {precision}: unknown bound(s) {', '.join(sorted(unknown))}")
        base = dict.fromkeys(fields)
        base.update(thresholds)
        return Tolerances(precision=key, **base)
    if key not in TOLERANCES:
        raise InvalidArgument(f"no validation tolerances for precision {precision!r}: "
                              f"expected one of {', '.join(TOLERANCES)}")
    return TOLERANCES[key]
