"""TrtDenoiser.step on the CPU against a fake TensorRT (runtime, engine, execution contexts) and fake
CUDA streams: what a pass binds (every tensor's address and shape, the profile of its bucket), what
it feeds (padding rows, causal flag, temperature, noise), what it returns (the real rows), and how a
causal pass scatters the block's K/V into the cache. The fake engine computes its outputs from the
bound inputs with a simple known function, so each check has an exact expected value."""

import contextlib
import types

import pytest
import torch

from nemodiff_compile.artifact.profiles import make_profiles
from nemodiff_compile.artifact.spec import step_spec
from nemodiff_compile.backends import trt as trt_backend
from nemodiff_compile.backends.trt import TrtDenoiser

MAX_CTX = 64
BUCKETS = {"batch_sizes": [1, 4], "max_context": MAX_CTX, "block_length": 8}


class FakeContext:
    def __init__(self, engine):
        self.engine, self.profile, self.shapes, self.addresses, self.runs = engine, None, {}, {}, []
        self.memory = None

    def set_device_memory(self, ptr, size):
        self.memory = (ptr, size)

    def set_optimization_profile_async(self, profile, stream):
        assert self.profile is None, "a context is set to its profile once"
        self.profile = profile
        return True

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream):
        """The 'engine': token = (input_id + cache_length + position) % V, confidence 0.75 causal /
        0.25 bidirectional; new K/V = input_id + layer (keys) or its negative (values)."""
        t = self.engine.tensors(self)                     # name -> the tensor bound at that address
        for name, ptr in self.addresses.items():
            assert t[name].data_ptr() == ptr
        ids, lens = t["input_ids"], t["cache_lengths"]
        B, L = ids.shape
        assert self.shapes["input_ids"] == (B, L) and t["token"].shape == (B, L)
        V = self.engine.vocab
        t["token"].copy_((ids + lens[:, None] + torch.arange(L)) % V)
        causal = t["causal"].expand(B)                    # one flag per row ([B]; [] in older plans)
        t["confidence"].copy_(torch.where(causal, 0.75, 0.25)[:, None].expand(B, L))
        layers = torch.arange(t["new_keys"].shape[0]).float()[:, None, None, None, None]
        base = ids.float()[None, :, None, :, None]                                     # [1, B, 1, L, 1]
        t["new_keys"].copy_((base + layers).expand_as(t["new_keys"]))
        t["new_values"].copy_((-base - layers).expand_as(t["new_values"]))
        self.runs.append(dict(profile=self.profile, shapes=dict(self.shapes), causal=causal.tolist(),
                              temperature=float(t["temperature"]), noise=t["gumbel_noise"].clone(),
                              cache_lengths=lens.clone(), num_valid=t["num_valid"].clone()))
        self.engine.runs.append(self.runs[-1])
        return True


class FakeEngine:
    def __init__(self, vocab):
        self.vocab, self.contexts, self.den, self.runs = vocab, [], None, []

    def create_execution_context(self, strategy):
        assert strategy == "USER_MANAGED"                 # every context runs on the shared device memory
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]

    def tensors(self, ctx):
        """The tensors of the pass key that owns this context (one context per captured pass key)."""
        (bound,) = [b for b in self.den._bound.values() if b.context is ctx]
        return bound.tensors


class FakeStream:
    cuda_stream = 0

    def __init__(self, *a, **k):
        pass

    def synchronize(self):
        pass


@pytest.fixture
def den(tiny_cfg, tmp_path, monkeypatch):
    spec = step_spec(tiny_cfg, "float32", False).to_json()
    entry = {"profiles": [p.to_json() for p in make_profiles(spec, BUCKETS)], "plugins": [],
             "file": "engine.plan", "target": "fake"}
    (tmp_path / "engine.plan").write_bytes(b"plan")
    engine = FakeEngine(tiny_cfg.vocab_size)

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            assert data == b"plan"
            return engine

    mod = types.SimpleNamespace(Logger=types.SimpleNamespace(WARNING=1), Runtime=Runtime,
                                ExecutionContextAllocationStrategy=types.SimpleNamespace(USER_MANAGED="USER_MANAGED"),
                                ProfilingVerbosity=types.SimpleNamespace(LAYER_NAMES_ONLY=1))
    mod.Logger = type("Logger", (), {"WARNING": 1, "__init__": lambda self, level: None})
    fake_trt = types.SimpleNamespace(mod=mod, flavor="tensorrt", version="10.0")
    monkeypatch.setattr("nemodiff_compile.backends.trt_shim.load", lambda: fake_trt)
    monkeypatch.setattr(trt_backend, "select_plan", lambda *a, **k: entry)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: FakeStream())
    manifest = types.SimpleNamespace(io_spec=spec, buckets=BUCKETS, engines=[entry])
    d = TrtDenoiser(tmp_path, manifest, tiny_cfg, use_cuda_graphs=False, device="cpu", stream=FakeStream())
    engine.den = d
    return d, engine


