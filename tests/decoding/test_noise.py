"""Counter-based Gumbel noise (decoding/noise.py): a pure function of (key, counter, element), Gumbel
distributed, and what the loops and a device loop draw."""

import math

import torch

from nemodiff_compile.decoding import remask
from nemodiff_compile.decoding.noise import GumbelStream, gumbel, hash32, row_keys


def test_hash32_stays_in_32_bits_and_is_a_bijection_on_a_sample():
    x = torch.arange(0, 1 << 20, dtype=torch.long) * 4093 % (1 << 32)
    h = hash32(x)
    assert int(h.min()) >= 0 and int(h.max()) < (1 << 32)
    assert len(torch.unique(h)) == len(torch.unique(x))          # no collisions: an invertible mixer
    top = hash32(torch.tensor([(1 << 32) - 1]))                    # the largest lane value: no overflow
    assert 0 <= int(top) < (1 << 32)


def test_row_keys_hash_python_ints_as_the_tensors_do():
    """row_keys hashes Python ints; the keys are those of the same hashes on int64 tensors (the stream every
    backend and device loop shares), for seeds across the 64-bit range."""
    for seed in (0, 1, 7, -1, 12345678901234, (1 << 63) + 5, (1 << 64) - 1):
        s = seed % (1 << 64)
        lo = hash32(torch.tensor(s & 0xFFFFFFFF))
        hi = hash32(torch.tensor(s >> 32) ^ 0x9E3779B9)
        want = hash32(hash32(lo ^ hi) ^ torch.arange(5))
        got = row_keys(seed, 5)
        assert got.dtype == torch.long and torch.equal(got, want), seed
    assert row_keys(3, 0).shape == (0,)


def test_draws_are_a_function_of_key_counter_and_element():
    s = GumbelStream(7, 3)
    a, b = s.draw((3, 4, 50)), s.draw((3, 4, 50))
    assert a.dtype == torch.float64 and a.shape == (3, 4, 50)
    assert not torch.equal(a, b) and not torch.equal(a[0], a[1])  # passes and rows differ
    assert torch.equal(s.counters, torch.tensor([2, 2, 2]))
    # pass 1 recomputed from the keys and counters alone (what a device loop does), any L
    again = gumbel(s.keys, torch.tensor([1, 1, 1]), 4, 50)
    assert torch.equal(again, b)
    # a row's draw does not depend on its batch mates: row 0 of a one-row stream with the same seed
    solo = GumbelStream(7, 1)
    assert torch.equal(solo.draw((1, 4, 50))[0], a[0])
    assert not torch.equal(GumbelStream(8, 3).draw((3, 4, 50)), a)
    assert torch.equal(row_keys(-1, 2), row_keys((1 << 64) - 1, 2))   # any Python int seeds


def test_gumbel_distribution():
    g = gumbel(row_keys(0, 1), torch.zeros(1, dtype=torch.long), 64, 4096).flatten()   # 262144 draws
    assert bool(torch.isfinite(g).all())
    euler = 0.5772156649
    assert abs(float(g.mean()) - euler) < 0.01
    assert abs(float(g.var()) - math.pi ** 2 / 6) < 0.03
    # Gumbel-max samples softmax: frequencies of a 3-way choice
    logits = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    noise = gumbel(row_keys(1, 1), torch.zeros(1, dtype=torch.long), 20000, 3)[0]
    picks = torch.bincount(remask.pick(logits.expand(20000, 3), 1.0, noise)[0], minlength=3).double() / 20000
    torch.testing.assert_close(picks, torch.softmax(logits, 0), atol=0.015, rtol=0)


def test_remask_gumbel_noise_takes_a_stream_or_a_torch_generator():
    s = GumbelStream(3, 2)
    assert torch.equal(remask.gumbel_noise((2, 3, 5), s), GumbelStream(3, 2).draw((2, 3, 5)))
    t = remask.gumbel_noise((2, 3, 5), torch.Generator().manual_seed(0))
    assert t.dtype == torch.float64 and t.shape == (2, 3, 5)
    c = s.clone()
    s.advance(torch.tensor([1, 2]))
    assert torch.equal(c.counters, torch.tensor([1, 1])) and torch.equal(s.counters, torch.tensor([2, 3]))
