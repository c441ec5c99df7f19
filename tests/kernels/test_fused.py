"""The fast engine's fused kernels: Triton (CUDA, or the CPU interpreter) against the torch definitions."""

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from nemodiff_compile.kernels.rounding import round_as  # noqa: E402
from nemodiff_compile.kernels import fused_triton as tk  # noqa: E402
from nemodiff_compile.kernels import fused as kernels  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# The kernels round bf16 with explicit round-to-nearest-even bit arithmetic (kernels/rounding.py), so
# where no transcendental or reduction is involved they equal torch bit for bit, interpreter included;
# exp / rsqrt / sum order may still move an fp32 value across a bf16 rounding boundary: one ulp.
BF16 = dict(rtol=8e-3, atol=0)


def _assert_fp8_values_equal(q, q_ref):
    """The fp8 codes equal torch's. On CUDA bit for bit; Triton's CPU interpreter casts to e4m3 dropping
    the carry of a mantissa round-up into the exponent (x/s = -125.8 gives -64, not -128), so there the
    only differences allowed are those: a reference of +-2^k and exactly half of it, on few elements."""
    got, want = q.float(), q_ref.float()
    assert q.dtype == q_ref.dtype == torch.float8_e4m3fn and got.shape == want.shape
    if DEV == "cuda":
        assert torch.equal(got, want)
        return
    off = got != want
    assert bool((got[off] * 2 == want[off]).all()), "fp8 values differ beyond the interpreter's carry loss"
    assert bool((torch.log2(want[off].abs()) % 1 == 0).all())
    assert int(off.sum()) <= 0.05 * got.numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_res", [False, True])
def test_add_rmsnorm(dtype, with_res):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 192, generator=g).to(DEV, dtype)
    res = torch.randn(2, 5, 192, generator=g).to(DEV, dtype) if with_res else None
    w = (1 + 0.1 * torch.randn(192, generator=g)).to(DEV, dtype)
    y_ref, h_ref = kernels.add_rmsnorm_torch(x, res, w, 1e-5)
    y, h = tk.add_rmsnorm_triton(x, res, w, 1e-5)
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else BF16
    torch.testing.assert_close(h, h_ref, **tol)
    torch.testing.assert_close(y, y_ref, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul(dtype):
    gu = torch.randn(3, 4, 2 * 1500, generator=torch.Generator().manual_seed(1)).to(DEV, dtype)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else BF16
    torch.testing.assert_close(tk.silu_mul_triton(gu), kernels.silu_mul_torch(gu), **tol)


def test_quant_fp8_matches_definition():
    x = torch.randn(6, 320, generator=torch.Generator().manual_seed(2)).to(DEV) * 3
    x[0] = 0                                                      # an all-zero row keeps a finite scale
    q_ref, s_ref = kernels.quant_fp8_torch(x)
    q, s = tk.quant_fp8_triton(x)
    torch.testing.assert_close(s, s_ref)
    _assert_fp8_values_equal(q, q_ref)
    assert (q_ref.float() * s_ref - x).abs().max() <= x.abs().max() / 16    # e4m3: 3 mantissa bits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_qkv(dtype):
    from nemodiff_compile.config import PRESETS
    from nemodiff_compile.model import rope

    cfg = PRESETS["tiny"]
    B, L, S, Hq, Hkv, D = 2, 5, 24, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, L, (Hq + 2 * Hkv) * D, generator=g).to(DEV, dtype)
    positions = (torch.tensor([[3], [17]]) + torch.arange(L)).to(DEV)           # ragged rows
    cos, sin = rope.cos_sin(positions, rope.inv_freq(cfg).to(DEV), rope.attention_factor(cfg), dtype)
    qscale = 1 + 0.3 * torch.rand(B, L, generator=g).to(DEV)
    caches = [[torch.full((B, Hkv, S, D), float("nan"), dtype=dtype, device=DEV) for _ in range(2)]
              for _ in range(2)]
    q_ref = kernels.rope_qkv_torch(qkv, cos, sin, qscale, positions, *caches[0], Hq, Hkv)
    q = tk.rope_qkv_triton(qkv, cos, sin, qscale, positions, *caches[1], Hq, Hkv)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=0, atol=0)   # bit-exact
    torch.testing.assert_close(q, q_ref, **tol)
    for ref, got in zip(caches[0], caches[1]):
        assert torch.equal(ref.isnan(), got.isnan())                              # the same slots written
        torch.testing.assert_close(got.nan_to_num(), ref.nan_to_num(), **tol)


