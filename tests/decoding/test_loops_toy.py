"""The decode loops against the model-free toy denoiser (toy_denoiser.py), checked row by row against
plain-Python references of each mode written from the research note's rules (no batching, no tensors,
no remask.py): tokens, finish reasons, NFE per phase and per row, the trace, the device-refiner path,
thinking budgets and bad arguments. Fast (the whole file is a second or two); the mutation run of
loops.py selects it (scripts/mutation.py)."""

from __future__ import annotations

import math

import pytest
import torch

from nemodiff_compile.decoding import loops
from nemodiff_compile.decoding.embeds import PromptImages
from nemodiff_compile.decoding.policy import DecodePolicy
from nemodiff_compile.decoding.refine import Refined
from nemodiff_compile.decoding.thinking import ThinkingBudget
from nemodiff_compile.errors import InvalidArgument

from toy_denoiser import HostRefiner, ToyDenoiser, ar_chain

PROMPTS = [[1, 40, 41, 42, 43], [1, 50], [1, 60, 61, 62, 63, 64, 65, 66]]
M = 100                    # mask id of the tiny config
END = 13                   # a thinking tag id the toy never produces by itself


# ---- plain-Python references, one row at a time -------------------------------------------------------

def _row(den, prompt):
    den.reset(1)
    return den


def _one(den, toks, causal, lora=False):
    out = den.step(torch.tensor([toks]), causal=causal, write=causal, draft_lora=lora)
    return out.token[0].tolist(), out.conf[0].tolist()


def _emit(row, toks, eos, cap):
    """Append toks to row up to the first EOS (included) and cap; returns the finish reason or None."""
    for t in toks:
        if len(row) == cap:
            return "length"
        row.append(t)
        if t in eos:
            return "eos"
    return "length" if len(row) == cap else None


def ref_ar(den, prompt, n, budget=None):
    """AR: tokens, finish, passes (prefill included) of one row."""
    _row(den, prompt)
    toks, _ = _one(den, prompt, True)
    tok, row, passes = toks[-1], [], 1
    while True:
        if budget is not None and END not in row and len(row) >= budget:
            tok = END
        fin = _emit(row, [tok], den.config.eos_ids, n)
        if fin:
            return row, fin, passes
        toks, _ = _one(den, [tok], True)
        tok, passes = toks[0], passes + 1


