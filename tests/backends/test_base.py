"""The backend base: what a new backend gets for free (lengths, trim, the guard, noise, the K/V scatter),
shown with the smallest backend there is, whose whole implementation is `_allocate` and `_pass`."""

import pytest
import torch

from nemodiff_compile.backends.base import BackendDenoiser, scatter_block
from nemodiff_compile.decoding import loops, remask
from nemodiff_compile.decoding.denoiser import StepOut
from nemodiff_compile.decoding.embeds import PrefillEmbeds
from nemodiff_compile.errors import InvalidArgument


class Echo(BackendDenoiser):
    """Predicts token + 1 with confidence 1; its "K/V" is the token id, written at each row's length."""

    def __init__(self, cfg, max_len):
        super().__init__(cfg, max_len, "cpu")
        self.allocations, self.noise = 0, []

    def _allocate(self, rows):
        self.allocations += 1
        self.k, self.v = self.kv_cache(rows, torch.float32)

    def _pass(self, tokens, *, causal, write, num_valid, draft_lora, temperature, noise):
        self.noise.append(noise)
        if write:
            c, (B, L) = self.config, tokens.shape
            kv = tokens.float()[None, :, None, :, None].expand(c.num_hidden_layers, B, c.num_key_value_heads, L,
                                                               c.head_dim)
            scatter_block(self.k, self.v, self._lengths, kv, kv)
        return StepOut(tokens + 1, torch.ones(tokens.shape))


@pytest.fixture
def echo(tiny_cfg):
    return Echo(tiny_cfg, 16)


def test_lengths_trim_and_the_cache_writes(echo):
    echo.reset(2)
    assert echo.lengths().tolist() == [0, 0] and echo.bucket == 2
    echo.step(torch.tensor([[5, 6, 7], [8, 9, 0]]), causal=True, write=True, num_valid=torch.tensor([3, 2]))
    assert echo.lengths().tolist() == [3, 2]
    echo.step(torch.tensor([[1], [2]]), causal=True, write=True)                   # default: the whole block
    assert echo.lengths().tolist() == [4, 3] and echo.executed == 2
    assert echo.k[0, 0, 0, :4, 0].tolist() == [5, 6, 7, 1] and echo.k[0, 1, 0, :3, 0].tolist() == [8, 9, 2]
    echo.step(torch.tensor([[3, 3], [3, 3]]), causal=False, write=False)           # reads, writes nothing
    assert echo.lengths().tolist() == [4, 3]
    echo.trim(torch.tensor([2, 3]))
    assert echo.lengths().tolist() == [2, 3]
    with pytest.raises(ValueError, match="only shorten"):
        echo.trim(torch.tensor([3, 3]))


def test_the_guard(echo):
    echo.reset(2)
    with pytest.raises(ValueError, match="reset\\(\\) was called for batch 2"):
        echo.step(torch.zeros(3, 1, dtype=torch.long), causal=True, write=True)
    with pytest.raises(ValueError, match="bidirectional passes cannot write"):
        echo.step(torch.zeros(2, 1, dtype=torch.long), causal=False, write=True)
    with pytest.raises(ValueError, match="KV cache overflow"):
        echo.step(torch.zeros(2, 17, dtype=torch.long), causal=True, write=True)


