"""The ONNX Runtime engine binds a window of the KV cache (the rows' longest length plus the block, rounded up;
for a pass over some rows, their longest), not max_len, and can run a pass over some rows of its batch: the
same tokens as the whole cache and the whole batch. The window changes the float summation order of the
attention (the block's keys follow the window), so confidences agree to rounding (~1e-6 here), not bit for
bit; a pass over some rows over the same window is bit for bit."""

import pytest
import torch

from nemodiff_compile.decoding import loops

pytest.importorskip("onnxruntime")

PROMPTS = [[1] + list(range(40, 110)), [1, 50, 51, 52]]          # 71 and 4 tokens


@pytest.fixture(scope="module")
def engines(tiny_engine):
    from nemodiff_compile.backends.open import open_engine

    windowed, whole = open_engine(tiny_engine, threads=1), open_engine(tiny_engine, threads=1)
    whole.denoiser.window = 0                                     # always the whole max_len
    return windowed.denoiser, whole.denoiser


@pytest.mark.parametrize("mode", ["dlm", "linear-spec"])
def test_window_grows_with_the_rows_and_changes_nothing(engines, mode):
    windowed, whole = engines
    a = loops.generate(windowed, PROMPTS, mode, max_new_tokens=40, trace=True)
    b = loops.generate(whole, PROMPTS, mode, max_new_tokens=40, trace=True)
    assert a.tokens == b.tokens
    assert all(torch.allclose(x.conf, y.conf, rtol=0, atol=1e-5) for x, y in zip(a.trace, b.trace))
    assert windowed.k.shape[3] == 128 and whole.k.shape[3] == whole.max_len == 1024   # 71 + 48 positions
    for prompt, window in (([1] + list(range(40, 240)), 256), (PROMPTS[1], 64)):       # grows, then shrinks
        a = loops.generate(windowed, [prompt], mode, max_new_tokens=8)
        assert windowed.k.shape[3] == window
        assert a.tokens == loops.generate(whole, [prompt], mode, max_new_tokens=8).tokens


def test_a_pass_over_some_rows(engines):
    den, _ = engines
    ids = torch.tensor([[1, 40, 41, 42], [1, 60, 61, 62], [1, 70, 71, 72]])
    den.reset(3)
    full = den.step(ids, causal=True, write=True)
    k_full = den.k.clone()
    den.reset(3)
    sub = den.step(ids[[0, 2]], causal=True, write=True, rows=[0, 2])          # row 1 is not computed
    assert torch.equal(sub.token, full.token[[0, 2]]) and torch.equal(sub.conf, full.conf[[0, 2]])
    assert den.lengths().tolist() == [4, 0, 4]
    assert torch.equal(den.k[:, [0, 2], :, :4], k_full[:, [0, 2], :, :4])


def test_a_pass_over_short_rows_reads_their_own_window(engines):
    """Rows shorter than the batch's longest run over their own window (the pass costs in proportion to it):
    the same tokens as over the batch's window, confidences to rounding."""
    den, _ = engines
    den.reset(3)
    den.step(torch.tensor([[1] + list(range(40, 139))] * 3), causal=True, write=True,
             num_valid=torch.tensor([5, 100, 7]))                                  # lengths 5, 100, 7
    assert den.k.shape[3] == 128                                                   # the 100-token pass
    block = torch.full((2, 16), den.config.mask_token_id)
    block[:, 0] = torch.tensor([44, 46])
    whole = den.step(torch.cat([block[:1], block[:1], block[1:]]), causal=False, write=False)
    sub = den.step(block, causal=False, write=False, rows=[0, 2])
    assert (2, 64) in den._gathered                                                # 7 + 16 positions, rounded up
    assert torch.equal(sub.token, whole.token[[0, 2]])
    assert torch.allclose(sub.conf, whole.conf[[0, 2]], rtol=0, atol=1e-5)