def ref_dlm(den, prompt, n, blen, threshold=None, steps=None):
    """Block diffusion of one row: tokens, finish, passes, and the refinement passes of each block."""
    eos = den.config.eos_ids
    _row(den, prompt)
    seed = _one(den, prompt, True)[0][-1]
    row, passes, per_block = [], 1, []
    for _ in range(math.ceil(n / blen)):
        blk = [seed] + [M] * (blen - 1)
        quota = [(blen - 1) // steps + (s < (blen - 1) % steps) for s in range(steps)] if steps else None
        used = 0
        for s in range(steps or blen):
            masked = [t == M for t in blk]
            first_eos = next((i for i, t in enumerate(blk) if t in eos), None)
            if not any(masked) or (first_eos is not None and not any(masked[:first_eos])):
                break
            tok, conf = _one(den, blk, False)
            used += 1
            order = sorted((i for i in range(blen) if masked[i]), key=lambda i: (-conf[i], i))
            if steps:
                pick = order[: quota[s]]
            else:
                pick = [order[0]] + [i for i in order if conf[i] >= threshold]
            for i in pick:
                blk[i] = tok[i]
        per_block.append(used)
        seed = _one(den, blk, True)[0][-1]
        passes += used + 1
        fin = _emit(row, blk, eos, n)
        if fin:
            return row, fin, passes, per_block
    return row, "length", passes, per_block


def ref_linear_spec(den, prompt, n, blen, threshold):
    """Linear self-speculation of one row: tokens, finish, draft passes, verify passes."""
    eos = den.config.eos_ids
    _row(den, prompt)
    seed = _one(den, prompt, True)[0][-1]
    row, drafts, verifies = [], 0, 0
    fin = _emit(row, [seed], eos, n)
    while not fin:
        start = len(den.hist[0])
        blk = [seed] + [M] * (blen - 1)
        while M in blk:
            tok, conf = _one(den, blk, False, lora=True)
            drafts += 1
            masked = [i for i in range(blen) if blk[i] == M]
            pick = [i for i in masked if conf[i] >= threshold] or [max(masked, key=lambda i: (conf[i], -i))]
            for i in pick:
                blk[i] = tok[i]
        ver = _one(den, blk, True)[0]
        verifies += 1
        acc = 0
        while acc < blen - 1 and ver[acc] == blk[acc + 1]:
            acc += 1
        den.trim(torch.tensor([start + acc + 1]))
        seed = ver[acc]
        fin = _emit(row, ver[: acc + 1], eos, n)
    return row, fin, drafts, verifies


def run_batch_against_refs(mode, den, prompts, **kw):
    g = loops.generate(den, prompts, mode, **kw)
    n = kw["max_new_tokens"]
    refs = []
    for p in prompts:
        if mode == "dlm":
            refs.append(ref_dlm(den, p, n, kw["block_length"], kw.get("threshold"), kw.get("steps")))
        else:
            refs.append(ref_ar(den, p, n))
    assert g.tokens == [r[0] for r in refs]
    assert g.finish == [r[1] for r in refs]
    return g, refs


# ---- AR ---------------------------------------------------------------------------------------------------

def test_ar_is_the_chain_of_causal_predictions():
    den = ToyDenoiser()
    g, refs = run_batch_against_refs("ar", den, PROMPTS, max_new_tokens=6)
    assert g.tokens[1] == ar_chain((1, 50), 6)
    assert g.row_nfe == [6, 6, 6] and g.nfe_by_phase == {"prefill": 1, "decode": 5} and g.nfe == 6
    assert g.finish == ["length"] * 3


def test_ar_rows_stop_at_their_own_eos():
    base = loops.generate(ToyDenoiser(), PROMPTS, "ar", max_new_tokens=8)
    eos = base.tokens[0][3]
    assert eos not in base.tokens[1] + base.tokens[0][:3]
    den = ToyDenoiser().with_eos(eos)
    g, refs = run_batch_against_refs("ar", den, PROMPTS, max_new_tokens=8)
    assert g.finish[0] == "eos" and g.tokens[0] == base.tokens[0][:4]
    assert g.row_nfe == [r[2] for r in refs]
    assert g.nfe == 1 + g.nfe_by_phase["decode"] == max(g.row_nfe)


def test_a_config_without_pad_id_pads_with_eos():
    den = ToyDenoiser(config=ToyDenoiser().config.replace(pad_token_id=None))
    g = loops.ar_generate(den, PROMPTS[:2], max_new_tokens=3, trace=True)
    assert g.trace[0].tokens[1].tolist() == PROMPTS[1] + [11, 11, 11]             # the (first) EOS id
    assert g.tokens == loops.ar_generate(ToyDenoiser(), PROMPTS[:2], max_new_tokens=3).tokens
    assert all(type(n) is int for n in g.row_nfe) and g.row_nfe == [3, 3]


def test_ar_trace_and_cache_discipline():
    den = ToyDenoiser()
    g = loops.ar_generate(den, PROMPTS[:2], max_new_tokens=3, trace=True)
    assert [(r.phase, r.block, r.step) for r in g.trace] == [("prefill", -1, 0), ("decode", 0, 0), ("decode", 1, 0)]
    pre = g.trace[0]
    assert pre.tokens.tolist() == [PROMPTS[0], PROMPTS[1] + [0, 0, 0]]        # right-padded with pad id 0
    assert [g.trace[1].tokens[b, 0].item() for b in (0, 1)] == [g.tokens[0][0], g.tokens[1][0]]
    assert pre.committed is None and pre.out_token.shape == pre.conf.shape == (2, 5)
    assert pre.logits.shape == (2, 5, 128) and torch.equal(pre.logits.argmax(-1), pre.out_token)
    bare = loops.ar_generate(ToyDenoiser(logits=False), PROMPTS[:2], max_new_tokens=3, trace=True)
    assert bare.tokens == g.tokens and all(r.logits is None for r in bare.trace)     # backends without logits
    assert all(c["causal"] and c["write"] and not c["draft_lora"] for c in den.calls)
    assert den.calls[1]["lengths"] == [5, 2]                                   # num_valid: padding not written
    assert den.lengths().tolist() == [7, 4]


# ---- block diffusion -----------------------------------------------------------------------------------

@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.9, 1.0])
def test_dlm_threshold_rule_matches_the_reference(threshold):
    den = ToyDenoiser()
    g, refs = run_batch_against_refs("dlm", den, PROMPTS, max_new_tokens=14, block_length=8, threshold=threshold)
    assert g.row_nfe == [r[2] for r in refs]
    per_block = list(zip(*[r[3] for r in refs]))
    assert g.nfe_by_phase == {"prefill": 1, "denoise": sum(max(p) for p in per_block), "commit": 2}
    assert g.nfe == sum(g.nfe_by_phase.values())
    if threshold == 1.0:
        assert all(p == (7,) * 3 for p in per_block)                 # one commit per pass
    if threshold == 0.0:
        assert all(p == (1,) * 3 for p in per_block)                 # the whole block in one pass


