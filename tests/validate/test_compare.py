"""validate(): teacher-forced per-pass comparison and free-running trajectories, on the tiny model."""

import copy
import json
import sys

import pytest
import torch

from nemodiff_compile.errors import InvalidArgument
from nemodiff_compile.backends.eager import TorchDenoiser
from nemodiff_compile.decoding import loops
from nemodiff_compile.validate import TOLERANCES, tolerances_for, validate
from nemodiff_compile.validate import metrics
from nemodiff_compile.validate.compare import trajectory_agreement
from nemodiff_compile.validate.shadow import ShadowDenoiser

PROMPTS = [[1, 40, 41, 42, 43, 44, 45], [1, 50, 51]]
KW = dict(max_new_tokens=16, block_length=8, threshold=0.3)


def den(model, logits=True):
    return TorchDenoiser(model, max_len=96, return_logits=logits)


@pytest.fixture(scope="module")
def perturbed(random_tiny):
    m = copy.deepcopy(random_tiny)
    w = m.encoder.layers[2].mlp.down_proj.weight
    with torch.no_grad():
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    return m


def test_model_against_itself_passes_with_zero_diffs(random_tiny):
    rep = validate(den(random_tiny), den(random_tiny), PROMPTS, **KW)
    assert rep.passed and rep.token_agreement == 1.0 and rep.first_divergence is None
    for m in rep.modes.values():
        w = m.worst()
        assert w["logits_max_abs_diff"] == 0 and w["conf_max_abs_diff"] == 0
        assert w["logits_cosine_min"] == pytest.approx(1.0) and m.forced_token_agreement == 1.0
        assert m.nfe["reference"] == m.nfe["engine"] == len(m.passes)
    assert rep.modes["dlm"].commit_agreement == 1.0 and rep.modes["ar"].commit_agreement is None
    js = json.loads(json.dumps(rep.to_json(per_pass=True)))
    assert {"passed", "token_agreement", "per_mode", "first_divergence", "tolerances", "passes_compared"} <= set(js)
    assert js["passes_compared"] == sum(len(m["passes"]) for m in js["per_mode"].values()) > 0
    table = rep.to_table()
    assert "PASSED" in table and all(mode in table for mode in loops.MODES)


def test_perturbed_copy_fails_and_reports_where(random_tiny, perturbed):
    rep = validate(den(random_tiny), den(perturbed), PROMPTS, modes=("dlm", "linear-spec"), **KW)
    assert not rep.passed and rep.token_agreement < 1.0
    div = rep.first_divergence
    assert div["mode"] == "dlm" and div["prompt"] in (0, 1) and div["pass_index"] is not None
    assert div["phase"] in ("prefill", "denoise", "commit") and div["kind"] in ("tokens", "commit set")
    fail = rep.first_failure
    assert fail["mode"] == "dlm" and fail["pass_index"] == 0 and fail["phase"] == "prefill"
    assert any("cosine" in f for f in fail["failures"])
    assert any("teacher-forced token agreement" in f for f in rep.failures)
    assert "FAILED" in rep.to_table() and "first divergence: dlm prompt" in rep.to_table()


def test_bf16_copy_is_close_but_not_exact(random_tiny):
    bf16 = copy.deepcopy(random_tiny).to(torch.bfloat16)
    rep = validate(den(random_tiny), den(bf16), PROMPTS, modes=("ar", "dlm"), tolerances=TOLERANCES["bf16"], **KW)
    for m in rep.modes.values():
        w = m.worst()
        assert 0 < w["logits_max_abs_diff"] < 0.2
        assert w["logits_cosine_min"] >= TOLERANCES["bf16"].cosine_min
        assert w["conf_max_abs_diff"] < 1e-2
        assert all(p.lengths_ok for p in m.passes)
    # random weights give near-flat distributions, so bf16 flips near-tied argmaxes: agreement is partial
    assert 0.5 < rep.token_agreement <= 1.0


def test_the_same_noise_reaches_both_sides_at_temperature(random_tiny):
    rep = validate(den(random_tiny, logits=False), den(random_tiny, logits=False), PROMPTS,
                   modes=("dlm",), temperature=1.0, seed=3, **KW)
    assert rep.passed and rep.token_agreement == 1.0
    assert all(p.logits is None for p in rep.modes["dlm"].passes)


@pytest.mark.parametrize("mode,kw", [("dlm", dict(threshold=0.3)), ("dlm", dict(threshold=None, steps=4)),
                                     ("linear-spec", dict(threshold=0.0)), ("linear-spec", dict(threshold=0.002))])
