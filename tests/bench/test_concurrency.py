"""bench/concurrency.py on the model-free toy engine: the closed-loop clients run every request once (their tokens
are the solo runs' tokens), concurrency 8 shares passes, and the ratio is the levels' tokens/s."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "decoding"))      # the toy engine's home
from toy_denoiser import BatchToy, ToyDenoiser  # noqa: E402  (tests/decoding/toy_denoiser.py)

from nemodiff_compile.bench.concurrency import clients, closed_loop, concurrency_ratio  # noqa: E402
from nemodiff_compile.decoding import loops  # noqa: E402
from nemodiff_compile.decoding.policy import DecodePolicy  # noqa: E402
from nemodiff_compile.decoding.scheduler import Scheduler  # noqa: E402

PROMPTS = [[1, 40 + i, 41 + i, 42 + i] for i in range(5)]
POLICY = DecodePolicy("dlm", block_length=4, threshold=0.9)


def solo_tokens(n: int, new: int) -> int:
    return sum(len(loops.generate(ToyDenoiser(), [PROMPTS[i % len(PROMPTS)]], POLICY, max_new_tokens=new).tokens[0])
               for i in range(n))


@pytest.mark.parametrize("concurrency", [1, 8])
def test_closed_loop_runs_each_request_once(concurrency):
    s = Scheduler(BatchToy(mixed=True), max_batch=8)
    try:
        r = closed_loop(s, PROMPTS, POLICY, concurrency=concurrency, requests=12, max_new_tokens=8)
    finally:
        s.close()
    assert r["tokens"] == solo_tokens(12, 8) and r["requests"] == 12 and r["passes"] == s.passes
    assert r["rows_per_pass"] == round(r["row_passes"] / r["passes"], 2)
    assert (r["rows_per_pass"] == 1.0) == (concurrency == 1)        # concurrent requests share passes


def test_concurrency_ratio_pools_rounds_and_divides_the_levels():
    log = []
    out = concurrency_ratio(BatchToy(mixed=True), PROMPTS, POLICY, levels=(1, 4), requests=lambda c: 2 * c,
                            rounds=2, max_new_tokens=8, log=log.append)
    one, four = out["levels"]
    assert (one["concurrency"], four["concurrency"]) == (1, 4) and len(log) == 4
    assert one["tokens"] == solo_tokens(2, 8) * 2 and four["tokens"] == solo_tokens(8, 8) * 2
    assert out["ratio"] == round(four["tokens_per_s"] / one["tokens_per_s"], 2)
    assert four["rows_per_pass"] > 1.0 == one["rows_per_pass"]


def test_clients_take_the_prompts_in_turn():
    seen = []
    assert clients(lambda p: seen.append(p) or p * 10, [1, 2, 3], concurrency=2, requests=5) == [10, 20, 30, 10, 20]
    assert sorted(seen) == [1, 1, 2, 2, 3]
    with pytest.raises(ValueError, match="concurrency 0"):
        clients(lambda p: p, [1], concurrency=0, requests=1)


def test_a_failing_request_is_raised():
    s = Scheduler(ToyDenoiser(max_len=8), max_batch=2)
    try:
        with pytest.raises(Exception, match="cache positions"):
            closed_loop(s, [[1] * 6], POLICY, concurrency=2, requests=2, max_new_tokens=8)
    finally:
        s.close()