@pytest.mark.parametrize("steps", [1, 3, 7])
def test_dlm_fixed_steps_matches_the_reference(steps):
    den = ToyDenoiser()
    g, refs = run_batch_against_refs("dlm", den, PROMPTS[:2], max_new_tokens=16, block_length=8, steps=steps)
    assert g.row_nfe == [r[2] for r in refs] == [1 + 2 * (steps + 1)] * 2
    assert g.nfe_by_phase == {"prefill": 1, "denoise": 2 * steps, "commit": 2}


def test_dlm_rows_stop_at_eos_and_stop_refining():
    base = loops.generate(ToyDenoiser(), PROMPTS, "dlm", max_new_tokens=24, block_length=8, threshold=0.5)
    eos = next(t for i, t in enumerate(base.tokens[0]) if 9 <= i < 14 and t not in base.tokens[0][:i]
               and all(t not in r for r in base.tokens[1:]))
    den = ToyDenoiser().with_eos(eos)
    g, refs = run_batch_against_refs("dlm", den, PROMPTS, max_new_tokens=24, block_length=8, threshold=0.5)
    assert g.finish == ["eos", "length", "length"]
    assert g.row_nfe == [r[2] for r in refs] and g.row_nfe[0] < g.row_nfe[1]
    per_block = [r[3] for r in refs]
    want = sum(max(p[k] for p in per_block if k < len(p)) for k in range(3))
    assert g.nfe_by_phase == {"prefill": 1, "denoise": want, "commit": 3}


def test_dlm_all_rows_done_ends_the_loop():
    base = loops.generate(ToyDenoiser(), PROMPTS[:1], "dlm", max_new_tokens=32, block_length=8, threshold=0.5)
    eos = base.tokens[0][2]
    g = loops.generate(ToyDenoiser().with_eos(eos), PROMPTS[:1], "dlm", max_new_tokens=32, block_length=8,
                       threshold=0.5)
    assert g.finish == ["eos"] and g.nfe_by_phase["commit"] == 1 and g.tokens[0] == base.tokens[0][:3]


def test_dlm_trace_records_each_pass_and_its_commits():
    den = ToyDenoiser()
    g = loops.diffusion_generate(den, PROMPTS[:2], max_new_tokens=16, block_length=8, threshold=0.9, trace=True)
    phases = [r.phase for r in g.trace]
    assert phases.count("denoise") == g.nfe_by_phase["denoise"]
    assert phases[0] == "prefill" and phases.count("commit") == 2 and len(g.trace) == g.nfe
    for k in (0, 1):
        rec = [r for r in g.trace if r.block == k]
        den_recs = [r for r in rec if r.phase == "denoise"]
        assert [r.step for r in den_recs] == list(range(len(den_recs))) and den_recs
        assert rec[-1].phase == "commit" and rec[-1].committed is None
        for r in den_recs:                       # commits are masked positions of the pass's input
            assert r.committed is not None and bool(r.committed.any())
            assert not (r.committed & (r.tokens != M)).any()
        assert (rec[-1].tokens == torch.tensor([g.tokens[0][8 * k: 8 * k + 8], g.tokens[1][8 * k: 8 * k + 8]])).all()
    flags = {(c["causal"], c["write"], c["draft_lora"]) for c in den.calls}
    assert flags == {(True, True, False), (False, False, False)}


