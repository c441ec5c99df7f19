"""Validate an engine against the PyTorch reference, pass by pass and over whole trajectories.

For each decoding mode, two runs with the same prompts, policy and seed (hence the same noise):
  teacher-forced  the loop runs on the reference through a `ShadowDenoiser` that mirrors every call
                  onto the engine, so each engine pass sees the reference's exact inputs and cache;
                  per pass: logits (max abs / rel diff, Polygraphy's elementwise check, min cosine),
                  max confidence diff, cache lengths, token-id and commit-decision agreement (the last
                  two also pooled over the mode, where they are judged)
  free-running    the loop runs on the engine alone; per prompt: generated-token agreement with the
                  reference (positions equal up to the shorter length / the longer length), and the
                  first divergence: the first pass whose outcome differs for a prompt that ends
                  differently
  device loop     (dlm, engines that declare a device block refiner for the policy: the fast engine,
                  engines built with a remask stage) the same free-running decode with the block's
                  refinement passes on the device, untraced: its tokens and NFE must equal the engine's
                  host passes exactly (same graph, same rule), and its agreement with the reference is
                  held to the trajectory bounds
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InvalidArgument
from ..decoding import loops
from ..decoding.denoiser import Denoiser
from ..decoding.policy import DecodePolicy
from . import metrics, spread
from .shadow import ShadowDenoiser, ShadowPass
from .tolerances import TOLERANCES, Tolerances

DECISION_PHASES = ("denoise", "draft")            # passes whose confidences pick a commit set


@dataclass
class PassStats:
    mode: str
    index: int                                    # position in the run's pass sequence
    phase: str
    block: int
    step: int
    positions: int                                # valid (non-padding) positions compared
    token_matches: int                            # of those, positions with the same token id
    conf_max_abs_diff: float
    logits: dict | None                           # max_abs_diff, max_rel_diff, mean_abs_diff, cosine_min, close
    commit: tuple[int, int] | None                # (same decision, eligible positions): denoise / draft only
    lengths_ok: bool                              # cache lengths equal after the pass (and its trim)
    failures: list[str] = field(default_factory=list)
    first_prompt: int = 0                         # the prompt index of the pass's batch row 0
    divergence: dict | None = field(default=None, repr=False)   # metrics.position_divergence (cos, kl, row)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def token_agreement(self) -> float:
        return _ratio(self.token_matches, self.positions)

    @property
    def commit_agreement(self) -> float | None:
        return None if self.commit is None else _ratio(*self.commit)

    def where(self) -> dict[str, Any]:
        return dict(mode=self.mode, pass_index=self.index, phase=self.phase, block=self.block, step=self.step)

    def to_json(self) -> dict[str, Any]:
        return dict(self.where(), positions=self.positions, token_agreement=self.token_agreement,
                    conf_max_abs_diff=self.conf_max_abs_diff, logits=self.logits,
                    commit_agreement=self.commit_agreement, lengths_ok=self.lengths_ok,
                    passed=self.passed, failures=list(self.failures))


@dataclass
class ModeResult:
    mode: str
    prompt_agreement: list[float]                 # free-running token agreement per prompt
    matched: int                                  # agreeing positions, summed over prompts
    total: int                                    # compared positions (the longer row), summed
    nfe: dict[str, int]                           # {"reference": n, "engine": n}
    tokens_per_forward: dict[str, float]
    passes: list[PassStats]
    first_divergence: dict[str, Any] | None
    failures: list[str] = field(default_factory=list)    # mode-level bounds not met
    device: dict[str, Any] | None = None          # the device refinement loop's run (dlm), see the module docstring

    @property
    def token_agreement(self) -> float:
        return _ratio(self.matched, self.total)

    @property
    def forced_token_agreement(self) -> float:
        return _ratio(sum(p.token_matches for p in self.passes), sum(p.positions for p in self.passes))

    @property
    def commit_agreement(self) -> float | None:
        c = [p.commit for p in self.passes if p.commit is not None]
        return _ratio(sum(m for m, _ in c), sum(n for _, n in c)) if c else None

    @property
    def tpf_drop(self) -> float | None:
        """Relative fall of the engine's tokens per forward below the reference's (negative: it rose)."""
        ref, eng = self.tokens_per_forward["reference"], self.tokens_per_forward["engine"]
        return None if ref <= 0 else (ref - eng) / ref

    @property
    def failed_passes(self) -> list[PassStats]:
        return [p for p in self.passes if not p.passed]

    @property
    def passed(self) -> bool:
        return not self.failures and not self.failed_passes

    def worst(self) -> dict[str, Any]:
        """The extreme of each per-pass figure (None where no pass had it)."""
        lg = [p.logits for p in self.passes if p.logits is not None]
        return dict(
            logits_max_abs_diff=max((d["max_abs_diff"] for d in lg), default=None),
            logits_max_rel_diff=max((d["max_rel_diff"] for d in lg), default=None),
            logits_cosine_min=min((d["cosine_min"] for d in lg), default=None),
            conf_max_abs_diff=max((p.conf_max_abs_diff for p in self.passes), default=0.0),
        )

    def to_json(self, per_pass: bool = False) -> dict[str, Any]:
        failed = self.failed_passes
        out = dict(passed=self.passed, token_agreement=self.token_agreement, prompt_agreement=self.prompt_agreement,
                   forced_token_agreement=self.forced_token_agreement, commit_agreement=self.commit_agreement,
                   nfe=self.nfe, tokens_per_forward=self.tokens_per_forward, tpf_drop=self.tpf_drop,
                   passes_compared=len(self.passes), failed_passes=len(failed), worst=self.worst(),
                   failures=list(self.failures), first_failure=failed[0].to_json() if failed else None,
                   first_divergence=self.first_divergence, kl_mean=spread.mode_kl(self.passes),
                   prompt_spread=spread.prompt_spread(self.prompt_agreement),
                   phases=spread.phase_spread(self.passes), device_loop=self.device)
        if per_pass:
            out["passes"] = [p.to_json() for p in self.passes]
        return out


@dataclass
class ValidationReport:
    tolerances: Tolerances
    modes: dict[str, ModeResult]
    settings: dict[str, Any]
    explanation: dict[str, Any] | None = None     # explain.explain(...): why it failed, where it was set
    # vision-language engines: the vision graph against the reference's tower (validate/images.py)
    vision: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        return all(m.passed for m in self.modes.values()) and (self.vision is None or self.vision["passed"])

    @property
    def token_agreement(self) -> float:
        return _ratio(sum(m.matched for m in self.modes.values()), sum(m.total for m in self.modes.values()))

    @property
    def passes_compared(self) -> int:
        return sum(len(m.passes) for m in self.modes.values())

    @property
    def first_divergence(self) -> dict[str, Any] | None:
        return next((m.first_divergence for m in self.modes.values() if m.first_divergence), None)

    @property
    def first_failure(self) -> dict[str, Any] | None:
        return next((m.failed_passes[0].to_json() for m in self.modes.values() if m.failed_passes), None)

    @property
    def failures(self) -> list[str]:
        """Every bound not met: mode-level ones, then a count of failing passes per mode."""
        out = []
        for name, m in self.modes.items():
            out += [f"{name}: {f}" for f in m.failures]
            if m.failed_passes:
                out.append(f"{name}: {len(m.failed_passes)} of {len(m.passes)} passes out of tolerance")
        if self.vision is not None and not self.vision["passed"]:
            out.append(f"vision graph: features cosine {self.vision['features_cosine_min']:.6f} below the bound")
        return out

    def to_json(self, per_pass: bool = False) -> dict[str, Any]:
        return dict(passed=self.passed, token_agreement=self.token_agreement,
                    passes_compared=self.passes_compared, first_divergence=self.first_divergence,
                    first_failure=self.first_failure, failures=self.failures,
                    tolerances=self.tolerances.to_json(), settings=self.settings, vision=self.vision,
                    per_mode={k: m.to_json(per_pass) for k, m in self.modes.items()}, explanation=self.explanation)

    def to_table(self) -> str:
        head = ("mode", "passes", "failed", "tok agree", "min prompt", "forced tok", "commit",
                "max |dlogit|", "min cos", "max |dconf|", "nfe ref/eng", "tpf ref/eng")
        rows = []
        for name, m in self.modes.items():
            w = m.worst()
            rows.append((name, str(len(m.passes)), str(len(m.failed_passes)), _f(m.token_agreement, 4),
                         _f(min(m.prompt_agreement, default=1.0), 4), _f(m.forced_token_agreement, 4),
                         _f(m.commit_agreement, 4), _g(w["logits_max_abs_diff"]), _f(w["logits_cosine_min"], 6),
                         _g(w["conf_max_abs_diff"]), f"{m.nfe['reference']}/{m.nfe['engine']}",
                         f"{m.tokens_per_forward['reference']:.2f}/{m.tokens_per_forward['engine']:.2f}"))
        out = [f"validation ({self.tolerances.precision} tolerances): {'PASSED' if self.passed else 'FAILED'}, "
               f"token agreement {self.token_agreement:.4f} over {self.passes_compared} passes, "
               f"{self.settings.get('prompts', '?')} prompts", *_columns(head, rows)]
        out += ["", "trajectory agreement per prompt, and teacher-forced passes by kind:"]
        head = ("mode", "prompts", "mean", "median", "p10", "min", "exact", "pass kind", "positions", "tok agree",
                "cos min", "cos p01", "cos p05", "KL mean", "KL p99")
        rows = []
        for name, m in self.modes.items():
            ps = spread.prompt_spread(m.prompt_agreement)
            lead = (name, str(ps["prompts"]), _f(ps["mean"], 4), _f(ps["median"], 4), _f(ps["p10"], 4),
                    _f(ps["min"], 4), _f(ps["exact"], 3))
            for phase, d in spread.phase_spread(m.passes).items():
                c, k = d.get("cosine", {}), d.get("kl", {})
                rows.append((*lead, phase, str(d["positions"]), _f(d["token_agreement"], 4), _f(c.get("min"), 4),
                             _f(c.get("p01"), 4), _f(c.get("p05"), 4), _g(k.get("mean")), _g(k.get("p99"))))
                lead = ("",) * len(lead)
        out += _columns(head, rows)
        for name, m in self.modes.items():
            d = m.device
            if d is not None:
                out.append(f"{name} device loop: tok agree {d['token_agreement']:.4f} with the reference, "
                           f"{'same' if d['same_as_host_passes'] else 'NOT the same'} tokens and NFE as the "
                           f"host passes; nfe {d['nfe']}, device passes {d['device_passes']}")
        if self.vision is not None:
            v = self.vision
            out.append(f"vision graph: {v['images']} images, features cosine min {v['features_cosine_min']:.6f}, "
                       f"max |diff| {v['features_max_abs_diff']:.3g}")
        div, fail = self.first_divergence, self.first_failure
        out.append("first divergence: " + (_where(div) + f" ({div['kind']})" if div else "none"))
        out.append("first failing pass: " + (_where(fail) + ": " + "; ".join(fail["failures"]) if fail else "none"))
        out += [f"failed: {f}" for f in self.failures]
        if self.explanation:
            out.append(f"why: {self.explanation['text']}")
        return "\n".join(out)


def _columns(head: tuple, rows: list[tuple]) -> list[str]:
    """A header, a rule and the rows, right-aligned but for the first column."""
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return [line(head), line(tuple("-" * w for w in widths)), *map(line, rows)]


def _ratio(n: int, d: int) -> float:
    return 1.0 if d == 0 else n / d


def _f(x, digits):
    return "-" if x is None else f"{x:.{digits}f}"


def _g(x):
    return "-" if x is None else f"{x:.3g}"


def _where(d: dict) -> str:
    who = f"{d['mode']} prompt {d['prompt']}" if "prompt" in d else d["mode"]
    if d["pass_index"] is None:
        return f"{who}, final output"
    return f"{who} pass {d['pass_index']} ({d['phase']}, block {d['block']}, step {d['step']})"


# ---- the entry point ---------------------------------------------------------------------------------

def validate(reference: Denoiser, engine: Denoiser, prompts: list[list[int]], *,
             modes: tuple[str, ...] = loops.MODES, max_new_tokens: int = 32, block_length: int | None = None,
             threshold: float | None = None, steps: int | None = None, spec_threshold: float = 0.0,
             temperature: float = 0.0, tolerances: Tolerances | None = None, seed: int = 0,
             batch: int | None = None, images: list | None = None) -> ValidationReport:
    """Compare `engine` with `reference` in each mode; see the module docstring.

    threshold / steps: the dlm policy (threshold rule, default 0.9, or the fixed-steps schedule when steps
    is set); spec_threshold: the linear-spec draft rule (0 = one draft pass per block). Every compared pass
    runs on the host (the comparison is per pass); where the engine has a device block refiner for the dlm
    policy, one more untraced dlm run goes through it (the "device loop" of the module docstring). images: per
    prompt its image features (decoding/embeds.PromptImages) or None; both sides prefill the same ones.
    batch: prompts per decode batch (default all at once); a large set runs in chunks of `batch`,
    pooled into one report (pass indices run on across chunks).
    """
    tol = tolerances or TOLERANCES["fp32"]
    if engine is reference:
        raise InvalidArgument("validate needs two denoiser instances (each keeps its own KV cache); "
                              "got the same object twice")
    policies = {mode: DecodePolicy(mode, block_length=block_length, temperature=temperature, seed=seed,
                                   threshold={"dlm": threshold, "linear-spec": spec_threshold}.get(mode),
                                   steps=steps if mode == "dlm" else None) for mode in modes}
    batch = batch or len(prompts) or 1
    results = {}
    for mode, policy in policies.items():
        kw = dict(max_new_tokens=max_new_tokens, trace=True)
        rule = _commit_rule(policy)
        passes, agree, divergence = [], [], None
        device_loop = mode == "dlm" and policy.greedy and engine.block_refiner(policy) is not None
        device_runs: list[tuple[loops.Generation, loops.Generation, loops.Generation, int]] = []
        nfe = {"reference": 0, "engine": 0}
        tpf = {"reference": 0.0, "engine": 0.0}
        for lo in range(0, len(prompts), batch):                # chunks of `batch` prompts, one batch each
            chunk = prompts[lo:lo + batch]
            kw["images"] = images[lo:lo + batch] if images is not None else None
            shadow = ShadowDenoiser(reference, engine, logits_atol=tol.logits_atol, logits_rtol=tol.logits_rtol)
            ref = loops.generate(shadow, chunk, policy, **kw)                 # teacher-forced
            eng = loops.generate(engine, chunk, policy, **kw)                 # free-running
            passes += [_pass_stats(mode, len(passes) + i, rec, sp, rule, reference.config.mask_token_id, tol, lo)
                       for i, (rec, sp) in enumerate(zip(ref.trace, shadow.passes, strict=True))]
            agree += [trajectory_agreement(a, b) for a, b in zip(ref.tokens, eng.tokens)]
            for side, g in (("reference", ref), ("engine", eng)):
                nfe[side] += g.nfe
                tpf[side] += g.tokens_per_forward * len(chunk)                # a mean over rows: weight by rows
            if divergence is None:
                divergence = first_divergence(mode, chunk, ref, eng, first_prompt=lo)
            if device_loop:
                dev = loops.generate(engine, chunk, policy, max_new_tokens=max_new_tokens,     # untraced
                                     images=kw["images"])
                device_runs.append((dev, eng, ref, lo))
        n = max(len(prompts), 1)
        result = ModeResult(
            mode, [_ratio(*a) for a in agree], sum(m for m, _ in agree), sum(t for _, t in agree),
            nfe, {k: v / n for k, v in tpf.items()}, passes, divergence)
        result.failures = _judge_mode(result, tol)
        if device_loop:
            result.device, bad = _device_loop(device_runs, tol)
            result.failures += bad
        results[mode] = result
    settings = dict(modes=list(modes), prompts=len(prompts), max_new_tokens=max_new_tokens,
                    block_length=block_length, threshold=policies["dlm"].threshold if "dlm" in policies else threshold,
                    steps=steps,
                    spec_threshold=spec_threshold, temperature=temperature, seed=seed, batch=batch)
    return ValidationReport(tol, results, settings)


def _commit_rule(policy: DecodePolicy) -> metrics.CommitRule | None:
    if policy.mode == "dlm":
        return metrics.CommitRule("topk") if policy.steps is not None else metrics.CommitRule("threshold", policy.threshold)
    if policy.mode == "linear-spec":
        return metrics.CommitRule("spec", policy.threshold)
    return None


def _pass_stats(mode: str, i: int, rec: loops.PassRecord, sp: ShadowPass, rule: metrics.CommitRule | None,
                mask_id: int, tol: Tolerances, first_prompt: int = 0) -> PassStats:
    valid = metrics.valid_positions(sp.tokens, sp.num_valid)                   # [B, L]
    commit = None
    if rule is not None and rec.phase in DECISION_PHASES and rec.committed is not None:
        commit = metrics.commit_matches(rule, sp.tokens, rec.committed, sp.ref_conf, sp.eng_conf, mask_id)
    st = PassStats(mode, i, rec.phase, rec.block, rec.step, int(valid.sum()),
                   metrics.token_matches(sp.eng_token, sp.ref_token, valid),
                   metrics.conf_max_abs_diff(sp.eng_conf, sp.ref_conf, valid), sp.logits, commit, sp.lengths_ok,
                   first_prompt=first_prompt, divergence=sp.divergence)
    st.failures = _judge_pass(st, tol)
    return st


def _judge_pass(st: PassStats, tol: Tolerances) -> list[str]:
    """The reasons a teacher-forced pass is out of tolerance (NaN fails every bound)."""
    bad = []
    lg = st.logits
    if lg is not None:
        if lg["close"] is False:
            bad.append(f"logits outside atol {tol.logits_atol} / rtol {tol.logits_rtol} "
                       f"(max abs diff {lg['max_abs_diff']:.3g})")
        if tol.cosine_min is not None and not lg["cosine_min"] >= tol.cosine_min:
            bad.append(f"logits cosine {lg['cosine_min']:.6f} < {tol.cosine_min}")
    if tol.conf_atol is not None and not st.conf_max_abs_diff <= tol.conf_atol:
        bad.append(f"confidence diff {st.conf_max_abs_diff:.3g} > {tol.conf_atol}")
    if not st.lengths_ok:
        bad.append("cache lengths differ")
    return bad


def _judge_mode(m: ModeResult, tol: Tolerances) -> list[str]:
    """Mode-level bounds: pooled teacher-forced decisions, and every prompt's trajectory."""
    bad = []
    if tol.forced_token_agreement is not None and m.forced_token_agreement < tol.forced_token_agreement:
        first = next(p for p in m.passes if p.token_matches < p.positions)
        bad.append(f"teacher-forced token agreement {m.forced_token_agreement:.4f} < {tol.forced_token_agreement} "
                   f"(first mismatch: {_where(first.where())})")
    ca = m.commit_agreement
    if tol.commit_agreement is not None and ca is not None and ca < tol.commit_agreement:
        first = next(p for p in m.passes if p.commit is not None and p.commit[0] < p.commit[1])
        bad.append(f"commit agreement {ca:.4f} < {tol.commit_agreement} (first mismatch: {_where(first.where())})")
    for b, a in enumerate(m.prompt_agreement):
        if tol.token_agreement is not None and a < tol.token_agreement:
            bad.append(f"prompt {b}: trajectory token agreement {a:.4f} < {tol.token_agreement}")
    if tol.mean_token_agreement is not None and m.token_agreement < tol.mean_token_agreement:
        bad.append(f"trajectory token agreement over all prompts {m.token_agreement:.4f} < {tol.mean_token_agreement}")
    if tol.cosine_p05 is not None or tol.kl_mean_max is not None:
        for phase, d in spread.phase_spread(m.passes).items():
            if "cosine" not in d:
                continue
            p05, kl = d["cosine"]["p05"], d["kl"]["mean"]
            if tol.cosine_p05 is not None and p05 is not None and not p05 >= tol.cosine_p05:
                bad.append(f"{phase} passes: 5th-percentile logit cosine {p05:.4f} < {tol.cosine_p05} "
                           f"(over {d['positions']} positions)")
            if tol.kl_mean_max is not None and kl is not None and not kl <= tol.kl_mean_max:
                bad.append(f"{phase} passes: mean KL(reference || engine) {kl:.4g} > {tol.kl_mean_max} nats "
                           f"(over {d['positions']} positions)")
    drop = m.tpf_drop
    if tol.tpf_drop_max is not None and drop is not None and not drop <= tol.tpf_drop_max:
        tpf = m.tokens_per_forward
        bad.append(f"tokens per forward fell {drop:.1%} ({tpf['reference']:.3f} -> {tpf['engine']:.3f}), "
                   f"more than {tol.tpf_drop_max:.0%}")
    return bad


