"""The scheduler: rows of different prompts and policies share engine passes, and each gets exactly what it
gets alone (tokens and NFE), whatever the batching (passes over member rows only, whole-batch passes with
idle rows, fixed slots of a contract-only Denoiser); the queue refuses when full; cancelled rows leave."""

import asyncio
import threading

import pytest
import torch

from contract_denoiser import ContractOnly  # tests/contract_denoiser.py
from polling import until  # tests/polling.py

from nemodiff_compile.decoding import loops
from nemodiff_compile.decoding.policy import DecodePolicy
from nemodiff_compile.decoding.scheduler import Cancelled, QueueFull, Scheduler, SchedulerClosed
from nemodiff_compile.errors import InvalidArgument

PROMPTS = [[1, 40, 41, 42, 43], [1, 50, 51, 52, 53, 54, 55, 56], [1, 60, 61], [1, 70, 71, 72, 73, 74],
           [1, 80, 81, 82], [1, 90, 91, 92, 93, 94, 95, 96, 97], [1, 45, 46], [1, 57, 58, 59, 62]]
POLICIES = [DecodePolicy("ar"), DecodePolicy("dlm"), DecodePolicy("linear-spec"),
            DecodePolicy("dlm", steps=4, block_length=8), DecodePolicy("dlm", threshold=0.5),
            DecodePolicy("ar", temperature=0.8, seed=3), DecodePolicy("dlm", temperature=1.0, seed=5),
            DecodePolicy("linear-spec", threshold=0.5, block_length=8)]
NEW = 24


@pytest.fixture(scope="module")
def engine(tiny_engine):
    from nemodiff_compile.backends.open import open_engine

    return open_engine(tiny_engine, threads=1)


@pytest.fixture(scope="module")
def solo(engine):
    """Each prompt alone through the whole-batch loop: the reference every batching must reproduce."""
    return [loops.generate(engine.denoiser, [p], pol, max_new_tokens=NEW) for p, pol in zip(PROMPTS, POLICIES)]


def pass_phases(reqs) -> dict[int, set[str]]:
    """Engine pass index -> the phases of the rows that took part in it."""
    phases: dict[int, set[str]] = {}
    for r in reqs:
        for index, phase in r.passes:
            phases.setdefault(index, set()).add(phase)
    return phases


class OneFlag:
    """The engine as a scheduler sees one whose graph takes one causal flag per pass."""
    row_causal = False

    def __init__(self, den):
        self.den = den

    def __getattr__(self, name):
        return getattr(self.den, name)


@pytest.mark.parametrize("batching", ["member rows", "whole batch", "one flag per pass", "fixed slots"])
def test_every_row_equals_its_solo_run(engine, solo, batching, monkeypatch):
    """Member rows and whole batch: the graph's per-row causal input lets commits and verifies share passes with
    denoise rows; one flag per pass (graphs exported before it) and fixed slots keep the kinds apart."""
    den = engine.denoiser
    if batching == "whole batch":
        monkeypatch.setattr(den, "subset_passes", False)
    target = {"fixed slots": ContractOnly(den), "one flag per pass": OneFlag(den)}.get(batching, den)
    s = Scheduler(target, max_batch=8)
    try:
        reqs = [s.submit(p, pol, NEW) for p, pol in zip(PROMPTS, POLICIES)]
        gens = [r.result(120) for r in reqs]
    finally:
        s.close()
    for pol, want, got in zip(POLICIES, solo, gens):
        assert got.tokens == want.tokens, pol
        assert got.nfe_by_phase == want.nfe_by_phase and got.row_nfe == want.row_nfe, pol
    assert s.passes < sum(g.nfe for g in solo)                 # rows shared passes
    phases = pass_phases(reqs)
    mixed = any(p & {"commit", "verify"} and "denoise" in p for p in phases.values())
    assert mixed == (batching in ("member rows", "whole batch"))


def test_joiners_prefill_inside_commit_passes(engine):
    """A row joining mid-block prefills inside another row's commit pass (decoding/scheduler.py, riders) and
    still gets exactly its solo tokens and NFE."""
    den = engine.denoiser
    pols = [DecodePolicy("dlm", threshold=t) for t in (0.9, 0.5)] * 4
    want = [loops.generate(den, [p], pol, max_new_tokens=NEW) for p, pol in zip(PROMPTS, pols)]
    s = Scheduler(den, max_batch=3)
    try:
        with s.exclusive():                      # everything queued before the first pass: a fixed schedule
            reqs = [s.submit(p, pol, NEW) for p, pol in zip(PROMPTS, pols)]
        gens = [r.result(120) for r in reqs]
    finally:
        s.close()
    for pol, w, g in zip(pols, want, gens):
        assert g.tokens == w.tokens and g.nfe_by_phase == w.nfe_by_phase and g.row_nfe == w.row_nfe, pol
    phases = pass_phases(reqs)
    assert any({"prefill", "commit"} <= p for p in phases.values())
    assert s.passes == len(phases)