def test_dlm_streams_whole_blocks():
    chunks = {0: [], 1: []}
    g = loops.generate(ToyDenoiser(), PROMPTS[:2], "dlm", max_new_tokens=13, block_length=4, threshold=0.5,
                       on_tokens=lambda b, t: chunks[b].append(t))
    assert [len(c) for c in chunks[0]] == [4, 4, 4, 1] and [sum(chunks[b], []) for b in (0, 1)] == g.tokens


class RefiningToy(ToyDenoiser):
    def __init__(self, extra=3, sampling=False):
        super().__init__()
        self.extra, self.refiners, self.policies, self.sampling = extra, [], [], sampling

    def block_refiner(self, policy):
        self.policies.append(policy)
        if not policy.greedy and not self.sampling:     # a backend whose device loop runs greedy rules only
            return None
        self.refiners.append(HostRefiner(self, self.extra))
        return self.refiners[-1]


@pytest.mark.parametrize("kw", [dict(threshold=0.5), dict(steps=3)])
def test_device_refiner_gives_the_host_loop_result(kw):
    host = loops.generate(ToyDenoiser(), PROMPTS, "dlm", max_new_tokens=16, block_length=8, **kw)
    den = RefiningToy(extra=3)
    dev = loops.generate(den, PROMPTS, "dlm", max_new_tokens=16, block_length=8, **kw)
    assert (dev.tokens, dev.nfe_by_phase, dev.row_nfe) == (host.tokens, host.nfe_by_phase, host.row_nfe)
    assert host.device_passes == 0 and dev.device_passes == host.nfe_by_phase["denoise"] + 2 * 3
    (r,) = den.refiners
    canvas, refining, quota = r.seen[0]
    assert canvas[:, 1:].eq(M).all() and refining.all()
    assert (quota is None) == ("steps" not in kw)
    if quota is not None:
        assert quota.tolist() == [[3, 2, 2]] * 3


def test_sampled_device_refinement_draws_the_host_loops_noise():
    kw = dict(max_new_tokens=16, block_length=4, threshold=0.5, temperature=1.5, seed=7)
    host = loops.generate(ToyDenoiser(), PROMPTS, "dlm", **kw)
    den = RefiningToy(extra=2, sampling=True)
    dev = loops.generate(den, PROMPTS, "dlm", **kw)
    assert len(den.refiners) == 1 and dev.device_passes > 0
    assert (dev.tokens, dev.nfe_by_phase, dev.row_nfe) == (host.tokens, host.nfe_by_phase, host.row_nfe)


def test_device_refiner_is_skipped_when_tracing_disabled_or_declined():
    for kw in (dict(trace=True), dict(temperature=0.7), dict(device_refine=False)):
        den = RefiningToy()
        g = loops.generate(den, PROMPTS[:1], "dlm", max_new_tokens=8, block_length=8, threshold=0.5, **kw)
        host = loops.generate(ToyDenoiser(), PROMPTS[:1], "dlm", max_new_tokens=8, block_length=8, threshold=0.5, **kw)
        assert den.refiners == [] and g.device_passes == 0 and g.tokens == host.tokens, kw
        assert len(den.policies) == ("temperature" in kw), kw         # sampled: asked, and declined


def test_device_refiner_counts_nothing_for_a_block_with_no_pass():
    class NoPass(RefiningToy):
        def block_refiner(self, policy):
            class R:
                def refine(self, canvas, refining, quota, policy, noise=None):
                    return Refined(canvas, torch.zeros(len(canvas), dtype=torch.long), 0, 0)
            return R()
    g = loops.generate(NoPass(), PROMPTS[:1], "dlm", max_new_tokens=8, block_length=8, threshold=0.5)
    assert g.nfe_by_phase == {"prefill": 1, "commit": 1} and g.tokens[0][1:] == [M] * 7


# ---- linear self-speculation ----------------------------------------------------------------------------

