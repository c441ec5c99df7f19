"""The embeddable Session over a built engine directory."""

import threading

import pytest

from nemodiff_compile.errors import NemodiffError
from nemodiff_compile.session import Session

PROMPTS = [[1, 40, 41, 42, 43], [1, 50, 51, 52, 53, 54, 55, 56]]


@pytest.fixture(scope="module")
def session(tiny_engine):
    with Session.open(tiny_engine, threads=1) as s:
        yield s


def test_generate_ids_and_text(session):
    r = session.generate(PROMPTS, mode="dlm", max_new_tokens=16)
    assert len(r.completions) == 2 and all(len(c.tokens) <= 16 for c in r.completions)
    assert r.generation.nfe == sum(r.generation.nfe_by_phase.values())
    single = session.generate(PROMPTS[1], mode="dlm", max_new_tokens=16)
    assert single.completions[0].tokens == r.completions[1].tokens
    if session.tokenizer is not None:
        t = session.generate("What is 3 + 4?", mode="ar", max_new_tokens=8)
        assert isinstance(t.text, str)


def test_stream_matches_generate(session):
    whole = session.generate(PROMPTS[0], mode="linear-spec", max_new_tokens=20)
    pieces = list(session.stream(PROMPTS[0], mode="linear-spec", max_new_tokens=20))
    if session.tokenizer is None:
        assert sum(pieces, []) == whole.completions[0].tokens
    else:
        assert "".join(pieces) == whole.completions[0].text
    assert len(pieces) >= 2


def test_threads_share_a_session(session):
    want = {i: session.generate(PROMPTS[i % 2], mode="dlm", max_new_tokens=12).completions[0].tokens
            for i in range(4)}
    got = {}

    def work(i):
        got[i] = session.generate(PROMPTS[i % 2], mode="dlm", max_new_tokens=12).completions[0].tokens

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


def test_closed_session_refuses(tiny_engine):
    s = Session.open(tiny_engine, threads=1)
    s.close()
    with pytest.raises(NemodiffError, match="closed"):
        s.generate(PROMPTS[0], max_new_tokens=4)


def test_a_decode_policy_or_its_knobs(session):
    from nemodiff_compile.decoding.policy import DecodePolicy

    policy = DecodePolicy("dlm", steps=4, block_length=8)
    a = session.generate(PROMPTS[0], policy=policy, max_new_tokens=8)
    b = session.generate(PROMPTS[0], mode="dlm", steps=4, block_length=8, max_new_tokens=8)
    assert a.completions[0].tokens == b.completions[0].tokens and a.generation.nfe_by_phase["denoise"] == 4
    with pytest.raises(NemodiffError, match="not both"):
        session.generate(PROMPTS[0], policy=policy, seed=1)
    with pytest.raises(NemodiffError, match="excludes threshold"):
        session.generate(PROMPTS[0], steps=4, threshold=0.5)
