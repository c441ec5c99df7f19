"""The scheduler and its resumable rows (scheduler.py, rows.py) on the model-free toy denoiser: every row
gets exactly its solo `loops.generate` result (tokens, finish, NFE per phase and per row) under every
batching (member-row passes, whole-batch passes with idle rows, fixed slots), rows joining and leaving
mid-run, device refinement, sampling; plus the queue, cancellation, close, exclusive use, callbacks and
the observer. Fast (seconds); the mutation runs of scheduler.py and rows.py select it."""

from __future__ import annotations

import threading

import pytest
import torch

from nemodiff_compile.decoding import loops
from nemodiff_compile.decoding.policy import DecodePolicy
from nemodiff_compile.decoding.rows import Pass, Row, Trim, room
from nemodiff_compile.decoding.scheduler import Cancelled, QueueFull, Scheduler, SchedulerClosed
from nemodiff_compile.decoding.thinking import ThinkingBudget
from nemodiff_compile.errors import InvalidArgument

from toy_denoiser import BatchToy, HostRefiner, ToyDenoiser

PROMPTS = [[1, 40, 41, 42, 43], [1, 50, 51, 52, 53, 54, 55, 56], [1, 60, 61], [1, 70, 71, 72, 73, 74],
           [1, 80, 81, 82], [1, 90, 91, 92, 93, 94, 95], [1, 45, 46], [1, 57, 58, 59, 62]]
POLICIES = [DecodePolicy("ar"), DecodePolicy("dlm", block_length=8, threshold=0.5), DecodePolicy("linear-spec", block_length=4),
            DecodePolicy("dlm", steps=3, block_length=4), DecodePolicy("dlm", block_length=4),
            DecodePolicy("ar", temperature=0.8, seed=3), DecodePolicy("dlm", block_length=4, temperature=1.0, seed=5),
            DecodePolicy("linear-spec", threshold=0.6, block_length=4)]
NEW = 12


def solo(make, prompts=PROMPTS, policies=POLICIES, new=NEW, **kw):
    return [loops.generate(make(), [p], pol, max_new_tokens=new, **kw) for p, pol in zip(prompts, policies)]


def run_all(den, prompts=PROMPTS, policies=POLICIES, new=NEW, max_batch=8, **kw):
    s = Scheduler(den, max_batch=max_batch)
    try:
        reqs = [s.submit(p, pol, new, **kw) for p, pol in zip(prompts, policies)]
        gens = [r.result(30) for r in reqs]
    finally:
        s.close()
    return s, reqs, gens


def same(got, want):
    for g, w in zip(got, want):
        assert (g.tokens, g.finish, g.nfe_by_phase, g.row_nfe) == (w.tokens, w.finish, w.nfe_by_phase, w.row_nfe)


class Plain(ToyDenoiser):
    """Only the contract: no regroup, no subset passes (the scheduler's fixed slots)."""


@pytest.mark.parametrize("batching", ["member rows", "whole batch", "mixed member rows", "mixed whole batch",
                                      "fixed slots"])
@pytest.mark.parametrize("max_batch", [8, 3])
def test_every_row_equals_its_solo_run(batching, max_batch):
    make = {"member rows": lambda: BatchToy(subset=True), "whole batch": lambda: BatchToy(subset=False),
            "mixed member rows": lambda: BatchToy(subset=True, mixed=True),
            "mixed whole batch": lambda: BatchToy(subset=False, mixed=True), "fixed slots": Plain}[batching]
    den = make()
    s, reqs, gens = run_all(den, max_batch=max_batch)
    want = solo(ToyDenoiser)
    same(gens, want)
    assert s.passes < sum(g.nfe for g in want)                 # rows shared passes
    for r, g in zip(reqs, gens):                                # each row's passes, in order, with their phases
        assert len(r.passes) == g.nfe and [i for i, _ in r.passes] == sorted({i for i, _ in r.passes})
        assert {ph for _, ph in r.passes} == set(g.nfe_by_phase)
        assert r.done() and r.finished >= r.first_token >= r.submitted
    assert all(c["shape"][0] <= max_batch for c in den.calls)
    if batching.endswith("member rows"):
        assert any(c["shape"][0] < c["batch"] for c in den.calls)
    # causal rows beside bidirectional ones (a commit or verify beside denoise passes) only where the flag is per row
    assert any(isinstance(c["causal"], tuple) for c in den.calls) == batching.startswith("mixed")
    if batching != "fixed slots":                   # regrouped only when rows join or leave, not every pass
        assert 1 <= len(den.regroups) <= 2 * len(PROMPTS) < s.passes
    if batching == "fixed slots":
        assert all(c["shape"][0] == max_batch for c in den.calls)
    assert s.stats() == dict(queued=0, running=0, batch=s.stats()["batch"], max_batch=max_batch, passes=s.passes)