@pytest.mark.parametrize("threshold", [0.0, 0.6])
def test_linear_spec_equals_ar_and_accepts_some_drafts(threshold):
    den = ToyDenoiser()
    ar = loops.generate(ToyDenoiser(), PROMPTS, "ar", max_new_tokens=20)
    g = loops.generate(den, PROMPTS, "linear-spec", max_new_tokens=20, block_length=6, threshold=threshold)
    assert g.tokens == ar.tokens and g.finish == ar.finish
    rounds = g.nfe_by_phase["verify"]
    assert 20 / 6 < rounds < 20                                   # drafts partly accepted
    assert g.nfe == 1 + rounds + g.nfe_by_phase["draft"]
    if threshold == 0.0:
        assert g.nfe_by_phase["draft"] == rounds
    else:
        assert g.nfe_by_phase["draft"] > rounds
    draft = [c for c in den.calls if c["draft_lora"]]
    assert len(draft) == g.nfe_by_phase["draft"] and not any(c["causal"] or c["write"] for c in draft)
    assert g.tokens_per_forward == pytest.approx(sum(20 / n for n in g.row_nfe) / 3)


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.95])
def test_linear_spec_matches_the_reference_row_by_row(threshold):
    for p in PROMPTS:
        g = loops.linear_spec_generate(ToyDenoiser(), [p], max_new_tokens=14, block_length=5, threshold=threshold)
        tokens, fin, drafts, verifies = ref_linear_spec(ToyDenoiser(), p, 14, 5, threshold)
        assert (g.tokens[0], g.finish[0]) == (tokens, fin)
        assert g.nfe_by_phase == {"prefill": 1, "draft": drafts, "verify": verifies}
        assert g.row_nfe == [1 + drafts + verifies]


def test_confidence_equal_to_the_threshold_commits():
    """Every confidence exactly 1.0 and threshold 1.0: one draft pass fills the block (>=, not >)."""
    g = loops.linear_spec_generate(ToyDenoiser(certain=True), PROMPTS[:2], max_new_tokens=12, block_length=4,
                                   threshold=1.0)
    assert g.nfe_by_phase["draft"] == g.nfe_by_phase["verify"]
    assert g.tokens == loops.ar_generate(ToyDenoiser(), PROMPTS[:2], max_new_tokens=12).tokens


def test_linear_spec_trace_and_default_block_length():
    g = loops.linear_spec_generate(ToyDenoiser(), PROMPTS[:2], max_new_tokens=10, block_length=4, threshold=0.9,
                                   trace=True)
    verify = [r for r in g.trace if r.phase == "verify"]
    assert len(verify) == g.nfe_by_phase["verify"] and len(g.trace) == g.nfe
    for k, v in enumerate(verify):
        draft = [r for r in g.trace if r.phase == "draft" and r.block == k]
        assert [r.step for r in draft] == list(range(len(draft))) and len(draft) >= 1
    assert sum(r.phase == "draft" for r in g.trace) == g.nfe_by_phase["draft"]
    den = ToyDenoiser()
    d = loops.linear_spec_generate(den, PROMPTS[:1], max_new_tokens=8)                  # block_size 16
    assert {c["shape"][1] for c in den.calls[1:]} == {16}
    assert d.tokens == loops.ar_generate(ToyDenoiser(), PROMPTS[:1], max_new_tokens=8).tokens


def test_untraced_runs_keep_no_trace():
    for mode in loops.MODES:
        fn = {"ar": loops.ar_generate, "dlm": loops.diffusion_generate, "linear-spec": loops.linear_spec_generate}
        g = fn[mode](ToyDenoiser(), PROMPTS[:1], max_new_tokens=4, block_length=4)
        assert g.trace == [], mode
    den = RefiningToy()
    loops.diffusion_generate(den, PROMPTS[:1], max_new_tokens=4, block_length=4, threshold=0.5)
    assert len(den.refiners) == 1 and den.policies[0].block_length == 4 and den.policies[0].threshold == 0.5


@pytest.mark.parametrize("mode", loops.MODES)
def test_streamed_chunks_add_up_to_the_result(mode):
    chunks = {0: [], 1: []}
    g = loops.generate(ToyDenoiser(), PROMPTS[:2], mode, max_new_tokens=11, block_length=4, threshold=0.5,
                       on_tokens=lambda b, t: chunks[b].append(t))
    assert [sum(chunks[b], []) for b in (0, 1)] == g.tokens and all(len(t) == 11 for t in g.tokens)
    assert all(chunks[b] for b in (0, 1)) and all(c for b in (0, 1) for c in chunks[b])
    if mode == "ar":
        assert all(len(c) == 1 for c in chunks[0])


