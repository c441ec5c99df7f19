"""RoPE/YaRN tables and the static KV cache as units, fast (no model pass): the YaRN inverse frequencies and
attention factor against transformers' `_compute_yarn_parameters` over parameters the presets do not
reach (no truncation, mscale ratios, an explicit attention factor, a collapsed ramp, plain RoPE), the
rotation against transformers' `apply_rotary_pos_emb`, the Llama-4 query scale against its formula, and
the cache's scatter/advance/trim/room rules against their definitions. The mutation runs of
model/rope.py and model/cache.py select this file."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from nemodiff_compile.config import PRESETS
from nemodiff_compile.model import StaticKVCache, rope
from nemodiff_compile.model import cache as kvcache

pytest.importorskip("transformers")
from transformers import Ministral3Config  # noqa: E402  (imported once: mutation runs fork per mutant)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

TINY = PRESETS["tiny"]


def _with_rope(cfg, **kw):
    extra = kw.pop("extra", None)
    r = dataclasses.replace(cfg.rope, **kw)
    if extra is not None:
        r = dataclasses.replace(r, extra=extra)
    return dataclasses.replace(cfg, rope=r)


def _hf(cfg):
    d = cfg.to_hf()
    for k in ("model_type", "auto_map", "architectures", "dtype"):
        d.pop(k, None)
    return Ministral3Config(**d)


VARIANTS = {
    "tiny": {},
    "no truncation": dict(extra={"truncate": False}),
    "mscale ratio": dict(mscale=2.0, mscale_all_dim=0.5, factor=8.0),
    "no mscale_all_dim": dict(mscale=2.0, mscale_all_dim=0.0, factor=4.0),
    "small factor": dict(factor=1.5, mscale_all_dim=0.0),
    "explicit attention factor": dict(extra={"attention_factor": 0.75}),
    "betas": dict(beta_fast=8.0, beta_slow=4.0, rope_theta=5e5, original_max_position_embeddings=4096),
    "default betas": dict(beta_fast=None, beta_slow=None, original_max_position_embeddings=4096),
    "default betas, no truncation": dict(beta_fast=None, beta_slow=None, original_max_position_embeddings=4096,
                                         extra={"truncate": False}),
    "factor below one": dict(factor=0.5, mscale_all_dim=0.0),
    "ramp past the last dim": dict(beta_slow=1e-4, original_max_position_embeddings=1 << 20),
    "collapsed ramp": dict(beta_fast=4.0, beta_slow=4.0, extra={"truncate": False}),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_yarn_tables_match_transformers(name):
    cfg = _with_rope(TINY, **VARIANTS[name])
    want, scale = ROPE_INIT_FUNCTIONS["yarn"](_hf(cfg))
    got = rope.inv_freq(cfg)
    assert got.dtype == torch.float32 and got.shape == (cfg.head_dim // 2,)
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)
    assert rope.attention_factor(cfg) == pytest.approx(scale, rel=1e-12)
    if name == "mscale ratio":
        assert rope.attention_factor(cfg) != 1.0


def test_yarn_interpolates_low_frequencies_only():
    cfg = _with_rope(TINY, factor=16.0, original_max_position_embeddings=16384)
    ratio = rope.inv_freq(cfg) / rope.inv_freq(_with_rope(cfg, rope_type="default"))     # [head_dim / 2]
    assert torch.equal(ratio[:8], torch.ones(8))                             # fast dims: extrapolated
    torch.testing.assert_close(ratio[-2:], torch.full((2,), 1 / 16))         # slow dims: interpolated
    assert bool((ratio[8:14].diff() < 0).all()) and 1 / 16 < ratio[13] < ratio[8] < 1      # a linear ramp


def test_tables_are_host_float32_whatever_the_defaults():
    """Traced or exported under another default device or dtype, the tables stay host float32."""
    want = rope.inv_freq(TINY)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.device("meta"):
            got = rope.inv_freq(TINY)
    finally:
        torch.set_default_dtype(old)
    assert got.device.type == "cpu" and got.dtype == torch.float32 and torch.equal(got, want)


def test_default_rope_is_plain_theta_powers():
    cfg = _with_rope(TINY, rope_type="default", rope_theta=10000.0, mscale=2.0, mscale_all_dim=0.5)
    d = cfg.head_dim
    want = torch.tensor([1.0 / 10000.0 ** (2 * i / d) for i in range(d // 2)])
    torch.testing.assert_close(rope.inv_freq(cfg), want)
    assert rope.attention_factor(cfg) == 1.0


def test_rotation_matches_transformers():
    g = torch.Generator().manual_seed(0)
    D = TINY.head_dim
    pos = torch.tensor([[0, 1, 5, 130], [7, 8, 9, 10]])                    # [B, L]
    cos, sin = rope.cos_sin(pos, rope.inv_freq(TINY), 0.5, torch.float64)
    assert cos.shape == (2, 4, D) and cos.dtype == torch.float64
    f = pos[..., None].double() * rope.inv_freq(TINY).double()
    torch.testing.assert_close(cos[..., : D // 2], 0.5 * f.cos(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sin[..., D // 2:], 0.5 * f.sin(), rtol=1e-5, atol=1e-6)
    q, k = torch.randn(2, 3, 4, D, generator=g), torch.randn(2, 1, 4, D, generator=g)
    cos32, sin32 = rope.cos_sin(pos, rope.inv_freq(TINY), 1.0, torch.float32)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos32, sin32)
    torch.testing.assert_close(rope.apply_rope(q, cos32, sin32), want_q)
    torch.testing.assert_close(rope.apply_rope(k, cos32, sin32), want_k)
    x = torch.arange(8.0)
    assert rope.rotate_half(x).tolist() == [-4.0, -5.0, -6.0, -7.0, 0.0, 1.0, 2.0, 3.0]


def test_query_scale_formula():
    cfg = _with_rope(TINY, original_max_position_embeddings=100, llama_4_scaling_beta=0.3)
    pos = torch.tensor([[0, 99, 100, 250, 1000]])
    want = [1 + 0.3 * math.log(1 + p // 100) for p in pos[0].tolist()]
    got = rope.query_scale(cfg, pos)
    assert got.shape == (1, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got[0], torch.tensor(want))


# ---- the static KV cache ------------------------------------------------------------------------------

def test_cache_shapes_and_reset():
    c = StaticKVCache(TINY, 3, 20, dtype=torch.float16)
    shape = (TINY.num_hidden_layers, 3, TINY.num_key_value_heads, 20, TINY.head_dim)
    assert c.k.shape == c.v.shape == shape and c.k.dtype == c.v.dtype == torch.float16
    assert (c.batch, c.max_len) == (3, 20) and c.lengths.tolist() == [0, 0, 0] and c.lengths.dtype == torch.long
    assert not c.k.any() and not c.v.any()
    c.advance(torch.tensor([4, 0, 2]))
    c.reset()
    assert c.lengths.tolist() == [0, 0, 0]


def test_cache_writes_each_row_at_its_length():
    H, D = TINY.num_key_value_heads, TINY.head_dim
    c = StaticKVCache(TINY, 2, 10)
    c.advance(torch.tensor([3, 1]))
    k = torch.arange(2 * H * 2 * D, dtype=torch.float64).reshape(2, H, 2, D) + 1     # float64 in, cast
    v = -k
    c.write(1, k, v)
    assert c.k.dtype == torch.float32
    assert torch.equal(c.k[1, 0, :, 3:5], k[0].float()) and torch.equal(c.v[1, 1, :, 1:3], v[1].float())
    assert not c.k[0].any() and not c.k[1, 0, :, :3].any() and not c.k[1, 0, :, 5:].any()
    assert not c.k[1, 1, :, :1].any() and not c.k[1, 1, :, 3:].any()
    assert c.lengths.tolist() == [3, 1]                   # write does not advance
    c.advance(torch.tensor([2, 2]))
    assert c.lengths.tolist() == [5, 3]


def test_cache_trim_and_room():
    c = StaticKVCache(TINY, 2, 10)
    c.advance(torch.tensor([6, 4]))
    c.trim(torch.tensor([6, 2]))
    assert c.lengths.tolist() == [6, 2]
    with pytest.raises(ValueError, match=r"^trim\(\) can only shorten rows$"):
        c.trim(torch.tensor([7, 2]))
    assert c.lengths.tolist() == [6, 2]
    c.check_room(4)                                        # 6 + 4 == 10 fits
    with pytest.raises(ValueError, match="11 positions needed, max_len is 10"):
        c.check_room(5)
    kvcache.check_trim(torch.tensor([3]), torch.tensor([3]))
    kvcache.check_room(torch.tensor([0, 9]), 1, 10)
    with pytest.raises(ValueError):
        kvcache.check_room(torch.tensor([0, 9]), 2, 10)


def test_cache_lives_on_the_device_it_was_given():
    """The meta device stands in for a GPU: every buffer is placed there and a write stays there."""
    c = StaticKVCache(TINY, 2, 10, device="meta")
    assert c.k.device.type == c.v.device.type == c.lengths.device.type == "meta"
    k = torch.zeros(2, TINY.num_key_value_heads, 3, TINY.head_dim, device="meta")
    c.write(0, k, k)
    assert c.k.device.type == "meta"