@triton.jit
def _round_bf16(x_ptr, o_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(o_ptr + offs, round_as(tl.load(x_ptr + offs), tl.bfloat16))


def test_round_as_matches_torch_bf16():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(6)) * 100
    x[:4] = torch.tensor([1.00390625, 1.01171875, -2.00390625, 0.0])    # exact ties: to even
    x = x.to(DEV)
    out = torch.empty_like(x)
    _round_bf16[(1,)](x, out, 4096)
    assert torch.equal(out, x.bfloat16().float())


def test_quant_fp8_tensor_matches_definition():
    x = torch.randn(5, 200, generator=torch.Generator().manual_seed(4)).to(DEV) * 2
    q_ref, s_ref = kernels.quant_fp8_tensor_torch(x)
    q, s = tk.quant_fp8_tensor_triton(x)
    torch.testing.assert_close(s, s_ref)
    assert s_ref.shape == () and float(s_ref) == pytest.approx(float(x.abs().max()) / 448)
    _assert_fp8_values_equal(q, q_ref)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L,S", [(5, 40), (24, 300)])          # one split / three splits, R < / > 64
def test_block_attention(causal, L, S):
    B, Hq, Hkv, D = 3, 8, 2, 32
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, Hq, L, D, generator=g).to(DEV)
    ck = torch.randn(B, Hkv, S, D, generator=g).to(DEV)
    cv = torch.randn(B, Hkv, S, D, generator=g).to(DEV)
    lengths = torch.tensor([0, 7, S - L - 3]).to(DEV)               # empty cache, short, nearly full
    num_valid = torch.tensor([L, L - 2, L]).to(DEV)                 # a right-padded row
    ref = kernels.block_attention_torch(q, ck, cv, lengths, num_valid, causal)
    got = tk.block_attention_triton(q, ck, cv, lengths, num_valid, causal)
    assert got.shape == (B, L, Hq * D)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_producers_emit_static_fp8():
    """add_rmsnorm / silu_mul / block_attention with out_scale: FP8 of their bf16 result."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 64, generator=g).to(DEV, torch.bfloat16)
    w = torch.ones(64, dtype=torch.bfloat16, device=DEV)
    scale = torch.tensor(4.0 / 448, device=DEV)
    q = torch.randn(2, 8, 4, 32, generator=g).to(DEV)
    ck, cv = (torch.randn(2, 2, 40, 32, generator=g).to(DEV) for _ in range(2))
    lengths, nv = torch.tensor([3, 9]).to(DEV), torch.tensor([4, 4]).to(DEV)
    cases = [
        (lambda s: tk.add_rmsnorm_triton(x, x, w, 1e-5, s)[0], lambda: kernels.add_rmsnorm_torch(x, x, w, 1e-5)[0]),
        (lambda s: tk.silu_mul_triton(x, s), lambda: kernels.silu_mul_torch(x)),
        (lambda s: tk.block_attention_triton(q, ck, cv, lengths, nv, True, s),
         lambda: kernels.block_attention_torch(q, ck, cv, lengths, nv, True)),
    ]
    for fused, plain in cases:
        got = fused(scale)
        ref = kernels.quant_static_torch(plain(), scale)
        assert got.dtype == torch.float8_e4m3fn and got.shape == ref.shape
        deq, ref_deq = got.float() * scale, ref.float() * scale
        # one bf16 ulp upstream can move a value by one e4m3 step, no more (the interpreter: its
        # carry loss, a value halved, is the one other difference allowed)
        near = (deq - ref_deq).abs() <= ref_deq.abs() / 8 + scale
        if DEV != "cuda":
            near |= deq * 2 == ref_deq
        assert bool(near.all()) and int((deq != ref_deq).sum()) <= 0.05 * deq.numel()
        cos = torch.nn.functional.cosine_similarity(deq.flatten(), ref_deq.flatten(), dim=0)
        assert cos > 0.99