def _device_loop(runs: list[tuple[loops.Generation, loops.Generation, loops.Generation, int]],
                 tol: Tolerances) -> tuple[dict[str, Any], list[str]]:
    """The device refinement loop's runs (dev, host, ref, first prompt), one per chunk of prompts, against
    the engine's host passes (exactly) and the reference."""
    agree, rows, same, nfe, device_passes, tpf = [], [], True, 0, 0, 0.0
    for dev, host, ref, lo in runs:
        agree += [trajectory_agreement(a, b) for a, b in zip(ref.tokens, dev.tokens)]
        rows += [lo + b for b, (x, y) in enumerate(zip(host.tokens, dev.tokens)) if x != y]
        same = same and dev.tokens == host.tokens and dev.nfe_by_phase == host.nfe_by_phase \
            and dev.row_nfe == host.row_nfe
        nfe, device_passes = nfe + dev.nfe, device_passes + dev.device_passes
        tpf += dev.tokens_per_forward * len(dev.tokens)                   # a mean over rows: weight by rows
    summary = dict(token_agreement=_ratio(sum(m for m, _ in agree), sum(t for _, t in agree)),
                   prompt_agreement=[_ratio(*a) for a in agree], same_as_host_passes=same, nfe=nfe,
                   device_passes=device_passes, tokens_per_forward=tpf / max(len(agree), 1))
    bad = []
    if not same:
        what = f"tokens of prompt(s) {rows}" if rows else "pass counts"
        bad.append(f"device refinement loop: {what} differ from the engine's host passes")
    for b, a in enumerate(summary["prompt_agreement"]):
        if tol.token_agreement is not None and a < tol.token_agreement:
            bad.append(f"device refinement loop, prompt {b}: trajectory token agreement {a:.4f} < {tol.token_agreement}")
    if tol.mean_token_agreement is not None and summary["token_agreement"] < tol.mean_token_agreement:
        bad.append(f"device refinement loop: trajectory token agreement {summary['token_agreement']:.4f} < "
                   f"{tol.mean_token_agreement}")
    return summary, bad


