"""Why a validation failed, in words a user can act on: which mode, which pass kind, which pass, and
which decoder layer's output moved furthest from the fp32 reference on that pass.

    why = explain(report, reference, engine, prompts)    # None when the report passed
    why["text"]                                          # a few sentences; why["layers"]: the figures

The pass examined: in the first failing mode, the failing pass with the lowest logit cosine when a
per-pass bound failed; otherwise the pass kind named by the failed bound (or the kind with the
highest mean KL) and, within it, the pass with the highest mean KL(reference || engine). That pass
is replayed (its chunk of prompts, teacher-forced, up to that pass) with both sides' decoder-layer
outputs tapped (layers.py), and each layer's relative error is reported.
"""

from __future__ import annotations

from typing import Any

from ..decoding import loops
from ..decoding.policy import DecodePolicy
from . import layers, metrics
from .shadow import ShadowDenoiser


class _Stop(Exception):
    """Ends a replay once the examined pass has run."""


class _Probe(ShadowDenoiser):
    """The teacher-forced shadow run, arming both taps for pass `index` and stopping after it."""

    def __init__(self, reference, engine, index: int, taps):
        super().__init__(reference, engine)
        self.index, self.taps, self.seen = index, taps, {}

    def step(self, tokens, **kw):
        if len(self.passes) == self.index:
            for t in self.taps:
                t.arm()
        out = super().step(tokens, **kw)
        if len(self.passes) == self.index + 1:
            self.seen["valid"] = metrics.valid_positions(tokens, kw.get("num_valid"))
            raise _Stop
        return out


def pick(report) -> tuple[str, Any, str] | None:
    """(mode, PassStats, the failed bounds in words) to examine, or None if nothing failed.

    Per-pass failures (float precisions' bounds): the failing pass with the lowest logit cosine.
    Otherwise, over the failing modes, the pass kind furthest off (highest mean KL) among those its
    failed bounds name (all kinds of the mode when a bound names none), and in it the pass with the
    highest mean KL."""
    if report.passed:
        return None
    failed = [p for m in report.modes.values() for p in m.failed_passes]
    if failed:
        p = min(failed, key=lambda p: p.logits["cosine_min"] if p.logits is not None else 2.0)
        return p.mode, p, "; ".join(p.failures)
    best = None                                     # (mean KL, mode, phase, reasons)
    for name, m in report.modes.items():
        if m.passed:
            continue
        kl: dict[str, list[float]] = {}
        for p in m.passes:
            if p.divergence is not None and p.divergence["kl"].numel():
                kl.setdefault(p.phase, []).append(float(p.divergence["kl"].double().mean()))
        named = {ph for ph in kl for f in m.failures if f.startswith(f"{ph} passes")}
        for ph in named or kl:
            score = sum(kl[ph]) / len(kl[ph])
            reasons = [f for f in m.failures if f.startswith(f"{ph} passes")] or m.failures[:1]
            if best is None or score > best[0]:
                best = (score, name, ph, reasons)
    if best is None:                                # no logits to rank by
        name, m = next((k, v) for k, v in report.modes.items() if not v.passed)
        return name, (m.passes or [None])[0], "; ".join(m.failures[:1])
    _, name, phase, reasons = best
    pool = [p for p in report.modes[name].passes if p.phase == phase and p.divergence is not None
            and p.divergence["kl"].numel()]
    return name, max(pool, key=lambda p: float(p.divergence["kl"].double().mean())), "; ".join(reasons)