@pytest.mark.parametrize("batching", ["member rows", "fixed slots"])
def test_rows_leave_at_eos_and_others_join(batching):
    base = solo(ToyDenoiser)
    eos = base[0].tokens[0][2]                    # an id row 0 (ar) produces early
    make = (lambda: BatchToy().with_eos(eos)) if batching == "member rows" else (lambda: Plain().with_eos(eos))
    want = solo(make, new=20)
    assert want[0].finish == ["eos"]
    s, reqs, gens = run_all(make(), new=20, max_batch=2)
    same(gens, want)


def test_device_refinement_in_the_scheduler():
    class Refining(BatchToy):
        policies = []

        def block_refiner(self, policy):
            self.policies.append(policy)
            return HostRefiner(self, 2)                 # greedy and sampled policies alike

    pols = [DecodePolicy("dlm", block_length=4, threshold=0.5), DecodePolicy("dlm", block_length=4, threshold=0.5),
            DecodePolicy("dlm", block_length=4, steps=2), DecodePolicy("ar"),
            DecodePolicy("dlm", block_length=4, threshold=0.5, device_refine=False),
            DecodePolicy("dlm", block_length=4, threshold=0.5, temperature=1.5, seed=3),
            DecodePolicy("dlm", block_length=4, threshold=0.5, temperature=1.5, seed=4)]
    want = solo(ToyDenoiser, PROMPTS[:7], pols)
    den = Refining()
    s, reqs, gens = run_all(den, PROMPTS[:7], pols)
    same(gens, want)
    assert [g.device_passes > g.nfe_by_phase["denoise"] for g in gens[:3]] == [True] * 3
    assert gens[3].device_passes == gens[4].device_passes == 0
    assert den.policies == pols[:3] + pols[5:] and all(g.trace == [] for g in gens)
    assert gens[5].device_passes > 0 and gens[6].device_passes > 0            # sampled rows refined on the "device"
    for r, g in zip(reqs, gens):
        assert [ph for _, ph in r.passes].count("denoise") == g.nfe_by_phase.get("denoise", 0)
        assert [i for i, _ in r.passes] == sorted({i for i, _ in r.passes}) and len(r.passes) == g.nfe


def test_thinking_budget_per_row():
    cases = [(DecodePolicy(m, block_length=4), ThinkingBudget(b, 13)) for m in ("ar", "dlm", "linear-spec")
             for b in (3, 9)]
    want = [loops.generate(ToyDenoiser(), [PROMPTS[0]], p, max_new_tokens=NEW, thinking=t) for p, t in cases]
    s = Scheduler(BatchToy(), max_batch=6)
    reqs = [s.submit(PROMPTS[0], p, NEW, thinking=t) for p, t in cases]
    got = [r.result(30) for r in reqs]
    s.close()
    same(got, want)
    assert [g.tokens[0][t.max_tokens] for g, (_, t) in zip(got, cases)] == [13] * 6


def test_rows_stop_refining_at_eos_and_commit_at_the_threshold():
    free = loops.generate(ToyDenoiser(), PROMPTS[:1], "dlm", max_new_tokens=16, block_length=8, threshold=0.5)
    eos = free.tokens[0][10]                       # mid second block, masks may remain after it
    pols = [DecodePolicy("dlm", block_length=8, threshold=0.5)] * 2
    want = solo(lambda: ToyDenoiser().with_eos(eos), PROMPTS[:2], pols, new=16)
    assert want[0].finish == ["eos"]
    s, reqs, gens = run_all(BatchToy().with_eos(eos), PROMPTS[:2], pols, new=16)
    same(gens, want)
    pol = [DecodePolicy("linear-spec", block_length=4, threshold=1.0)]      # confidences of exactly 1.0
    want = solo(lambda: ToyDenoiser(certain=True), PROMPTS[:1], pol)
    s, reqs, gens = run_all(BatchToy(certain=True), PROMPTS[:1], pol)
    same(gens, want)
    assert gens[0].nfe_by_phase["draft"] == gens[0].nfe_by_phase["verify"]


class Gated(BatchToy):
    """Each pass waits for the test to open the gate (a slow engine, deterministically)."""

    def __init__(self):
        super().__init__()
        self.gate, self.entered = threading.Event(), threading.Semaphore(0)

    def step(self, tokens, **kw):
        self.entered.release()
        assert self.gate.wait(10)
        return super().step(tokens, **kw)