def test_linear_spec_row_accounting_and_trim():
    den = ToyDenoiser()
    g = loops.linear_spec_generate(den, PROMPTS[:2], max_new_tokens=10, block_length=4, trace=True)
    verify = [r for r in g.trace if r.phase == "verify"]
    draft = [r for r in g.trace if r.phase == "draft"]
    assert [r.block for r in verify] == list(range(len(verify))) and all(r.step == 0 for r in draft)
    for d, v in zip(draft, verify):
        assert d.committed.tolist() == (d.tokens == M).tolist()          # threshold 0: every mask at once
        assert (v.tokens[:, 1:] == d.out_token[:, 1:]).all()
    for b in (0, 1):          # the cache: prompt + the emitted tokens before the last (the next seed)
        assert den.hist[b][: len(PROMPTS[b]) + 9] == PROMPTS[b] + g.tokens[b][:9]


def test_linear_spec_rows_stop_at_eos():
    ar = loops.generate(ToyDenoiser(), PROMPTS, "ar", max_new_tokens=16)
    eos = next(t for i, t in enumerate(ar.tokens[0]) if 4 <= i and t not in ar.tokens[0][:i]
               and all(t not in r for r in ar.tokens[1:]))
    ar = loops.generate(ToyDenoiser().with_eos(eos), PROMPTS, "ar", max_new_tokens=16)
    g = loops.generate(ToyDenoiser().with_eos(eos), PROMPTS, "linear-spec", max_new_tokens=16, block_length=4)
    assert g.tokens == ar.tokens and g.finish == ar.finish == ["eos", "length", "length"]
    assert g.row_nfe[0] < g.row_nfe[1]
    chunks = []
    loops.generate(ToyDenoiser(), PROMPTS[:1], "linear-spec", max_new_tokens=1, block_length=4,
                   on_tokens=lambda b, t: chunks.append(t))
    assert chunks == [ar.tokens[0][:1]]                            # the prefill's token alone


# ---- sampling, thinking, arguments ----------------------------------------------------------------------

@pytest.mark.parametrize("mode", loops.MODES)
def test_temperature_is_seeded(mode):
    kw = dict(max_new_tokens=8, block_length=4, temperature=2.0)
    a = loops.generate(ToyDenoiser(), PROMPTS[:2], mode, seed=1, **kw)
    b = loops.generate(ToyDenoiser(), PROMPTS[:2], mode, seed=1, **kw)
    c = loops.generate(ToyDenoiser(), PROMPTS[:2], mode, seed=2, **kw)
    greedy = loops.generate(ToyDenoiser(), PROMPTS[:2], mode, max_new_tokens=8, block_length=4)
    assert a.tokens == b.tokens and a.tokens != c.tokens and a.tokens != greedy.tokens


@pytest.mark.parametrize("mode", ["ar", "linear-spec"])
def test_thinking_budget_forces_the_tag_once_and_decoding_continues(mode):
    budget = ThinkingBudget(5, END)
    g = loops.generate(ToyDenoiser(), PROMPTS, mode, max_new_tokens=12, block_length=4, thinking=budget)
    for b, p in enumerate(PROMPTS):
        want = ref_ar(ToyDenoiser(), p, 12, budget=5)[0]
        assert g.tokens[b] == want and want[5] == END and want.count(END) == 1
        assert want[6:] == ar_chain(tuple(p + want[:6]), 6)


def test_thinking_budget_in_dlm_blocks():
    g = loops.generate(ToyDenoiser(), PROMPTS, "dlm", max_new_tokens=16, block_length=4, threshold=0.5,
                       thinking=ThinkingBudget(6, END))
    free = loops.generate(ToyDenoiser(), PROMPTS, "dlm", max_new_tokens=16, block_length=4, threshold=0.5)
    for b in range(3):
        assert g.tokens[b][6] == END and g.tokens[b].count(END) == 1
        assert g.tokens[b][:4] == free.tokens[b][:4]
    g0 = loops.generate(ToyDenoiser(), PROMPTS[:1], "dlm", max_new_tokens=8, block_length=4, threshold=0.5,
                        thinking=ThinkingBudget(0, END))
    assert g0.tokens[0][0] == END and g0.tokens[0].count(END) == 1


def test_a_row_that_closes_its_thinking_itself_is_left_alone():
    free = loops.generate(ToyDenoiser(), PROMPTS[:1], "ar", max_new_tokens=10)
    tag = free.tokens[0][2]                       # the model 'closes' at index 2 by itself
    g = loops.generate(ToyDenoiser(), PROMPTS[:1], "ar", max_new_tokens=10, thinking=ThinkingBudget(4, tag))
    assert g.tokens == free.tokens
    g = loops.generate(ToyDenoiser(), PROMPTS[:1], "dlm", max_new_tokens=12, block_length=4, threshold=0.5,
                       thinking=ThinkingBudget(100, END))
    assert END not in g.tokens[0]


