import pytest
import torch

from nemodiff_compile.decoding import remask


def test_threshold_commits_top1_plus_confident_masked():
    conf = torch.tensor([[0.2, 0.95, 0.5, 0.91, 0.99]])
    masked = torch.tensor([[True, True, True, True, False]])
    got = remask.commit_threshold(conf, masked, 0.9)
    assert got.tolist() == [[False, True, False, True, False]]      # 0.99 is not masked


def test_threshold_one_commits_exactly_one_and_zero_commits_all():
    conf = torch.rand(3, 16) * 0.999
    masked = torch.rand(3, 16) > 0.3
    masked[:, 0] = True
    assert remask.commit_threshold(conf, masked, 1.0).sum(1).tolist() == [1, 1, 1]
    assert torch.equal(remask.commit_threshold(conf, masked, 0.0), masked)


def test_ties_break_to_lower_position():
    conf = torch.tensor([[0.5, 0.7, 0.7, 0.7]])
    masked = torch.tensor([[True, False, True, True]])
    assert remask.top1(conf, masked).tolist() == [[False, False, True, False]]
    got = remask.commit_topk(conf, masked, torch.tensor([2]))
    assert got.tolist() == [[False, False, True, True]]


def test_nothing_masked_commits_nothing():
    conf = torch.rand(2, 8)
    none = torch.zeros(2, 8, dtype=torch.bool)
    assert not remask.commit_threshold(conf, none, 0.5).any()
    assert not remask.commit_topk(conf, none, torch.tensor([3, 3])).any()


def test_topk_never_exceeds_masked():
    conf = torch.rand(4, 10)
    masked = torch.rand(4, 10) > 0.5
    got = remask.commit_topk(conf, masked, torch.tensor([0, 1, 5, 10]))
    assert torch.equal(got.sum(1), torch.minimum(torch.tensor([0, 1, 5, 10]), masked.sum(1)))
    assert not (got & ~masked).any()


def test_even_split_remainder_first():
    q = remask.even_split(torch.tensor([15, 7, 0]), 4)
    assert q.tolist() == [[4, 4, 4, 3], [2, 2, 2, 1], [0, 0, 0, 0]]
    q = remask.even_split(torch.tensor([31]), 32)                   # upstream default: 1 per pass
    assert q.sum().item() == 31 and q[0, :31].eq(1).all() and q[0, 31] == 0


def test_pick_confidence_uses_raw_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    tok, conf = remask.pick(logits)
    assert tok.item() == 0
    torch.testing.assert_close(conf, torch.softmax(logits, -1)[:, :1].squeeze(-1))
    g = torch.Generator().manual_seed(0)
    noise = remask.gumbel_noise((4000, 3), g)
    tok, conf = remask.pick(logits.expand(4000, 3), temperature=1.0, noise=noise)
    freq = torch.bincount(tok, minlength=3).float() / 4000        # Gumbel-max samples softmax(logits)
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.03, rtol=0)
    assert torch.allclose(conf, torch.softmax(logits, -1)[0][tok])


def test_confidence_equal_to_the_threshold_commits():
    """conf == threshold commits (>=, not >): 1.0 is reached in bf16, 0.5 and 0.25 are exact."""
    masked = torch.tensor([[True, True, True, False, True]])
    for t in (1.0, 0.5, 0.25):
        conf = torch.tensor([[t, t, t, t, t / 2]])
        assert remask.commit_threshold(conf, masked, t).tolist() == [[True, True, True, False, False]]
    one = torch.softmax(torch.tensor([[[0.0, 200.0, 0.0]] * 4]).bfloat16(), -1)     # one-hot in bf16
    tok, conf = remask.pick(torch.log(one.float() + 1e-30))
    assert conf.eq(1.0).all()
    assert remask.commit_threshold(conf, torch.ones(1, 4, dtype=torch.bool), 1.0).all()


def test_topk_ties_over_a_long_row_go_to_the_lower_positions():
    """Many equal confidences (an unstable sort would scatter the picks): the k lowest positions."""
    conf = torch.full((2, 4096), 0.5)
    masked = torch.ones(2, 4096, dtype=torch.bool)
    masked[1, :3] = False
    got = remask.commit_topk(conf, masked, torch.tensor([5, 2]))
    assert got[0].nonzero()[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert got[1].nonzero()[:, 0].tolist() == [3, 4]


def test_gumbel_noise_is_seeded_float64_gumbel():
    a = remask.gumbel_noise((20000,), torch.Generator().manual_seed(3))
    b = remask.gumbel_noise((20000,), torch.Generator().manual_seed(3))
    assert a.dtype == torch.float64 and torch.equal(a, b)
    assert abs(float(a.mean()) - 0.5772) < 0.03 and abs(float(a.var()) - 1.6449) < 0.1   # Euler gamma, pi^2/6
    with pytest.raises(ValueError, match="^temperature > 0 needs Gumbel noise$"):
        remask.pick(torch.zeros(1, 3), temperature=1.0)


def test_eos_mask_and_eos_complete():
    M, E = 9, 2
    blk = torch.tensor([[5, E, M, 7],        # EOS with no mask before it: complete
                        [M, E, 5, 5],        # a mask before the first EOS: not yet
                        [5, 6, M, M],        # no EOS: not complete
                        [5, 6, 7, 3]])       # second EOS id
    masked = blk == M
    assert remask.eos_mask(blk, (E, 3)).tolist() == [[False, True, False, False], [False, True, False, False],
                                                     [False, False, False, False], [False, False, False, True]]
    assert torch.equal(remask.eos_mask(blk, torch.tensor([E, 3])), remask.eos_mask(blk, (E, 3)))
    assert remask.eos_complete(blk, masked, (E, 3)).tolist() == [True, False, False, True]
    assert remask.eos_complete(blk, masked, (E,)).tolist() == [True, False, False, False]