class Observer:
    def __init__(self):
        self.events = []

    def on_pass(self, seconds, members, batch, max_batch):
        self.events.append(("pass", members, batch, max_batch, seconds))

    def on_request(self, req):
        self.events.append(("request", req.id))

    def on_queue(self, n):
        self.events.append(("queue", n))
        raise RuntimeError("metrics never break decoding")


def test_queue_full_cancel_close_and_observer():
    den, obs = Gated(), Observer()
    s = Scheduler(den, max_batch=1, max_queue=1, observer=obs)
    long = s.submit(PROMPTS[1], DecodePolicy("dlm", block_length=8, threshold=1.0), 24)
    assert den.entered.acquire(timeout=10)                     # the long row is in its prefill
    queued = s.submit(PROMPTS[0], DecodePolicy("ar"), NEW, on_tokens=(streamed := []).extend)
    with pytest.raises(QueueFull, match="1 requests are already waiting .max_queue 1."):
        s.submit(PROMPTS[2], DecodePolicy("ar"), NEW)
    assert s.stats() == dict(queued=1, running=1, batch=1, max_batch=1, passes=0)
    seen = []
    long.add_done_callback(lambda r: seen.append(r.id))
    long.add_done_callback(lambda r: 1 / 0)                    # a broken callback stops nothing
    long.cancel()
    assert long.cancelled and not long.done()
    den.gate.set()
    with pytest.raises(Cancelled, match=f"request {long.id} was cancelled"):
        long.result(10)
    assert seen == [long.id]
    g = queued.result(10)
    assert g.tokens == solo(ToyDenoiser, PROMPTS[:1], POLICIES[:1])[0].tokens and streamed == g.tokens[0]
    late = []
    queued.add_done_callback(lambda r: late.append(r.id))      # already done: called at once
    assert late == [queued.id]
    s.close()
    with pytest.raises(SchedulerClosed, match="^the engine is shutting down$"):
        s.submit(PROMPTS[0], POLICIES[0], NEW)
    assert ("queue", 1) in obs.events and ("request", long.id) in obs.events and ("request", queued.id) in obs.events
    passes = [e for e in obs.events if e[0] == "pass"]
    assert len(passes) == s.passes and all(e[1:4] == (1, 1, 1) for e in passes)
    assert [e[1] for e in obs.events if e[0] == "queue"] == [1, 0, 1, 0]      # submitted, admitted, ...
    stuck = Gated()
    s2 = Scheduler(stuck, max_batch=1)
    with pytest.raises(TimeoutError, match=r"request \d+ not finished after 0.05 s"):
        s2.submit(PROMPTS[0], POLICIES[0], NEW).result(0.05)
    stuck.gate.set()
    s2.close()


def test_cancel_in_queue_and_close_without_drain():
    den = Gated()
    s = Scheduler(den, max_batch=1)
    running = s.submit(PROMPTS[0], DecodePolicy("ar"), NEW)
    assert den.entered.acquire(timeout=10)
    waiting = s.submit(PROMPTS[1], DecodePolicy("ar"), NEW)
    dropped = s.submit(PROMPTS[2], DecodePolicy("ar"), NEW)
    dropped.cancel()
    s.close(drain=False, timeout=0.01)
    den.gate.set()
    s._thread.join(10)
    with pytest.raises(Cancelled, match=f"^request {dropped.id} was cancelled$"):
        dropped.result(1)
    for r in (running, waiting):
        with pytest.raises(SchedulerClosed, match="^the engine was shut down$"):
            r.result(1)


def test_close_from_a_callback_on_the_schedulers_thread():
    """A consumer may close the scheduler from its on_tokens callback: close does not join its own thread, and the
    running request drains to its solo result."""
    s = Scheduler(ToyDenoiser(), max_batch=2)
    req = s.submit(PROMPTS[0], POLICIES[1], NEW, on_tokens=lambda ids: s.close())
    same([req.result(10)], solo(ToyDenoiser, PROMPTS[:1], POLICIES[1:2]))
    s._thread.join(10)
    assert not s._thread.is_alive()
    with pytest.raises(SchedulerClosed):
        s.submit(PROMPTS[1], POLICIES[1], NEW)