def test_causal_per_row(echo, monkeypatch):
    """A [B] causal flag: uniform ones are a plain flag; a mixed one only where the backend declares `row_causal`,
    and then a writing pass advances the causal rows alone (the others' K/V past their lengths is scratch)."""
    seen = []
    monkeypatch.setattr(echo, "_pass", lambda tokens, **kw: seen.append(kw["causal"]) or StepOut(tokens, tokens * 0.0))
    echo.reset(3)
    echo.step(torch.ones(3, 2, dtype=torch.long), causal=torch.tensor([True, True, True]), write=True)
    assert seen[-1] is True and echo.lengths().tolist() == [2, 2, 2]
    mixed = torch.tensor([True, False, True])
    with pytest.raises(ValueError, match="one causal flag per pass"):
        echo.step(torch.ones(3, 2, dtype=torch.long), causal=mixed, write=True)
    monkeypatch.setattr(echo, "row_causal", True)
    echo.step(torch.ones(3, 2, dtype=torch.long), causal=mixed, write=True, num_valid=torch.tensor([2, 2, 1]))
    assert seen[-1].tolist() == [True, False, True] and echo.lengths().tolist() == [4, 2, 3]
    echo.step(torch.ones(3, 2, dtype=torch.long), causal=torch.tensor([0, 1, 0]), write=True)   # 0/1: as bools
    assert seen[-1].dtype == torch.bool and seen[-1].tolist() == [False, True, False]
    assert echo.lengths().tolist() == [4, 4, 3]
    with pytest.raises(ValueError, match="one flag per row \\(3\\)"):
        echo.step(torch.ones(3, 2, dtype=torch.long), causal=torch.tensor([True, False]), write=True)
    with pytest.raises(ValueError, match="bidirectional passes cannot write"):
        echo.step(torch.ones(3, 2, dtype=torch.long), causal=torch.zeros(3, dtype=torch.bool), write=True)
    echo.reset(1)
    echo.step(torch.ones(1, 2, dtype=torch.long), causal=torch.tensor([True]), write=True)      # one row's flag
    assert seen[-1] is True and echo.lengths().tolist() == [2]


def test_a_mixed_flag_on_a_one_flag_backend_says_what_to_do(echo):
    echo.reset(2)
    with pytest.raises(ValueError) as e:
        echo.step(torch.ones(2, 2, dtype=torch.long), causal=torch.tensor([True, False]), write=True)
    assert str(e.value) == ("Echo takes one causal flag per pass (its graph predates per-row causal: re-export it "
                            "to mix causal and bidirectional rows)")


class Regroupable(Echo):
    """Echo that declares its K/V buffers: what `regroup` needs."""

    def _kv(self):
        return self.k, self.v


def test_regroup_carries_rows_and_their_cache(echo, tiny_cfg):
    """The scheduler's regroup: the kept rows move to the front in the given order with their K/V and lengths;
    the new rows are empty; the buffers are reallocated only when the batch's rows change."""
    assert not echo.can_regroup
    r = Regroupable(tiny_cfg, 16)
    assert r.can_regroup
    r.reset(3)
    r.step(torch.tensor([[5, 6, 7], [8, 9, 0], [3, 4, 0]]), causal=True, write=True, num_valid=torch.tensor([3, 2, 1]))
    r.regroup([2, 0], 4)
    assert (r.batch, r.bucket, r.allocations) == (4, 4, 2)
    assert r.lengths().tolist() == [1, 3, 0, 0]
    assert r.k[0, 0, 0, :1, 0].tolist() == [3] and r.k[0, 1, 0, :3, 0].tolist() == [5, 6, 7]
    assert torch.equal(r.v, r.k) and not r.k[:, 2:].any()
    for keep, batch in (([0, 0], 4), ([4], 4), ([-1], 4), ([0, 1, 2], 2)):
        with pytest.raises(ValueError) as e:
            r.regroup(keep, batch)
        assert str(e.value) == f"regroup: rows {keep} of 4 into a batch of {batch}"
    r.regroup([1, 0, 3], 4)                                  # same rows: the buffers stay
    assert r.allocations == 2 and r.lengths().tolist() == [3, 1, 0, 0] and r.lengths().dtype == torch.long
    assert r.k[0, 0, 0, :3, 0].tolist() == [5, 6, 7] and r.k[0, 1, 0, :1, 0].tolist() == [3]
    r.regroup([1, 0, 3, 2], 4)                               # every row kept
    assert r.lengths().tolist() == [1, 3, 0, 0] and r.k[0, 1, 0, :3, 0].tolist() == [5, 6, 7]
    r.max_len = 32                                           # a longer cache: the rows' prefix carried over
    r.regroup([1, 0], 2)
    assert r.k.shape[3] == 32 and r.lengths().tolist() == [3, 1] and r.k[0, 0, 0, :4, 0].tolist() == [5, 6, 7, 0]
    r.max_len = 8                                            # a shorter one (a window): its first positions
    r.regroup([0], 1)
    assert r.k.shape[3] == 8 and r.k[0, 0, 0, :4, 0].tolist() == [5, 6, 7, 0]
    r.regroup([], 2)                                         # nothing kept
    assert r.lengths().tolist() == [0, 0]
    fresh = Regroupable(tiny_cfg, 16)                        # before any reset: no buffers to carry
    fresh.regroup([], 2)
    assert (fresh.batch, fresh.lengths().tolist(), fresh.k.shape[1]) == (2, [0, 0], 2)
    echo.reset(1)
    with pytest.raises(NotImplementedError, match="^Echo cannot regroup its rows$"):
        echo.regroup([0], 2)