def test_queue_full_cancel_and_close(engine, solo):
    slow = ContractOnly(engine.denoiser, delay=0.02)
    s = Scheduler(slow, max_batch=1, max_queue=1)
    long = s.submit(PROMPTS[1], DecodePolicy("dlm", threshold=1.0), 48)     # one commit per pass: many passes
    until(lambda: s.stats()["running"] == 1, timeout=10)
    queued = s.submit(PROMPTS[0], POLICIES[0], NEW)
    with pytest.raises(QueueFull, match="max_queue 1"):
        s.submit(PROMPTS[2], POLICIES[0], NEW)
    long.cancel()                                      # frees its row: the queued request runs
    with pytest.raises(Cancelled):
        long.result(10)
    assert queued.result(30).tokens == solo[0].tokens
    s.close()
    with pytest.raises(SchedulerClosed):
        s.submit(PROMPTS[0], POLICIES[0], NEW)


def test_a_broken_consumer_cancels_only_its_row(engine, solo):
    s = Scheduler(engine.denoiser, max_batch=4)

    def broken(ids):
        raise RuntimeError("consumer gone")

    bad = s.submit(PROMPTS[1], POLICIES[1], NEW, on_tokens=broken)
    good = s.submit(PROMPTS[0], POLICIES[0], NEW)
    with pytest.raises(RuntimeError, match="consumer gone"):
        bad.result(30)
    assert good.result(30).tokens == solo[0].tokens
    with pytest.raises(InvalidArgument, match="outside the vocabulary"):
        s.submit([1, engine.config.vocab_size], POLICIES[0], NEW)      # refused before it reaches the engine
    with pytest.raises(InvalidArgument, match="cache positions"):
        s.submit(PROMPTS[0], POLICIES[0], engine.denoiser.max_len)
    s.close()


def test_session_threads_and_asyncio_are_batched(tiny_engine, solo):
    from nemodiff_compile.session import Session

    with Session.open(tiny_engine, threads=1, max_batch=8) as session:
        got: dict[int, list[int]] = {}

        def work(i):
            got[i] = session.generate(PROMPTS[i], policy=POLICIES[i], max_new_tokens=NEW).completions[0].tokens

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert got == {i: solo[i].tokens[0] for i in range(4)}

        alone = [session.generate(p, mode="dlm", max_new_tokens=NEW, trace=True).generation for p in PROMPTS[4:]]

        async def main():
            gens = await asyncio.gather(*(session.agenerate(p, mode="dlm", max_new_tokens=NEW) for p in PROMPTS[4:]))
            pieces = [p async for p in session.astream(PROMPTS[1], policy=POLICIES[1], max_new_tokens=NEW)]
            return gens, pieces

        before = session.scheduler.passes
        gens, pieces = asyncio.run(main())
        assert [g.completions[0].tokens for g in gens] == [a.tokens[0] for a in alone]
        assert "".join(pieces) == session.decode(solo[1].tokens[0])
        assert session.scheduler.passes - before - solo[1].nfe < sum(a.nfe for a in alone)     # they shared passes
        # a batch in one call: one merged Generation, nfe = the passes any of its rows took part in
        r = session.generate(PROMPTS[:2], mode="dlm", max_new_tokens=NEW)
        traced = session.generate(PROMPTS[1], mode="dlm", max_new_tokens=NEW, trace=True)    # the engine alone
        assert r.completions[1].tokens == traced.completions[0].tokens and traced.generation.trace
        assert max(r.generation.row_nfe) <= r.generation.nfe <= sum(r.generation.row_nfe)


def test_thinking_budgets_per_row(engine):
    """Each row forces its own closing tag where the whole-batch loops force it (decoding/thinking.py)."""
    from nemodiff_compile.decoding.thinking import ThinkingBudget

    end = 13                                                       # </think> in the tiny vocabulary
    prompt = engine.tokenizer.encode("Once upon a time, Tom")
    cases = [(mode, ThinkingBudget(b, end)) for mode in ("ar", "dlm", "linear-spec") for b in (0, 5, 20)]
    want = [loops.generate(engine.denoiser, [prompt], mode, max_new_tokens=NEW, thinking=t).tokens[0]
            for mode, t in cases]
    s = Scheduler(engine.denoiser, max_batch=8)
    try:
        reqs = [s.submit(prompt, DecodePolicy(mode), NEW, thinking=t) for mode, t in cases]
        got = [r.result(120).tokens[0] for r in reqs]
    finally:
        s.close()
    assert got == want
    assert all(row[t.max_tokens] == end for row, (_, t) in zip(got, cases) if len(row) > t.max_tokens)


def test_regroup_carries_rows_over(engine):
    """BackendDenoiser.regroup: kept rows keep their K/V and lengths in their new places."""
    den = engine.denoiser
    den.reset(3)
    den.step(torch.tensor([[1, 40, 41, 42]] * 3), causal=True, write=True, num_valid=torch.tensor([4, 2, 3]))
    k = den.k.clone()
    den.regroup([2, 0], 4)
    assert den.lengths().tolist() == [3, 4, 0, 0] and den.batch == 4
    assert torch.equal(den.k[:, 0, :, :3], k[:, 2, :, :3]) and torch.equal(den.k[:, 1, :, :4], k[:, 0, :, :4])