def test_close_drains_and_exclusive_waits_for_idle():
    den = Gated()
    s = Scheduler(den, max_batch=2)
    reqs = [s.submit(p, pol, NEW) for p, pol in zip(PROMPTS[:3], POLICIES[:3])]
    assert den.entered.acquire(timeout=10)        # the first row(s) in their prefill
    threading.Timer(0.05, den.gate.set).start()
    with s.exclusive() as d:                      # the running rows finish first; then the caller owns it
        assert d is den and reqs[0].done() and not reqs[2].done() and s.stats()["running"] == 0
        assert all(r.done() or not r.passes for r in reqs)       # rows ran to their end, or not at all
        assert s.stats()["queued"] == sum(not r.done() for r in reqs)
        mine = loops.generate(d, PROMPTS[:2], "ar", max_new_tokens=4)
    assert mine.tokens == loops.generate(ToyDenoiser(), PROMPTS[:2], "ar", max_new_tokens=4).tokens
    after = s.submit(PROMPTS[3], POLICIES[0], NEW)                # the engine's rows are restarted
    s.close()
    assert not s._thread.is_alive()                               # close joins the scheduler's thread
    same([r.result(1) for r in reqs + [after]], solo(ToyDenoiser, PROMPTS[:4], POLICIES[:3] + POLICIES[:1]))
    with pytest.raises(SchedulerClosed):
        with s.exclusive():
            pass


def test_a_failing_engine_fails_its_rows_and_recovers():
    class Flaky(BatchToy):
        fail = True

        def step(self, tokens, **kw):
            if self.fail and kw.get("causal") and tokens.shape[1] > 1 and len(self.calls) > 2:
                self.fail = False
                raise RuntimeError("device lost")
            return super().step(tokens, **kw)

    obs = Observer()
    s = Scheduler(Flaky(), max_batch=2, observer=obs)
    a = s.submit(PROMPTS[1], DecodePolicy("dlm", block_length=4), NEW)
    with pytest.raises(RuntimeError, match="device lost"):
        a.result(10)
    assert ("request", a.id) in obs.events
    b = s.submit(PROMPTS[0], POLICIES[0], NEW)
    assert b.result(10).tokens == solo(ToyDenoiser, PROMPTS[:1], POLICIES[:1])[0].tokens
    s.close()


def test_a_broken_consumer_cancels_only_its_row():
    s = Scheduler(BatchToy(), max_batch=4)

    def broken(ids):
        raise ValueError("consumer gone")

    bad = s.submit(PROMPTS[1], POLICIES[1], NEW, on_tokens=broken)
    good = s.submit(PROMPTS[0], POLICIES[0], NEW)
    with pytest.raises(ValueError, match="consumer gone"):
        bad.result(10)
    assert bad.cancelled and len(bad.passes) < solo(ToyDenoiser, PROMPTS[1:2], POLICIES[1:2])[0].nfe   # it left early
    assert good.result(10).tokens == solo(ToyDenoiser, PROMPTS[:1], POLICIES[:1])[0].tokens
    s.close()


def test_fixed_slots_free_a_finished_rows_cache():
    """A long AR row finishes first; its slot's cache length must drop to 0, else the dlm row's blocks no
    longer fit next to it (whole-batch passes on a plain denoiser)."""
    den = Plain(max_len=40)
    pols = [DecodePolicy("ar"), DecodePolicy("dlm", block_length=8, threshold=1.0)]
    s = Scheduler(den, max_batch=2)
    a = s.submit([1] + list(range(30, 37)), pols[0], 26)             # 8 + 26 positions
    b = s.submit([1, 60, 61], pols[1], 32)                           # 3 + 32 positions, 33 passes
    ga, gb = a.result(10), b.result(10)
    s.close()
    assert ga.tokens == loops.generate(ToyDenoiser(), [[1] + list(range(30, 37))], pols[0], max_new_tokens=26).tokens
    assert gb.tokens == loops.generate(ToyDenoiser(), [[1, 60, 61]], pols[1], max_new_tokens=32).tokens