@pytest.mark.parametrize("mode", loops.MODES)
def test_images_reach_the_prefill_only(mode):
    img = PromptImages(torch.tensor([1]), torch.tensor([[1.0, 2.0]]))
    den = ToyDenoiser()
    g = loops.generate(den, PROMPTS[:2], mode, max_new_tokens=6, block_length=4, images=[None, img])
    plain = loops.generate(ToyDenoiser(), PROMPTS[:2], mode, max_new_tokens=6, block_length=4)
    assert g.tokens[0] == plain.tokens[0] and g.tokens[1] != plain.tokens[1]
    e = den.calls[0]["embeds"]
    assert e.mask.tolist() == [[False] * 5, [False, True, False, False, False]]
    assert e.values[1, 1].tolist() == [1.0, 2.0] and all(c["embeds"] is None for c in den.calls[1:])


def test_bad_arguments_are_one_line_errors():
    den = ToyDenoiser(max_len=32)
    with pytest.raises(InvalidArgument, match="max_new_tokens 40: .* expected max_new_tokens <= 27,"):
        loops.generate(den, PROMPTS[:1], "ar", max_new_tokens=40)
    with pytest.raises(InvalidArgument, match="max_new_tokens 25"):
        loops.generate(den, PROMPTS[:1], "dlm", max_new_tokens=25, block_length=8)      # 5 + 4 blocks > 32
    with pytest.raises(InvalidArgument, match="max_new_tokens 20"):
        loops.generate(den, PROMPTS[:1], "linear-spec", max_new_tokens=20, block_length=8)  # 5 + 20 + 8 > 32
    loops.generate(den, PROMPTS[:1], "linear-spec", max_new_tokens=19, block_length=8)       # 5 + 19 + 8 fits
    loops.generate(den, PROMPTS[:1], "dlm", max_new_tokens=24, block_length=8)              # 5 + 24 fits
    den.calls.clear()
    with pytest.raises(InvalidArgument, match="prompt 1: token id 5000"):
        loops.generate(den, [[1, 2], [1, 5000]], "ar", max_new_tokens=2)
    with pytest.raises(InvalidArgument, match="^prompt: "):
        loops.generate(den, [[1, 5000]], "ar", max_new_tokens=2)
    with pytest.raises(InvalidArgument, match="^every prompt needs at least one token$"):
        loops.generate(den, [], "ar", max_new_tokens=2)
    with pytest.raises(InvalidArgument, match="the dlm loop got a ar policy"):
        loops.diffusion_generate(den, PROMPTS[:1], DecodePolicy("ar"), max_new_tokens=2)
    with pytest.raises(InvalidArgument, match="max_new_tokens"):
        loops.generate(den, PROMPTS[:1], "ar", max_new_tokens=0)
    assert den.calls == []                                          # nothing ran


def test_room_fallback_message_names_the_cache():
    den = ToyDenoiser(max_len=12)
    with pytest.raises(InvalidArgument) as e:
        loops.generate(den, [[1] * 5], "dlm", max_new_tokens=8, block_length=4)      # 5 + 8 > 12
    assert "max_new_tokens 8" in str(e.value) and "\n" not in str(e.value)


def test_policy_object_and_defaults():
    den = ToyDenoiser()
    a = loops.generate(den, PROMPTS[:1], DecodePolicy("dlm", block_length=4, threshold=0.5), max_new_tokens=8)
    b = loops.diffusion_generate(den, PROMPTS[:1], max_new_tokens=8, block_length=4, threshold=0.5)
    assert a.tokens == b.tokens
    d = loops.diffusion_generate(den, PROMPTS[:1], max_new_tokens=16)       # block_size 16, threshold 0.9
    assert d.nfe_by_phase["commit"] == 1 and len(d.tokens[0]) == 16
    assert ref_dlm(den, PROMPTS[0], 16, 16, 0.9)[0] == d.tokens[0]
    assert loops.Generation([[1]], ["length"], 1, {}, [0]).tokens_per_forward == 0.0