def explain(report, reference, engine, prompts: list[list[int]], *, kept: tuple[int, int] = (0, 0)) -> dict[str, Any] | None:
    """The explanation of a failed report (module docstring); None when it passed. kept: the recipe's
    (keep_first_layers, keep_last_layers), so the advice never asks for what the engine already does."""
    target = pick(report)
    if target is None:
        return None
    mode, p, reason = target
    out: dict[str, Any] = dict(mode=mode, reason=reason)
    if p is None:
        out["text"] = f"{mode}: {reason}."
        return out
    out.update(phase=p.phase, pass_index=p.index, block=p.block, step=p.step)
    s = report.settings
    batch = s.get("batch") or len(prompts)
    chunk = prompts[p.first_prompt:p.first_prompt + batch]
    local = p.index - next(q.index for q in report.modes[mode].passes if q.first_prompt == p.first_prompt)
    out["prompts"] = [p.first_prompt, p.first_prompt + len(chunk) - 1]
    where = (f"{mode} mode: {reason}. Examined: the {p.phase} pass furthest off, pass {p.index} (block {p.block}, "
             f"step {p.step}, prompts {out['prompts'][0]}-{out['prompts'][1]})")
    if p.divergence is not None and p.divergence["kl"].numel():
        out["kl_mean"] = float(p.divergence["kl"].double().mean())
        out["cosine_min"] = float(p.divergence["cos"].min())
        where += f", mean KL {out['kl_mean']:.3g} nats, lowest logit cosine {out['cosine_min']:.4f}"
    try:
        errors = replay(reference, engine, chunk, mode, local, s)
    except layers.Untappable as e:
        out["layers"] = None
        out["text"] = f"{where}. Per-layer comparison unavailable: {e}."
        return out
    out["layers"] = errors
    rel = errors["relative"]
    per = ", ".join(f"{i}: {r:.3g}" for i, r in enumerate(rel))
    out["text"] = (f"{where}. Decoder-layer outputs against the fp32 reference (relative error by layer: {per}): "
                   f"furthest at layer {errors['furthest']}, largest rise at layer {errors['jump']} "
                   f"(+{errors['rise']:.3g}). {advice(errors['jump'], len(rel), kept)}")
    return out


def advice(layer: int, n: int, kept: tuple[int, int] = (0, 0)) -> str:
    """What a user can change when layer `layer` of `n` adds the most error; kept: the decoder layers the
    recipe already keeps in float at the start and at the end."""
    first, last = kept
    if layer < first or layer >= n - last:
        return (f"Layer {layer} is already kept in float by the recipe: the error comes from the quantized layers "
                "around it or from activations unlike the calibration prompts: calibrate on prompts like yours "
                "(--calib FILE).")
    if layer == first:
        return (f"Try keeping the first {_layers(first + 1)} in float (--keep-first-layers {first + 1}), or calibrate "
                "on prompts like yours (--calib FILE).")
    if layer == n - 1 - last:
        return (f"Try keeping the last {_layers(last + 1)} in float (--keep-last-layers {last + 1}), or calibrate "
                "on prompts like yours (--calib FILE).")
    return (f"The error enters mid-model (layer {layer}): calibrate on prompts like yours (--calib FILE), or use a "
            "wider format (fp8 rather than int8, int8 rather than int4-awq).")


def _layers(n: int) -> str:
    return "layer" if n == 1 else f"{n} layers"


def replay(reference, engine, prompts: list[list[int]], mode: str, index: int, settings: dict) -> dict[str, Any]:
    """Run `mode` teacher-forced on `prompts` up to pass `index` with both sides tapped; the per-layer
    errors of that pass (layers.layer_errors)."""
    steps = settings.get("steps") if mode == "dlm" else None
    threshold = {"dlm": None if steps is not None else settings.get("threshold"),
                 "linear-spec": settings.get("spec_threshold", 0.0)}.get(mode)
    policy = DecodePolicy(mode, block_length=settings.get("block_length"), threshold=threshold, steps=steps,
                          temperature=settings.get("temperature", 0.0), seed=settings.get("seed", 0))
    with layers.tap(reference) as tr, layers.tap(engine) as te:
        probe = _Probe(reference, engine, index, (tr, te))
        try:
            loops.generate(probe, prompts, policy, max_new_tokens=settings["max_new_tokens"], trace=True)
        except _Stop:
            pass
    seen = probe.seen
    if "valid" not in seen or tr.states is None or te.states is None:
        raise layers.Untappable(f"the replay of {mode} did not reach pass {index}")
    return layers.layer_errors(tr.states, te.states, seen["valid"])