def test_rows_refuse_bad_requests_in_one_line():
    den = ToyDenoiser(max_len=24)
    with pytest.raises(InvalidArgument, match="^every prompt needs at least one token$"):
        Row(den, [], DecodePolicy("ar"), 4)
    assert Row(den, [1] * 4, DecodePolicy("dlm"), 16).policy.block_length == 16      # the model's block_size
    with pytest.raises(InvalidArgument, match="prompt: token id 2000 is outside"):
        Row(den, [1, 2000], DecodePolicy("ar"), 4)
    with pytest.raises(InvalidArgument, match="max_new_tokens 0"):
        Row(den, [1], DecodePolicy("ar"), 0)
    with pytest.raises(InvalidArgument, match="max_new_tokens 20: .* 28 cache positions"):
        Row(den, [1] * 8, DecodePolicy("ar"), 20)
    Row(den, [1] * 8, DecodePolicy("ar"), 16)                                    # 8 + 16 fits
    with pytest.raises(InvalidArgument, match="max_new_tokens 17"):
        Row(den, [1] * 8, DecodePolicy("dlm", block_length=4), 17)                # 4 blocks: 8 + 16 fits, 5 do not
    Row(den, [1] * 8, DecodePolicy("dlm", block_length=4), 16)
    with pytest.raises(InvalidArgument, match="max_new_tokens 13"):
        Row(den, [1] * 8, DecodePolicy("linear-spec", block_length=4), 13)        # 8 + 13 + 4 > 24
    Row(den, [1] * 8, DecodePolicy("linear-spec", block_length=4), 12)
    assert room(DecodePolicy("dlm", block_length=4), 5) == 8 and room(DecodePolicy("ar"), 5) == 5
    assert room(DecodePolicy("linear-spec", block_length=4), 5) == 9
    s = Scheduler(den, max_batch=1)
    with pytest.raises(InvalidArgument, match="outside the vocabulary"):
        s.submit([1, 5000], POLICIES[0], 4)
    s.close()
    assert den.calls == []


def test_row_program_steps():
    """A linear-spec row's program: prefill, draft (LoRA), verify, a Trim to prompt + accepted + 1."""
    den = ToyDenoiser()
    row = Row(den, PROMPTS[2], DecodePolicy("linear-spec", block_length=4), 6)
    den.reset(1)
    step = next(row.program)
    assert isinstance(step, Pass) and (step.phase, step.causal, step.length) == ("prefill", True, 3)
    length = 3
    while True:
        out = den.step(step.tokens, causal=step.causal, write=step.causal, draft_lora=step.draft_lora)
        row.count(step.phase)
        try:
            step = row.program.send(out)
            while isinstance(step, Trim):
                assert step.length > length
                length = step.length
                den.trim(torch.tensor([length]))
                step = row.program.send(None)
        except StopIteration:
            break
        assert step.draft_lora == (step.phase == "draft") and step.causal == (step.phase == "verify")
    want = loops.generate(ToyDenoiser(), [PROMPTS[2]], "linear-spec", max_new_tokens=6, block_length=4)
    assert row.generation().tokens == want.tokens and row.finished
    assert row.generation().nfe_by_phase == want.nfe_by_phase


def test_a_waiting_row_is_not_starved():
    """Which pass next: the kind with the most rows plus the longest wait. One dlm row against three AR
    rows (all prefilled together) gets every fourth pass: 3 + 0 beats 1 + 1, 1 + 2, ties 1 + 3, loses to 1 + 4."""
    den = Gated()
    s = Scheduler(den, max_batch=5)
    first = s.submit([1, 30], DecodePolicy("ar"), 1)                   # holds the engine in its prefill
    assert den.entered.acquire(timeout=10)
    ar = [s.submit([1, 40 + i, 41], DecodePolicy("ar"), 16) for i in range(3)]
    dlm = s.submit([1, 70, 71], DecodePolicy("dlm", block_length=4, threshold=1.0), 8)
    den.gate.set()
    gens = [r.result(10) for r in ar + [dlm, first]]
    s.close()
    assert {r.passes[0] for r in ar + [dlm]} == {(1, "prefill")}      # the joiners prefilled together
    steps = [i for i, ph in dlm.passes if ph != "prefill"]
    assert steps[:3] == [5, 9, 13] and max(i for r in ar for i, _ in r.passes) > 13
    same(gens[3:4], solo(ToyDenoiser, [[1, 70, 71]], [DecodePolicy("dlm", block_length=4, threshold=1.0)], new=8))


def test_a_row_that_needs_the_whole_cache_fits():
    den = ToyDenoiser(max_len=24)
    s = Scheduler(den, max_batch=2)
    g = s.submit([1] * 8, DecodePolicy("ar"), 16).result(10)               # its last pass ends at position 24
    h = s.submit([1] * 8, DecodePolicy("dlm", block_length=4), 16).result(10)
    s.close()
    assert g.tokens == loops.generate(ToyDenoiser(), [[1] * 8], "ar", max_new_tokens=16).tokens
    assert h.tokens == loops.generate(ToyDenoiser(), [[1] * 8], "dlm", max_new_tokens=16, block_length=4).tokens