# ---- free-running comparison -------------------------------------------------------------------------

def trajectory_agreement(ref: list[int], eng: list[int]) -> tuple[int, int]:
    """(positions equal up to the shorter length, the longer length): a length mismatch disagrees."""
    return sum(a == b for a, b in zip(ref, eng)), max(len(ref), len(eng))


def first_divergence(mode: str, prompts: list[list[int]], ref: loops.Generation,
                     eng: loops.Generation, first_prompt: int = 0) -> dict[str, Any] | None:
    """The first pass (in run order) whose outcome differs, for a prompt whose final output differs.

    The outcome of a pass is what the loop keeps from it: prefill the last prompt position (the first
    token), decode position 0, commit the last position (the next block's seed), denoise / draft the
    committed set and its tokens, verify the accepted prefix plus the bonus token. Differences at other
    positions are numerics that do not steer the trajectory; they show in the per-pass figures.
    """
    rows = [b for b, (a, e) in enumerate(zip(ref.tokens, eng.tokens)) if a != e]
    if not rows:
        return None
    for i, (r, e) in enumerate(zip(ref.trace, eng.trace)):
        for b in rows:
            diff = _pass_difference(r, e, b, len(prompts[b]))
            if diff is not None:
                return dict(mode=mode, prompt=first_prompt + b, pass_index=i, phase=r.phase, block=r.block, step=r.step, **diff)
    if len(ref.trace) != len(eng.trace):                                       # one run has more passes
        n = min(len(ref.trace), len(eng.trace))
        extra = (ref.trace if len(ref.trace) > n else eng.trace)[n]
        return dict(mode=mode, prompt=first_prompt + rows[0], pass_index=n, phase=extra.phase, block=extra.block,
                    step=extra.step, kind="schedule")
    return dict(mode=mode, prompt=first_prompt + rows[0], pass_index=None, phase=None, block=None, step=None, kind="output")


