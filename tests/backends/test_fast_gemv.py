"""The fast engine with its projections through the split-K small-M kernel (`gemv=True`), on Triton's CPU
interpreter: the dispatch is forced on (it runs the kernel only on CUDA otherwise), and the trained tiny
model's passes must equal the engine's without it, in the model dtype and in FP8 (the GPU run of
scripts/gpu_check.py compares whole generations and times it)."""

import pytest
import torch

pytest.importorskip("triton")

from nemodiff_compile import load_reference  # noqa: E402
from nemodiff_compile.backends.fast import FastDenoiser  # noqa: E402
from nemodiff_compile.backends import fast_model  # noqa: E402
from nemodiff_compile.kernels import gemv  # noqa: E402

PROMPTS = [[1, 40, 41, 42, 43], [1, 50, 51]]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def kernel_calls(monkeypatch):
    """Force the Triton path for <= 64-row products (CPU: the interpreter) and count its launches."""
    from nemodiff_compile.kernels import gemv_triton
    calls = []
    real = gemv_triton.gemv_triton

    def counted(*a, **kw):
        calls.append(a[0].shape)
        return real(*a, **kw)

    monkeypatch.setattr(gemv, "usable", lambda x: x.numel() // x.shape[-1] <= gemv.MAX_M)
    monkeypatch.setattr(gemv_triton, "gemv_triton", counted)
    return calls


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's check; on CUDA tests/gpu/test_fast_gpu.py "
                    "runs the kernel inside the engine (bf16, FP8)")
@pytest.mark.parametrize("fp8", [None, "row"])
def test_passes_with_the_gemv_kernel_equal_passes_without(kernel_calls, fp8):
    """After a ragged prefill (without the kernel: the interpreter is slow), a refinement pass through it:
    logits within the kernel's tolerance, the same tokens."""
    model = load_reference("tiny", device=DEV)
    dens = [FastDenoiser(model, 64, fp8=fp8, graphs=False, return_logits=True, gemv=g) for g in (False, True)]
    assert all(lin.gemv for lin in dens[1].fast.linears()) and not any(lin.gemv for lin in dens[0].fast.linears())
    n = torch.tensor([len(p) for p in PROMPTS])
    ids = torch.zeros(2, int(n.max()), dtype=torch.long)
    for b, p in enumerate(PROMPTS):
        ids[b, : len(p)] = torch.tensor(p)
    blk = torch.full((2, 8), model.config.mask_token_id)
    blk[:, 0] = 7
    for d in dens:
        d.reset(2)
        flags = [lin.gemv for lin in d.fast.linears()]
        for lin in d.fast.linears():
            lin.gemv = False
        d.step(ids, causal=True, write=True, num_valid=n)
        for lin, flag in zip(d.fast.linears(), flags):
            lin.gemv = flag
    assert not kernel_calls
    off, on = (d.step(blk, causal=False, write=False) for d in dens)
    # fp32 model; FP8: the CPU path scales before its product, the kernel after (rounding order)
    tol = 1e-4 if fp8 is None else 1e-3
    torch.testing.assert_close(on.logits, off.logits, rtol=tol, atol=tol)
    assert torch.equal(on.token, off.token)
    assert len(kernel_calls) == 4 * model.config.num_hidden_layers     # every projection of the pass


def test_linear_routes_fp8_scales_through_the_kernel(kernel_calls):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 96, generator=g).bfloat16().to(DEV)
    x = torch.randn(2, 5, 96, generator=g).bfloat16().to(DEV)
    for mode in ("row", "tensor"):
        plain, fused = fast_model.Linear(w, mode), fast_model.Linear(w, mode, gemv=True)
        torch.testing.assert_close(fused(x).float(), plain(x).float(), rtol=2 ** -7, atol=1e-6)
    assert len(kernel_calls) == 2
    big = torch.randn(gemv.MAX_M + 1, 96, generator=g).bfloat16().to(DEV)       # more rows: the usual path
    fast_model.Linear(w, None, gemv=True)(big)
    assert len(kernel_calls) == 2