@pytest.mark.parametrize("subset", [True, False])
def test_observer_sees_each_pass(subset):
    obs = Observer()
    obs.on_queue = lambda n: None
    s = Scheduler(BatchToy(subset=subset), max_batch=4, observer=obs)
    reqs = [s.submit(p, pol, 6) for p, pol in zip(PROMPTS[:4], POLICIES[:4])]
    [r.result(10) for r in reqs]
    s.close()
    passes = [e for e in obs.events if e[0] == "pass"]
    assert len(passes) == s.passes and all(e[3] == 4 and 1 <= e[1] <= e[2] <= 4 for e in passes)
    assert all(isinstance(e[4], float) and 0 <= e[4] < 60 for e in passes)          # seconds
    if subset:                                      # the pass ran over its member rows only
        assert all(e[1] == e[2] for e in passes)
    else:
        assert any(e[1] < e[2] for e in passes)
    assert sorted(e[1] for e in obs.events if e[0] == "request") == sorted(r.id for r in reqs)


@pytest.mark.parametrize("batching", ["member rows", "fixed slots"])
def test_image_prompts_equal_their_solo_runs(batching):
    """A row's image features reach its own prefill (never a rider in another row's pass), as in the loops."""
    from nemodiff_compile.decoding.embeds import PromptImages

    img = PromptImages(torch.tensor([1]), torch.tensor([[1.0, 2.0]]))
    pols = [DecodePolicy("dlm", block_length=4, threshold=0.5), DecodePolicy("ar"), DecodePolicy("linear-spec", block_length=4)]
    want = [loops.generate(ToyDenoiser(), [p], pol, max_new_tokens=NEW, images=[img]) for p, pol in zip(PROMPTS[:3], pols)]
    den = BatchToy() if batching == "member rows" else Plain()
    s = Scheduler(den, max_batch=3)
    reqs = [s.submit(p, pol, NEW, images=img) for p, pol in zip(PROMPTS[:3], pols)]
    got = [r.result(10) for r in reqs]
    s.close()
    same(got, want)
    assert sum(c["embeds"] is not None for c in den.calls) >= 1


class Joining(BatchToy):
    """Runs `hooks[n](self)` inside its n-th pass (on the scheduler's thread): a row submitted there joins
    at the next pass boundary, deterministically. Keeps each pass's tokens and num_valid; checks that only
    a sampled pass gets Gumbel noise, in float64 as `remask.gumbel_noise` draws it (a [B, L, V] tensor)."""

    def __init__(self, hooks=(), **kw):
        super().__init__(**kw)
        self.hooks, self.seen = dict(hooks), []

    def step(self, tokens, **kw):
        noise = kw.get("noise")                 # the rows' own float64 draws, only for a sampled pass
        assert noise is None or (noise.dtype == torch.float64 and kw["temperature"] > 0), "greedy passes carry no noise"
        self.seen.append((tokens.clone(), None if kw.get("num_valid") is None else kw["num_valid"].clone()))
        hook = self.hooks.pop(len(self.calls), None)
        if hook is not None:
            hook(self)
        return super().step(tokens, **kw)


def _commit_call(prompt, pol, new):
    """The pass index of a solo dlm row's first commit (a causal pass of its block length)."""
    den = ToyDenoiser()
    loops.generate(den, [prompt], pol, max_new_tokens=new)
    return next(i for i, c in enumerate(den.calls) if i > 0 and c["causal"])


@pytest.mark.parametrize("joiner,rides", [
    ("text, block length", True), ("text, shorter", True), ("text, longer than the block", False),
    ("image prompt", False), ("sampled into a greedy pass", False), ("sampled into a sampled pass", True)])
@pytest.mark.parametrize("subset", [True, False])
def test_a_row_joining_mid_block_rides_the_commit_pass(joiner, rides, subset):
    """A text prefill that fits a causal pass of the same temperature runs in it (no pass of its own: its
    first pass is the running row's commit); every row still equals its solo run."""
    from nemodiff_compile.decoding.embeds import PromptImages

    t = 1.0 if joiner == "sampled into a sampled pass" else 0.0
    pol_a = DecodePolicy("dlm", block_length=4, threshold=1.0, temperature=t, seed=7)
    prompt_b = {"text, block length": [1, 61, 62, 63], "text, longer than the block": [1, 61, 62, 63, 64]}.get(
        joiner, [1, 61, 62])
    pol_b = (DecodePolicy("ar", temperature=0.9 if t == 0 else t, seed=2) if joiner.startswith("sampled")
             else DecodePolicy("ar"))
    img = PromptImages(torch.tensor([1]), torch.tensor([[1.0, 2.0]])) if joiner == "image prompt" else None
    commit = _commit_call(PROMPTS[0], pol_a, 8)
    s = Scheduler(Joining({commit - 1: lambda den: box.append(s.submit(prompt_b, pol_b, 6, images=img))},
                          subset=subset), max_batch=2)
    box = []
    a = s.submit(PROMPTS[0], pol_a, 8)
    ga = a.result(10)
    gb = box[0].result(10)
    s.close()
    same([ga], solo(ToyDenoiser, PROMPTS[:1], [pol_a], new=8))
    want_b = loops.generate(ToyDenoiser(), [prompt_b], pol_b, max_new_tokens=6, images=None if img is None else [img])
    same([gb], [want_b])
    assert a.passes[commit] == (commit, "commit")
    if rides:
        assert box[0].passes[0] == (commit, "prefill")
    else:
        assert box[0].passes[0][0] > commit and box[0].passes[0][1] == "prefill"


