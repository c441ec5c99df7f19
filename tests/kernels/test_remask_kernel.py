"""The Triton remask kernel against the torch reference, on the CPU through Triton's interpreter."""

import pytest
import torch

pytest.importorskip("triton")

from nemodiff_compile.kernels.remask.reference import remask_reference  # noqa: E402
from nemodiff_compile.kernels.remask.triton_kernel import remask_triton  # noqa: E402
from nemodiff_compile.decoding import remask  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
MASK = 7


def _case(B, L, V, dtype, seed, masked_frac=0.6, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, L, V, generator=g) * scale).to(dtype)
    canvas = torch.randint(0, V, (B, L), generator=g)
    canvas[torch.rand(B, L, generator=g) < masked_frac] = MASK
    active = torch.rand(B, generator=g) < 0.8
    active[0] = True
    return logits.to(DEV), canvas.to(DEV), active.to(DEV)


def _check(logits, canvas, active, quota=None, **kw):
    ref = remask_reference(logits, canvas, active, quota, mask_id=MASK, **kw)
    got = remask_triton(logits, canvas, active, quota, mask_id=MASK, **kw)
    names = ("canvas", "token", "conf", "commit")
    for name, r, t in zip(names, ref, got):
        if name == "conf":
            torch.testing.assert_close(t, r, rtol=0, atol=1e-6 if logits.dtype == torch.float32 else 1e-2)
        else:
            assert torch.equal(t.cpu(), r.cpu()), name
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [1000, 5003])                 # one chunk; two chunks, V not a multiple
def test_threshold_matches_reference(dtype, V):
    logits, canvas, active = _case(3, 16, V, dtype, seed=V)
    for threshold in (0.0, 0.3, 0.9, 1.0):
        _check(logits, canvas, active, threshold=threshold)


def test_topk_matches_reference():
    logits, canvas, active = _case(4, 12, 777, torch.float32, seed=1, scale=1.0)
    masked = ((canvas == MASK) & active[:, None]).sum(1)
    for quota in (torch.zeros_like(masked), torch.ones_like(masked), masked // 2 + 1, masked + 3):
        _check(logits, canvas, active, quota, threshold=None)


def test_ties_go_to_the_lower_index_and_position():
    V, L = 5000, 8
    logits = torch.zeros(2, L, V)
    logits[:, :, 10] = 5.0
    logits[:, :, 4100] = 5.0                                  # same max in the second chunk
    canvas = torch.full((2, L), MASK)
    active = torch.ones(2, dtype=torch.bool)
    canvas_out, token, conf, commit = _check(logits.to(DEV), canvas.to(DEV), active.to(DEV), threshold=0.99)
    assert (token == 10).all()
    assert commit.sum(1).tolist() == [1, 1] and bool(commit[:, 0].all())   # equal conf: position 0
    quota = torch.tensor([3, 0])
    _, _, _, commit = _check(logits.to(DEV), canvas.to(DEV), active.to(DEV), quota.to(DEV), threshold=None)
    assert commit[0].tolist() == [True] * 3 + [False] * 5 and not commit[1].any()


def test_nothing_masked_and_inactive_rows_commit_nothing():
    logits, canvas, active = _case(3, 16, 300, torch.float32, seed=3)
    canvas[0] = 1                                             # row 0: every position already committed
    active[1] = False
    _, _, _, commit = _check(logits, canvas, active, threshold=0.0)
    assert not commit[0].any() and not commit[1].any()


def test_temperature_uses_the_noise():
    logits, canvas, active = _case(2, 8, 600, torch.float32, seed=4, scale=0.5)
    noise = remask.gumbel_noise(logits.shape, torch.Generator().manual_seed(0)).to(DEV)
    _, token, _, _ = _check(logits, canvas, active, threshold=0.5, temperature=1.0, noise=noise.float())
    assert not torch.equal(token, logits.argmax(-1))           # the noise moved some picks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_confidence_equal_to_the_threshold_commits(dtype):
    """Peaked logits give conf exactly 1.0, a two-way tie exactly 0.5: both commit at that threshold."""
    V, L = 300, 6
    logits = torch.zeros(1, L, V)
    logits[0, :, 3] = 100.0                                  # conf 1.0 everywhere
    canvas = torch.full((1, L), MASK)
    active = torch.ones(1, dtype=torch.bool)
    _, _, conf, commit = _check(logits.to(dtype).to(DEV), canvas.to(DEV), active.to(DEV), threshold=1.0)
    assert conf.eq(1.0).all() and commit.all()
    logits[0, :, 200] = 100.0                                # tie: conf 0.5 everywhere, token 3
    _, token, conf, commit = _check(logits.to(dtype).to(DEV), canvas.to(DEV), active.to(DEV), threshold=0.5)
    assert conf.eq(0.5).all() and commit.all() and token.eq(3).all()
