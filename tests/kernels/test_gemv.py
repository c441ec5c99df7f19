"""The split-K GEMV-style kernel (kernels/gemv.py) against its torch definition, on Triton's CPU
interpreter (or CUDA): odd shapes, several split counts, bf16 and FP8 with per-channel scales.

Tolerance: the kernel sums the same fp32 products as gemv_torch in another order and rounds once to bf16,
so outputs may differ by one bf16 ulp (rtol 2**-7) and never more; against torch's bf16 F.linear the same."""

import pytest
import torch

pytest.importorskip("triton")

from nemodiff_compile.kernels import gemv as g  # noqa: E402
from nemodiff_compile.kernels import gemv_triton as gt  # noqa: E402
from nemodiff_compile.kernels import fused  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ULP = dict(rtol=2 ** -7, atol=1e-6)


def _data(M, N, K, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen).to(DEV, torch.bfloat16)
    w = (torch.randn(N, K, generator=gen) / K ** 0.5).to(DEV, torch.bfloat16)
    return x, w


@pytest.mark.parametrize("M,N,K,split", [(1, 70, 200, None), (5, 130, 328, 3), (17, 96, 256, 1), (33, 50, 500, 4),
                                         (64, 64, 129, 2)])
def test_bf16_matches_the_definition(M, N, K, split):
    x, w = _data(M, N, K, M + N + K)
    y = gt.gemv_triton(x, w, split=split)
    ref = g.gemv_torch(x, w)
    assert y.shape == (M, N) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), **ULP)
    torch.testing.assert_close(y.float(), torch.nn.functional.linear(x, w).float(), rtol=2 ** -6, atol=1e-5)


def test_leading_dims_and_a_wrong_answer_is_caught():
    x, w = _data(2 * 7, 40, 96, 1)
    y = gt.gemv_triton(x.view(2, 7, 96), w, split=2)
    assert y.shape == (2, 7, 40)
    torch.testing.assert_close(y.view(14, 40).float(), g.gemv_torch(x, w).float(), **ULP)
    # the tolerance is tight enough to see a dropped K slab: zero the last 32 columns
    x2 = x.clone()
    x2[:, -32:] = 0
    assert not torch.allclose(gt.gemv_triton(x2, w, split=3).float(), g.gemv_torch(x, w).float(), **ULP)


def test_fp8_row_scales_in_the_epilogue():
    M, N, K = 9, 72, 160
    x, w = _data(M, N, K, 5)
    wf = w.float()
    sw = (wf.abs().amax(1, keepdim=True) / fused.FP8_MAX)                  # [N, 1], as fast_model.Linear "row"
    wq = (wf / sw).clamp(-fused.FP8_MAX, fused.FP8_MAX).to(torch.float8_e4m3fn)
    xq, sx = fused.quant_fp8_torch(x)                                       # [M, K] fp8, [M, 1]
    y = gt.gemv_triton(xq, wq, sx, sw.t().contiguous(), out_dtype=torch.bfloat16, split=2)
    ref = g.gemv_torch(xq, wq, sx, sw.t(), out_dtype=torch.bfloat16)
    torch.testing.assert_close(y.float(), ref.float(), **ULP)
    # and it is the projection: close to the bf16 product within FP8's error
    torch.testing.assert_close(y.float(), (x.float() @ wf.t()), rtol=0.1, atol=0.1)


def test_plan_fills_the_machine_and_bad_input():
    bm, bn, bk, split = gt.plan(32, 6144, 4096)
    assert (bm, bn, bk) == (32, 64, 128) and 96 * split >= 2 * 132 and split == 4
    assert gt.plan(1, 28672, 4096)[3] == 1                                # wide outputs need no split
    assert gt.plan(64, 4096, 14336)[3] == 8
    x, w = _data(3, 8, 32, 0)
    with pytest.raises(ValueError, match="w must be"):
        gt.gemv_triton(x, w.t())
    with pytest.raises(ValueError, match="both x_scale"):
        gt.gemv_triton(x, w, x_scale=torch.ones(3, 1))


def test_dispatch_uses_torch_off_cuda_and_beyond_max_m():
    x, w = _data(3, 8, 32, 0)
    assert g.usable(x) == (DEV == "cuda")
    big = torch.zeros(g.MAX_M + 1, 32, device=DEV, dtype=torch.bfloat16)
    assert not g.usable(big)
    torch.testing.assert_close(g.gemv(x, w).float(), g.gemv_torch(x, w).float(), **ULP)