@pytest.mark.parametrize("subset", [True, False])
def test_where_passes_mix_a_joiner_rides_a_denoise_pass(subset):
    """With a causal flag per row a prefill that fits rides any pass of its temperature but a draft: a joiner
    submitted during the running row's first denoise pass prefills inside its second (a causal row beside a
    bidirectional one, writing only its own cache); both rows equal their solo runs."""
    pol_a = DecodePolicy("dlm", block_length=4, threshold=1.0)        # one position per pass: 4 denoise passes
    s = Scheduler(Joining({1: lambda den: box.append(s.submit([1, 61, 62], DecodePolicy("ar"), 6))},
                          subset=subset, mixed=True), max_batch=2)
    box = []
    a = s.submit(PROMPTS[0], pol_a, 8)
    ga, gb = a.result(10), box[0].result(10)
    s.close()
    same([ga], solo(ToyDenoiser, PROMPTS[:1], [pol_a], new=8))
    same([gb], [loops.generate(ToyDenoiser(), [[1, 61, 62]], DecodePolicy("ar"), max_new_tokens=6)])
    assert a.passes[:3] == [(0, "prefill"), (1, "denoise"), (2, "denoise")]
    assert box[0].passes[0] == (2, "prefill")


def test_a_joiner_waits_one_pass_when_tied_with_a_running_row():
    """Which pass next: most rows plus longest wait, ties to the earlier row. A prefill joining a running
    AR row (1 + 0 against 1 + 0) waits one pass, then wins (1 + 1)."""
    s = Scheduler(Joining({3: lambda den: box.append(s.submit([1, 61, 62], DecodePolicy("ar"), 4))}), max_batch=2)
    box = []
    a = s.submit(PROMPTS[0], DecodePolicy("ar"), 10)
    a.result(10), box[0].result(10)
    s.close()
    assert box[0].passes[0] == (5, "prefill") and (4, "decode") in a.passes and (5, "decode") not in a.passes


def test_prompts_of_any_length_prefill_together():
    den = Gated()
    s = Scheduler(den, max_batch=4)
    first = s.submit([1, 30], DecodePolicy("ar"), 1)
    assert den.entered.acquire(timeout=10)
    reqs = [s.submit(p, DecodePolicy("ar"), 4) for p in PROMPTS[:3]]          # 5, 8 and 3 tokens
    den.gate.set()
    got = [r.result(10) for r in reqs]
    first.result(10)
    s.close()
    assert [r.passes[0] for r in reqs] == [(1, "prefill")] * 3
    same(got, solo(ToyDenoiser, PROMPTS[:3], [DecodePolicy("ar")] * 3, new=4))


@pytest.mark.parametrize("batching", ["whole batch", "member rows", "device refinement"])
def test_the_cache_limit_bounds_each_pass_while_another_row_runs(batching):
    """A long AR row fills the cache to its end while a dlm row runs blocks of 4: a pass over the whole
    batch (whole-batch passes, device refinement) must wait until the AR row leaves room; a member-only
    pass need not."""
    class Refining(Joining):
        def block_refiner(self, policy):
            return HostRefiner(self, 0)

    pols = [DecodePolicy("ar"), DecodePolicy("dlm", block_length=4, threshold=1.0, device_refine=batching != "member rows")]
    join = {8: lambda den: box.append(s.submit([1, 60, 61], pols[1], 20))}           # 3 + 20 positions
    den = Refining(join, max_len=24, subset=False) if batching == "whole batch" else (
        Refining(join, max_len=24) if batching == "device refinement" else Joining(join, max_len=24))
    s = Scheduler(den, max_batch=2)
    box = []
    a = s.submit([1] * 8, pols[0], 16)                                                # 8 + 16 positions
    ga = a.result(10)
    b = box[0]
    gb = b.result(10)
    s.close()
    same([ga, gb], [solo(ToyDenoiser, [[1] * 8], pols[:1], new=16)[0], solo(ToyDenoiser, [[1, 60, 61]], pols[1:], new=20)[0]])
    near = next(i for i, c in enumerate(den.calls) if c["lengths"][0] > 20)        # no room for a block next to it
    assert max(i for i, _ in b.passes) > near
    assert all(max(c["lengths"]) + c["shape"][1] <= 24 or c["shape"][0] < c["batch"] for c in den.calls)
    late = [c for c in den.calls if c["batch"] == 2 and c["lengths"][0] + 4 > 24 and c["shape"][1] == 4]
    if batching == "member rows":                  # the dlm row went on while the AR row was near the end
        assert late and all(c["rows"] == [1] for c in late)
    elif batching == "whole batch":                # the dlm row waited for the AR row to leave
        assert not late
    else:                                          # its refinements (over the whole batch) waited, its commits not
        assert late and all(c["causal"] and c["rows"] == [1] for c in late)


