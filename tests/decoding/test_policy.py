"""DecodePolicy: every decoding default resolved and checked in one place; the refinement driver."""

import pytest

from nemodiff_compile.decoding import loops
from nemodiff_compile.decoding.policy import DecodePolicy
from nemodiff_compile.decoding.refine import drive
from nemodiff_compile.errors import InvalidArgument


def test_defaults_resolved_once(tiny_cfg):
    assert DecodePolicy("dlm").threshold == 0.9 and DecodePolicy("linear-spec").threshold == 0.0
    assert DecodePolicy("ar").threshold is None and DecodePolicy().mode == "dlm"
    steps = DecodePolicy("dlm", steps=4)
    assert steps.threshold is None and steps.steps == 4
    r = DecodePolicy("dlm").resolve(tiny_cfg)
    assert r.block_length == tiny_cfg.block_size and r.passes == tiny_cfg.block_size and r.greedy
    assert DecodePolicy("dlm", block_length=8, steps=4).resolve(tiny_cfg).passes == 4
    assert DecodePolicy("dlm", block_length=8).resolve(tiny_cfg).block_length == 8
    assert DecodePolicy("ar").resolve(tiny_cfg).block_length is None
    assert r == DecodePolicy("dlm", block_length=tiny_cfg.block_size) and len({r, r.resolve(tiny_cfg)}) == 1


@pytest.mark.parametrize("kw,match", [
    (dict(mode="beam"), "mode must be one of"),
    (dict(steps=3, threshold=0.5), "excludes threshold"),
    (dict(mode="linear-spec", steps=3), "is a dlm policy"),
    (dict(threshold=1.5), r"threshold 1.5: expected a number in \[0, 1\]"),
    (dict(mode="linear-spec", threshold=-0.1), "threshold -0.1: expected a number in"),
    (dict(block_length=1), "block_length 1: expected an integer >= 2"),
    (dict(block_length=8, steps=9), r"between 1 and block_length \(8\)"),
    (dict(steps=0), "steps 0: expected an integer >= 1"),
    (dict(temperature=-1.0), "temperature -1.0: expected a number >= 0"),
    (dict(check_every=0), "check_every must be at least 1"),
])
def test_refusals(kw, match):
    with pytest.raises(InvalidArgument, match=match):
        DecodePolicy(**kw)


def test_steps_checked_against_the_models_block(tiny_cfg):
    with pytest.raises(InvalidArgument, match=rf"block_length \({tiny_cfg.block_size}\)"):
        DecodePolicy("dlm", steps=tiny_cfg.block_size + 1).resolve(tiny_cfg)


def test_a_policy_or_keywords(random_tiny):
    p = DecodePolicy("dlm", steps=2)
    assert DecodePolicy.of(p, {}) is p
    assert DecodePolicy.of("linear-spec", {"threshold": 0.5}) == DecodePolicy("linear-spec", threshold=0.5)
    with pytest.raises(InvalidArgument, match="not both"):
        DecodePolicy.of(p, {"seed": 1})
    from nemodiff_compile.backends.eager import TorchDenoiser

    with pytest.raises(InvalidArgument, match="the ar loop got a dlm policy"):
        loops.ar_generate(TorchDenoiser(random_tiny, 32), [[1, 2]], p, max_new_tokens=2)


def test_drive_reads_the_done_flag_every_check_every_passes():
    ran, reads = [], []
    left = [5]

    def one_pass():
        ran.append(1)
        left[0] -= 1

    def done():
        reads.append(len(ran))
        return left[0] <= 0

    assert drive(one_pass, done, 16, 3) == 6 and reads == [3, 6]          # 5 needed, 1 wasted
    assert drive(lambda: None, lambda: False, 7, 3) == 7                    # never past the budget
    reads.clear()
    assert drive(lambda: None, lambda: reads.append(1) or True, 3, 3) == 3 and reads == []   # no read at the end


def test_boundaries_and_messages():
    """Each bound at its edge (accepted) and one past it (refused with the exact sentence)."""
    from nemodiff_compile.decoding.policy import DecodePolicy
    from nemodiff_compile.errors import InvalidArgument

    for ok in (dict(threshold=1.0), dict(threshold=0.0), dict(block_length=2), dict(block_length=2, threshold=None, steps=1),
               dict(block_length=4, threshold=None, steps=4), dict(check_every=1), dict(mode="ar", block_length=1),
               dict(threshold=None, steps=2)):
        DecodePolicy(**ok)
    bad = [(dict(mode="beam"), "mode must be one of ar, dlm, linear-spec, got 'beam'"),
           (dict(mode="ar", steps=2), "steps (the fixed-steps schedule) is a dlm policy and excludes threshold"),
           (dict(threshold=1.01), "threshold 1.01: expected a number in [0, 1]"),      # policy.check_bounds
           (dict(block_length=1), "block_length 1: expected an integer >= 2"),
           (dict(block_length=4, threshold=None, steps=5), "steps 5: expected an integer between 1 and block_length (4)"),
           (dict(threshold=None, steps=0), "steps 0: expected an integer >= 1"),
           (dict(temperature=-0.5), "temperature -0.5: expected a number >= 0"),
           (dict(check_every=0), "check_every must be at least 1, got 0")]
    for kw, msg in bad:
        with pytest.raises(InvalidArgument) as e:
            DecodePolicy(**kw)
        assert str(e.value) == msg, kw
