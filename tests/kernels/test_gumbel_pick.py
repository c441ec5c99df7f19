"""The fused Gumbel-max pick (kernels/gumbel.py) against its definition (noise.gumbel + remask.pick), on
Triton's CPU interpreter or CUDA: the same tokens, the confidence as the remask kernel computes it."""

import pytest
import torch

pytest.importorskip("triton")

from nemodiff_compile.decoding.noise import row_keys  # noqa: E402
from nemodiff_compile.kernels import gumbel  # noqa: E402
from nemodiff_compile.kernels.gumbel_triton import gumbel_pick_triton  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype,V,T", [(torch.float32, 1000, 1.0), (torch.bfloat16, 3001, 0.7), (torch.float32, 5, 4.0)])
def test_fused_pick_equals_the_definition(dtype, V, T):
    g = torch.Generator().manual_seed(V)
    B, L = 3, 5
    logits = (torch.randn(B, L, V, generator=g) * 2).to(DEV, dtype)
    keys = row_keys(9, B).to(DEV)
    counters = torch.tensor([0, 3, 1 << 33], device=DEV)          # counters beyond 32 bits wrap as in noise.py
    tok, conf = gumbel_pick_triton(logits, keys, counters, T)
    ref_tok, ref_conf = gumbel.gumbel_pick_torch(logits, keys, counters, T)
    assert torch.equal(tok, ref_tok)
    torch.testing.assert_close(conf, ref_conf, rtol=8e-3 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)
    greedy = logits.argmax(-1)
    assert not torch.equal(tok, greedy)                            # the noise mattered
    other, _ = gumbel_pick_triton(logits, keys, counters + 1, T)
    assert not torch.equal(other, tok)                             # the next draw is another one


def test_dispatch_and_fallback(monkeypatch, capsys):
    logits = torch.randn(1, 2, 50, device=DEV)
    keys, counters = row_keys(1, 1).to(DEV), torch.zeros(1, dtype=torch.long, device=DEV)
    ref = gumbel.gumbel_pick_torch(logits, keys, counters, 1.0)
    assert torch.equal(gumbel.gumbel_pick(logits, keys, counters, 1.0)[0], ref[0])
    monkeypatch.setattr(gumbel, "triton_usable", lambda t: True)
    import nemodiff_compile.kernels.gumbel_triton as gt

    def boom(*a, **kw):
        raise RuntimeError("no float64 log here")
    monkeypatch.setattr(gt, "gumbel_pick_triton", boom)
    monkeypatch.setattr(gumbel, "_broken", None)
    assert torch.equal(gumbel.gumbel_pick(logits, keys, counters, 1.0)[0], ref[0])
    assert "fused Gumbel-max kernel unavailable (RuntimeError: no float64 log here)" in capsys.readouterr().err
    assert gumbel._broken is not None