@pytest.mark.parametrize("pad", [0, None])
def test_idle_rows_and_short_prompts_are_padded(pad):
    """Whole-batch passes: idle rows get pad tokens (the first EOS without a pad id), a prompt shorter than
    the pass is right-padded and num_valid is its length."""
    pol = DecodePolicy("dlm", block_length=4)
    commit = _commit_call(PROMPTS[1], pol, 8)                  # the joiner's prompt rides this causal pass
    den = Joining({commit - 1: lambda den: box.append(s.submit([1, 61, 62], DecodePolicy("ar"), 4))}, subset=False)
    den.config = den.config.replace(pad_token_id=pad)
    fill = den.config.eos_ids[0] if pad is None else pad
    s = Scheduler(den, max_batch=2)
    box = []
    a = s.submit(PROMPTS[1], pol, 8)
    a.result(10), box[0].result(10)
    s.close()
    for tokens, num_valid in den.seen:
        for row, n in zip(tokens, num_valid):
            assert (row[int(n):] == fill).all()
    assert sum(bool((row == fill).all()) for tokens, _ in den.seen for row in tokens) >= 2     # idle rows
    assert any(int(n) < tokens.shape[1] for tokens, nv in den.seen for n in nv)               # a padded prompt


def test_max_batch_comes_from_the_engines_buckets():
    from nemodiff_compile.artifact.buckets import BatchBuckets

    den = BatchToy()
    s = Scheduler(den)
    assert s.max_batch == 8
    assert s._thread in [t for t in threading.enumerate() if t.name == "nemodiff-scheduler" and t.daemon]  # never blocks exit
    s.close()
    den.buckets = BatchBuckets((1, 2, 6))
    s = Scheduler(den)
    assert s.max_batch == 6 and s.stats()["max_batch"] == 6
    s.close()
    with pytest.raises(InvalidArgument, match=r"^batch 7 exceeds the largest batch bucket 6 \(buckets \[1, 2, 6\]\)"):
        Scheduler(den, max_batch=7)


def test_request_state_before_it_runs_and_the_default_queue_bound():
    den = Gated()
    s = Scheduler(den, max_batch=1)
    running = s.submit([1, 30], DecodePolicy("ar"), 2)
    assert den.entered.acquire(timeout=10)
    queued = [s.submit([1, 31], DecodePolicy("ar"), 1) for _ in range(256)]
    assert queued[0].first_token is None and queued[0].finished is None and queued[0].error is None
    assert queued[0].cancelled is False and queued[0].passes == [] and not queued[0].done()
    with pytest.raises(QueueFull, match=r"256 requests .*max_queue 256"):
        s.submit([1, 31], DecodePolicy("ar"), 1)
    t0 = running.submitted
    den.gate.set()
    gens = [r.result(10) for r in [running] + queued[:3]]
    s.close()
    assert running.submitted <= running.first_token <= running.finished and running.error is None
    assert t0 <= queued[0].submitted and queued[0].finished >= queued[0].first_token >= running.finished
    assert gens[1].tokens == gens[2].tokens


def test_a_failing_regroup_fails_the_joiners_it_did_not_place():
    class Flaky(BatchToy):
        fail = True

        def regroup(self, keep, batch):
            if self.fail:
                self.fail = False
                raise RuntimeError("out of memory in regroup")
            super().regroup(keep, batch)

    s = Scheduler(Flaky(), max_batch=2)
    a = s.submit(PROMPTS[0], POLICIES[0], NEW)
    with pytest.raises(RuntimeError, match="out of memory in regroup"):
        a.result(10)
    b = s.submit(PROMPTS[1], POLICIES[1], NEW)                       # the engine's rows restart afresh
    same([b.result(10)], solo(ToyDenoiser, PROMPTS[1:2], POLICIES[1:2]))
    s.close()