def _pass_difference(r: loops.PassRecord, e: loops.PassRecord, b: int, prompt_len: int) -> dict | None:
    """The first difference in row b between two passes: {"kind", ...details}, or None."""
    if (r.phase, r.block, r.step) != (e.phase, e.block, e.step) or r.tokens.shape != e.tokens.shape:
        return dict(kind="schedule")
    if not torch.equal(r.tokens[b], e.tokens[b]):
        return dict(kind="inputs")
    L = r.tokens.shape[1]
    if r.phase in DECISION_PHASES:
        none = torch.zeros(L, dtype=torch.bool)
        rc = r.committed[b] if r.committed is not None else none                  # [L] bool
        ec = e.committed[b] if e.committed is not None else none
        if not torch.equal(rc, ec):
            return dict(kind="commit set", reference=rc.nonzero()[:, 0].tolist(), engine=ec.nonzero()[:, 0].tolist())
        pos = rc.nonzero()[:, 0].tolist()
    elif r.phase == "prefill":
        pos = [prompt_len - 1]
    elif r.phase == "commit":
        pos = [L - 1]
    elif r.phase == "verify":
        agree = (r.out_token[b, :-1] == r.tokens[b, 1:]).long()
        pos = list(range(int(torch.cumprod(agree, 0).sum()) + 1))             # accepted drafts + bonus
    else:                                                                      # decode
        pos = [0]
    if pos and not torch.equal(r.out_token[b, pos], e.out_token[b, pos]):
        return dict(kind="tokens", positions=pos, reference=r.out_token[b, pos].tolist(),
                    engine=e.out_token[b, pos].tolist())
    return None