def test_step_binds_feeds_returns_and_scatters(den, tiny_cfg):
    d, engine = den
    d.reset(3)                                           # 3 rows ride in the 4-row bucket (profile 1)
    prompt = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [10, 11, 12, 13]])
    nv = torch.tensor([3, 2, 4])
    out = d.step(prompt, causal=True, write=True, num_valid=nv)
    assert out.token.shape == (3, 4) and out.conf.shape == (3, 4)
    assert torch.equal(out.token, (prompt + torch.arange(4)) % tiny_cfg.vocab_size)      # lengths were 0
    assert bool((out.conf == 0.75).all())
    assert torch.equal(d.lengths(), nv)
    (ctx,) = engine.contexts
    run = ctx.runs[-1]
    assert run["profile"] == 1 and all(run["causal"]) and run["temperature"] == 0.0
    assert ctx.memory == (d._memory.data_ptr(), d._memory.numel())   # the shared user-managed memory
    plan = d.plan.plan(3, 4)
    assert run["shapes"] == plan.inputs                  # every input shape of the plan, set on the context
    assert set(ctx.addresses) == set(plan.inputs) | set(plan.outputs)
    assert run["cache_lengths"].tolist() == [0, 0, 0, 0] and run["num_valid"].tolist() == [3, 2, 4, 4]
    # the block's K/V went to positions 0..3 of each real row: keys = input id + layer, values negated
    for b in range(3):
        for layer in range(tiny_cfg.num_hidden_layers):
            assert torch.equal(d.k[layer, b, 0, :4, 0], prompt[b].float() + layer)
            assert torch.equal(d.v[layer, b, 0, :4, 0], -prompt[b].float() - layer)
    assert not d.k[:, :3, :, 4:].any()                   # nothing past the block

    blk = torch.full((3, 8), 99)
    out = d.step(blk, causal=False, write=False)         # a refinement pass: reads, writes nothing
    run = engine.runs[-1]
    assert not any(run["causal"]) and run["cache_lengths"].tolist() == [3, 2, 4, 0]   # padding row: empty
    assert run["num_valid"].tolist() == [8, 8, 8, 8] and run["shapes"]["input_ids"] == (4, 8)
    assert torch.equal(out.token, (99 + nv[:, None] + torch.arange(8)) % tiny_cfg.vocab_size)
    assert bool((out.conf == 0.25).all()) and torch.equal(d.lengths(), nv)
    k_before = d.k.clone()
    d.step(blk, causal=True, write=True)                 # commit: scatter at each row's own length
    for b in range(3):
        n = int(nv[b])
        assert torch.equal(d.k[0, b, 0, n:n + 8, 0], torch.full((8,), 99.0))
        assert torch.equal(d.k[0, b, 0, :n], k_before[0, b, 0, :n])                  # the prefix kept
    assert torch.equal(d.lengths(), nv + 8)
    out = d.step(blk, causal=torch.tensor([False, True, False]), write=True)   # a mixed pass: one flag per row
    run = engine.runs[-1]
    assert run["causal"] == [False, True, False, False]                        # the padding row bidirectional
    assert out.conf[:, 0].tolist() == [0.25, 0.75, 0.25]
    assert d.lengths().tolist() == [n + 8 + 8 * (b == 1) for b, n in enumerate(nv.tolist())]   # the causal row only
    # one context per pass key (bucket, block): the 4-position prefill and the 8-position passes, each
    # set to its profile once and reused (desk check: one execution context per captured graph)
    assert len(engine.contexts) == 2 and [len(c.runs) for c in engine.contexts] == [1, 3]


def test_a_smaller_batch_uses_its_own_profile_and_the_noise(den, tiny_cfg):
    d, engine = den
    d.reset(1)
    g = torch.Generator().manual_seed(0)
    out = d.step(torch.tensor([[3, 4, 5]]), causal=False, write=False, temperature=0.5, generator=g)
    (ctx,) = engine.contexts
    run = ctx.runs[-1]
    assert run["profile"] == 0 and run["temperature"] == 0.5
    assert run["shapes"]["gumbel_noise"] == (1, 3, tiny_cfg.vocab_size) and run["noise"].abs().sum() > 0
    assert out.token.tolist() == [[3, 5, 7]]
    d.step(torch.tensor([[3, 4, 5]]), causal=False, write=False)
    assert not ctx.runs[-1]["noise"].any()               # greedy: the noise input is zeroed
    d.reset(2)
    d.step(torch.tensor([[1], [2]]), causal=True, write=True)
    assert [c.profile for c in engine.contexts] == [0, 1]