def test_regroup_picks_the_bucket(tiny_cfg):
    from nemodiff_compile.artifact.buckets import BatchBuckets

    r = Regroupable(tiny_cfg, 16)
    r.buckets = BatchBuckets((1, 4, 8))
    r.reset(2)
    r.regroup([1], 3)
    assert (r.batch, r.bucket, r.k.shape[1]) == (3, 4, 4)
    r.regroup([0, 1, 2], 5)
    assert (r.batch, r.bucket, r.k.shape[1]) == (5, 8, 8)


def test_image_embeds_enter_through_a_causal_writing_pass(tiny_cfg):
    r = Recorder(tiny_cfg, 16)
    r.reset(1)
    tok = torch.zeros(1, 2, dtype=torch.long)
    emb = PrefillEmbeds(torch.zeros(1, 2, dtype=torch.bool), torch.zeros(1, 2, tiny_cfg.hidden_size))
    with pytest.raises(InvalidArgument) as e:
        r.step(tok, causal=True, write=True, embeds=emb)
    assert str(e.value) == "Recorder: this engine takes no image input (build it from a vision-language checkpoint)"
    r.accepts_embeds = True
    for causal, write in ((False, False), (True, False)):
        with pytest.raises(ValueError) as e:
            r.step(tok, causal=causal, write=write, embeds=emb)
        assert str(e.value) == "input embeddings enter through a causal writing pass (the prefill)"
    spans = PrefillEmbeds(emb.mask, emb.values, torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(InvalidArgument) as e:
        r.step(tok, causal=True, write=True, embeds=spans)
    assert str(e.value) == ("image_prefill 'bidirectional': the reference only (Recorder prefills image spans "
                            "causally)")
    assert not r.calls
    r.step(tok, causal=True, write=True, embeds=emb)
    assert r.calls[-1]["embeds"] is emb
    r.step(tok, causal=False, write=False)
    assert "embeds" not in r.calls[-1]
    r.accepts_spans = True
    r.step(tok, causal=True, write=True, embeds=spans)
    assert r.calls[-1]["embeds"] is spans


def test_reallocates_only_when_rows_or_max_len_change(echo):
    for batch in (2, 2, 3, 3):
        echo.reset(batch)
    assert echo.allocations == 2
    echo.max_len = 32
    echo.reset(3)
    assert echo.allocations == 3 and echo.k.shape[3] == 32


def test_noise_is_the_references_host_draw(echo, tiny_cfg):
    echo.reset(1)
    tok = torch.zeros(1, 4, dtype=torch.long)
    echo.step(tok, causal=False, write=False)
    echo.step(tok, causal=False, write=False, temperature=0.7, generator=torch.Generator().manual_seed(3))
    want = remask.gumbel_noise((1, 4, tiny_cfg.vocab_size), torch.Generator().manual_seed(3))
    assert echo.noise[0] is None and echo.noise[1].dtype == torch.float64 and torch.equal(echo.noise[1], want)


def test_the_loops_run_on_it(echo):
    for mode in loops.MODES:
        g = loops.generate(echo, [[1, 500, 501], [1, 700]], mode, max_new_tokens=6, block_length=4)
        assert [len(t) for t in g.tokens] == [6, 6] and g.nfe == sum(g.nfe_by_phase.values())
        assert g.tokens[0][0] == 502 and echo.lengths()[1] >= 2 + 6 - 1
    assert echo.block_refiner(loops.DecodePolicy()) is None              # the capability is opt-in


def test_scatter_block_fp8_cache_on_the_cpu():
    k = torch.zeros(1, 2, 1, 6, 2, dtype=torch.float8_e4m3fn)
    v = torch.zeros_like(k)
    new = torch.tensor([0.5, 1.0, 2.0]).to(torch.float8_e4m3fn)[None, None, None, :, None].expand(1, 2, 1, 3, 2)
    scatter_block(k, v, torch.tensor([1, 3]), new, new.clone())
    assert k[0, 0, 0, :, 0].float().tolist() == [0, 0.5, 1, 2, 0, 0]
    assert v[0, 1, 0, :, 1].float().tolist() == [0, 0, 0, 0.5, 1, 2]


class Recorder(BackendDenoiser):
    """Records what the base hands `_pass` and `_allocate`."""

    def __init__(self, cfg, max_len, **kw):
        super().__init__(cfg, max_len, "cpu", **kw)
        self.calls, self.allocated = [], []

    def _allocate(self, rows):
        self.allocated.append(rows)
        self.k, self.v = self.kv_cache(rows, torch.float16)

    def _pass(self, tokens, **kw):
        self.calls.append(kw)
        return StepOut(tokens, torch.ones(tokens.shape))


def test_what_the_base_hands_a_backend(tiny_cfg):
    from nemodiff_compile.artifact.buckets import BatchBuckets

    r = Recorder(tiny_cfg, 16)
    assert (r.device, r.buckets, r.return_logits) == (torch.device("cpu"), None, False)
    assert (r.batch, r.bucket, r.executed, r._allocated) == (0, 0, 0, None)
    assert r.lengths().dtype == torch.long and r.lengths().shape == (0,)
    r.reset(3)
    assert r.allocated == [3] and r.k.dtype == r.v.dtype == torch.float16 and r.k.device.type == "cpu"
    assert r.k.shape == (tiny_cfg.num_hidden_layers, 3, tiny_cfg.num_key_value_heads, 16, tiny_cfg.head_dim)
    assert r.v.shape == r.k.shape and not r.k.any()
    r.step(torch.zeros(3, 2, dtype=torch.long), causal=True, write=True, num_valid=torch.tensor([1, 2, 0], dtype=torch.int32),
           draft_lora=True)
    kw = r.calls[-1]
    assert kw["causal"] is True and kw["write"] is True and kw["draft_lora"] is True and kw["temperature"] == 0.0
    assert kw["num_valid"].dtype == torch.long and kw["num_valid"].tolist() == [1, 2, 0] and kw["noise"] is None
    assert r.lengths().dtype == torch.long and r.lengths().tolist() == [1, 2, 0]
    r.step(torch.zeros(3, 2, dtype=torch.long), causal=False, write=False, temperature=0.7,
           generator=torch.Generator().manual_seed(0))
    kw = r.calls[-1]
    assert kw["causal"] is False and kw["draft_lora"] is False and kw["temperature"] == 0.7
    assert kw["noise"].shape == (3, 2, tiny_cfg.vocab_size) and kw["noise"].dtype == torch.float64
    r.trim(torch.tensor([1, 1, 0], dtype=torch.int32))
    assert r.lengths().dtype == torch.long and r.lengths().tolist() == [1, 1, 0]
    r.reset(3)
    assert r.allocated == [3] and r.executed == 0                    # same rows: buffers kept
    with pytest.raises(ValueError) as e:
        r.step(torch.zeros(3, 1, dtype=torch.long), causal=False, write=True)
    assert str(e.value) == "the KV cache only holds causal K/V: bidirectional passes cannot write it"
    r.check_pass(3, 2)                                               # a refiner's guard: a read-only pass
    with pytest.raises(ValueError, match="cannot write"):
        r.check_pass(3, 2, write=True)                               # causal defaults to False
    b = Recorder(tiny_cfg, 16, buckets=BatchBuckets((1, 4)), return_logits=True)
    b.reset(3)
    assert (b.batch, b.bucket, b.allocated, b.return_logits) == (3, 4, [4], True)


def test_scatter_block_writes_at_each_rows_length():
    k = torch.zeros(1, 2, 1, 6, 1)
    v = torch.zeros(1, 2, 1, 6, 1)
    new = torch.tensor([[1.0, 2.0], [3.0, 4.0]])[None, :, None, :, None]      # [1, 2, 1, 2, 1]
    scatter_block(k, v, torch.tensor([1, 3]), new, -new)
    assert k[0, :, 0, :, 0].tolist() == [[0, 1, 2, 0, 0, 0], [0, 0, 0, 3, 4, 0]]
    assert torch.equal(v, -k)
