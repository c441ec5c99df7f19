"""The reference model against transformers' Ministral 3 (an independent implementation of the same
trunk), and the attention patterns and cache against their definitions."""

import pytest
import torch

from nemodiff_compile.config import PRESETS
from nemodiff_compile.model import NemotronLabsDiffusion, Pattern, StaticKVCache
from nemodiff_compile.model import rope


def _hf_config(cfg):
    from transformers import Ministral3Config

    d = cfg.to_hf()
    for k in ("model_type", "auto_map", "architectures", "dtype"):
        d.pop(k, None)
    return Ministral3Config(**d)


def test_matches_transformers_ministral3(random_tiny, tiny_cfg):
    from transformers.models.ministral3.modeling_ministral3 import Ministral3Model

    hf = Ministral3Model(_hf_config(tiny_cfg)).eval()
    sd = {k.removeprefix("encoder."): v for k, v in random_tiny.state_dict().items() if k.startswith("encoder.")}
    hf.load_state_dict(sd, strict=True)
    # 300 positions: crosses original_max (128) twice, so the Llama-4 query scale takes 3 values
    ids = torch.randint(0, tiny_cfg.vocab_size, (2, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = random_tiny.diffusion_head(hf(ids).last_hidden_state)
        got = random_tiny(ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", ["3b", "8b", "14b", "tiny"])
def test_yarn_inv_freq_matches_transformers(size):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = PRESETS[size]
    want, scale = ROPE_INIT_FUNCTIONS["yarn"](_hf_config(cfg))
    torch.testing.assert_close(rope.inv_freq(cfg), want, rtol=0, atol=0)
    assert rope.attention_factor(cfg) == scale == 1.0


def test_query_scale_is_identity_before_original_max():
    cfg = PRESETS["8b"]
    pos = torch.tensor([[0, 16383, 16384, 32768, 49152]])
    s = rope.query_scale(cfg, pos)[0]
    assert s[:2].tolist() == [1.0, 1.0]
    torch.testing.assert_close(s[2:], 1 + 0.1 * torch.log(torch.tensor([2.0, 3.0, 4.0])))


def test_fourteen_b_uses_theta_1e9_and_q_width_4096():
    assert PRESETS["14b"].rope.rope_theta == 1e9
    for size in ("3b", "8b", "14b"):
        assert PRESETS[size].q_width == 4096


def test_causal_vs_bidirectional(random_tiny, tiny_cfg):
    ids = torch.randint(0, tiny_cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        causal = random_tiny(ids, pattern="causal")
        bidir = random_tiny(ids, pattern="bidirectional")
        changed = ids.clone()
        changed[0, -1] = (ids[0, -1] + 1) % tiny_cfg.vocab_size
        causal2 = random_tiny(changed, pattern="causal")
        bidir2 = random_tiny(changed, pattern="bidirectional")
    # causal: position i never depends on a later token; bidirectional: every position does
    torch.testing.assert_close(causal[:, :-1], causal2[:, :-1], rtol=0, atol=0)
    assert (bidir[0, :-1] - bidir2[0, :-1]).abs().amax(-1).min() > 1e-4


def test_cached_equals_uncached(random_tiny, tiny_cfg):
    ids = torch.randint(0, tiny_cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    cache = StaticKVCache(tiny_cfg, 2, 64)
    with torch.no_grad():
        full = random_tiny(ids)
        parts = [random_tiny(ids[:, a:b], cache=cache) for a, b in ((0, 17), (17, 18), (18, 40))]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.lengths.tolist() == [40, 40]


def test_block_causal_pass_reads_but_does_not_write(random_tiny, tiny_cfg):
    """A bidirectional block over a cache == the full sequence with a block-causal mask."""
    g = torch.Generator().manual_seed(4)
    prefix = torch.randint(0, tiny_cfg.vocab_size, (1, 20), generator=g)
    block = torch.randint(0, tiny_cfg.vocab_size, (1, 8), generator=g)
    cache = StaticKVCache(tiny_cfg, 1, 64)
    L = 28
    mask = torch.ones(L, L, dtype=torch.bool).tril()
    mask[20:, 20:] = True                                   # bidirectional inside the block
    with torch.no_grad():
        random_tiny(prefix, cache=cache)
        k_before = cache.k.clone()
        got = random_tiny(block, cache=cache, pattern=Pattern.BIDIRECTIONAL)
        want = random_tiny(torch.cat([prefix, block], 1), attn_mask=mask[None])[:, 20:]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert cache.lengths.tolist() == [20] and torch.equal(cache.k, k_before)
    with pytest.raises(ValueError, match="causal K/V"):
        random_tiny(block, cache=cache, pattern="bidirectional", write_cache=True)


def test_ragged_rows_equal_single_rows(random_tiny, tiny_cfg):
    g = torch.Generator().manual_seed(5)
    a = torch.randint(0, tiny_cfg.vocab_size, (1, 9), generator=g)
    b = torch.randint(0, tiny_cfg.vocab_size, (1, 5), generator=g)
    batch = torch.zeros(2, 9, dtype=torch.long)
    batch[0], batch[1, :5] = a[0], b[0]
    cache = StaticKVCache(tiny_cfg, 2, 32)
    blk = torch.randint(0, tiny_cfg.vocab_size, (2, 4), generator=g)
    with torch.no_grad():
        random_tiny(batch, cache=cache, num_valid=torch.tensor([9, 5]))
        got = random_tiny(blk, cache=cache, pattern="bidirectional")
        for row, prompt in ((0, a), (1, b)):
            c1 = StaticKVCache(tiny_cfg, 1, 32)
            random_tiny(prompt, cache=c1)
            want = random_tiny(blk[row : row + 1], cache=c1, pattern="bidirectional")
            torch.testing.assert_close(got[row : row + 1], want, rtol=1e-5, atol=1e-5)
    assert cache.lengths.tolist() == [9, 5]


def test_trim_then_rewrite(random_tiny, tiny_cfg):
    ids = torch.randint(0, tiny_cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(6))
    cache = StaticKVCache(tiny_cfg, 1, 32)
    with torch.no_grad():
        random_tiny(ids[:, :8], cache=cache)
        random_tiny(torch.full((1, 4), 7), cache=cache)            # a rejected draft
        cache.trim(torch.tensor([8]))
        got = random_tiny(ids[:, 8:], cache=cache)
        want = random_tiny(ids)[:, 8:]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="overflow"):
        random_tiny(torch.zeros(1, 30, dtype=torch.long), cache=cache)


def test_bf16_close_to_fp32(random_tiny, tiny_cfg):
    m16 = NemotronLabsDiffusion(tiny_cfg)
    m16.load_state_dict(random_tiny.state_dict())
    m16 = m16.to(torch.bfloat16)
    ids = torch.randint(0, tiny_cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        a, b = random_tiny(ids), m16(ids)
    assert b.dtype == torch.bfloat16
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.float().flatten(), dim=0)
    assert cos > 0.99


def test_explicit_attention_equals_sdpa(random_tiny, tiny_cfg):
    """The exported form of attention (`explicit_attention`: MatMul, Add of the bias, Softmax, MatMul) computes
    what eager scaled_dot_product_attention does, over a ragged cache, causal and bidirectional, with padded
    rows: equal in fp32, and in bf16 no further from the fp32 result than SDPA in bf16 is. Only the twin it
    is set on changes."""
    import copy

    from nemodiff_compile.model.model import Attention, attention_bias, block_mask, explicit_attention

    explicit = explicit_attention(copy.deepcopy(random_tiny))
    assert all(m.explicit for m in explicit.modules() if isinstance(m, Attention))
    assert not any(m.explicit for m in random_tiny.modules() if isinstance(m, Attention))
    g = torch.Generator().manual_seed(7)
    B, L, S = 3, 6, 16
    shape = (tiny_cfg.num_hidden_layers, B, tiny_cfg.num_key_value_heads, S, tiny_cfg.head_dim)
    past_k, past_v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    lengths, num_valid = torch.tensor([0, 5, 16]), torch.tensor([6, 2, 4])
    ids = torch.randint(0, tiny_cfg.vocab_size, (B, L), generator=g)
    positions = lengths[:, None] + torch.arange(L)
    bf16 = {m: copy.deepcopy(m).to(torch.bfloat16) for m in (random_tiny, explicit)}
    for causal in (True, False):
        mask = block_mask(causal, lengths, S, L, num_valid)
        with torch.no_grad():
            want = random_tiny.step(ids, positions, mask, past_k, past_v)
            got = explicit.step(ids, positions, mask, past_k, past_v)
            half = {m: h.step(ids, positions, mask, past_k.bfloat16(), past_v.bfloat16())[0].float()
                    for m, h in bf16.items()}
        for a, b in zip(got, want):                                            # logits, new K, new V
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        err = {m: (h - want[0]).abs().max().item() for m, h in half.items()}
        assert err[explicit] <= max(2 * err[random_tiny], 0.02), err
    bias = attention_bias(block_mask(True, lengths, S, L, num_valid), 4, torch.bfloat16)   # [B, 1, 4L, S+L]
    assert bias.shape == (B, 1, 4 * L, S + L) and bias.isfinite().all()
    assert torch.equal(bias[:, :, L : 2 * L], bias[:, :, :L])                              # tiled per query head
