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