def test_commit_rule_reproduces_the_loop(random_tiny, mode, kw):
    shadow = ShadowDenoiser(den(random_tiny, False), den(random_tiny, False))
    g = loops.generate(shadow, PROMPTS, mode, max_new_tokens=8, block_length=8, trace=True, **kw)
    thr = kw["threshold"]
    rule = metrics.CommitRule("topk") if thr is None else metrics.CommitRule("threshold" if mode == "dlm" else "spec", thr)
    decisions = [(r, p) for r, p in zip(g.trace, shadow.passes) if r.phase in ("denoise", "draft")]
    assert decisions
    for rec, sp in decisions:
        assert torch.equal(rule.apply(sp.ref_conf, sp.tokens, rec.committed, random_tiny.config.mask_token_id),
                           rec.committed)


class DropsTrims:
    """A broken engine: ignores trim (rejected speculative K/V stays in the cache)."""

    def __init__(self, inner):
        self.inner, self.config, self.max_len = inner, inner.config, inner.max_len

    def reset(self, batch):
        self.inner.reset(batch)

    def lengths(self):
        return self.inner.lengths()

    def trim(self, lengths):
        pass

    def step(self, tokens, **kw):
        return self.inner.step(tokens, **kw)


def test_cache_discipline_bug_is_caught(random_tiny):
    broken = DropsTrims(TorchDenoiser(random_tiny, max_len=400))    # room for the K/V it never trims
    rep = validate(den(random_tiny), broken, PROMPTS, modes=("linear-spec",), **KW)
    assert not rep.passed
    assert "cache lengths differ" in rep.first_failure["failures"]
    assert rep.first_failure["phase"] == "verify"


def test_logits_metrics_without_polygraphy_match(monkeypatch):
    g = torch.Generator().manual_seed(0)
    r = torch.randn(2, 3, 50, generator=g)
    e = r + 1e-3 * torch.randn(2, 3, 50, generator=g)
    valid = torch.tensor([[True, True, False], [True, True, True]])
    with_pg = metrics.logits_metrics(e, r, valid, 1e-4, 1e-4)
    monkeypatch.setitem(sys.modules, "polygraphy.comparator.compare", None)      # import now fails
    without = metrics.logits_metrics(e, r, valid, 1e-4, 1e-4)
    assert with_pg["close"] is False and without["close"] is False
    for k in ("max_abs_diff", "max_rel_diff", "mean_abs_diff", "cosine_min"):
        assert without[k] == pytest.approx(with_pg[k], rel=1e-5)
    assert metrics.logits_metrics(e, r, valid, 1e-2, 1e-2)["close"] is True
    assert metrics.logits_metrics(e, r, valid, None, None)["close"] is None


def test_trajectory_agreement_counts_length_mismatch():
    assert trajectory_agreement([1, 2, 3], [1, 2, 3]) == (3, 3)
    assert trajectory_agreement([1, 2, 3], [1, 9]) == (1, 3)
    assert trajectory_agreement([], []) == (0, 0)


def test_tolerances_lookup_and_arguments(random_tiny):
    assert tolerances_for("bfloat16") is TOLERANCES["bf16"] and tolerances_for("FP32") is TOLERANCES["fp32"]
    with pytest.raises(InvalidArgument):
        tolerances_for("fp4")
    d = den(random_tiny)
    with pytest.raises(InvalidArgument):
        validate(d, d, PROMPTS)
    with pytest.raises(InvalidArgument):
        validate(d, den(random_tiny), PROMPTS, modes=("beam",))


def test_commit_rule_by_hand():
    """The validator's own rule (not the loop's functions) on hand-made rows: ties to the lower
    position, conf == threshold commits, top-k from the reference's count, spec fallbacks."""
    M = 9
    tokens = torch.tensor([[M, M, M, 4, M], [M, M, M, M, M]])
    conf = torch.tensor([[0.5, 0.7, 0.7, 0.99, 0.5], [0.1, 0.2, 0.2, 0.05, 0.3]])
    ref = torch.tensor([[True, False, False, False, False], [False, True, True, False, False]])
    rows = lambda rule: metrics.CommitRule(*rule).apply(conf, tokens, ref, M).int().tolist()  # noqa: E731
    assert rows(("threshold", 0.5)) == [[1, 1, 1, 0, 1], [0, 0, 0, 0, 1]]
    assert rows(("threshold", 0.9)) == [[0, 1, 0, 0, 0], [0, 0, 0, 0, 1]]     # top-1 only; tie: lower position
    assert rows(("topk",)) == [[0, 1, 0, 0, 0], [0, 1, 0, 0, 1]]               # k = 1 and 2 from ref
    assert rows(("spec", 0.6)) == [[0, 1, 1, 0, 0], [0, 0, 0, 0, 1]]           # none sure: the top one
    assert rows(("spec", 0.0)) == [[1, 1, 1, 0, 1], [1, 1, 1, 1, 1]]
    none = torch.zeros_like(ref)
    assert not metrics.CommitRule("threshold", 0.0).apply(conf, tokens, none, M).any()   # rows not taking part
