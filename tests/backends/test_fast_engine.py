"""The fast engine (fused layout, cache written in place, captured passes, device-side dlm loop) against
the eager reference on the CPU: logits per pass, whole trajectories in every mode, and the graph
bookkeeping through a fake graph pool that records captures and replays by calling the function."""

import copy

import pytest
import torch

from nemodiff_compile import load_reference
from nemodiff_compile.errors import InvalidArgument
from nemodiff_compile.artifact.buckets import BatchBuckets
from nemodiff_compile.backends.fast import FastDenoiser
from nemodiff_compile.backends.fast_model import FastModel
from nemodiff_compile.backends.graphs import GraphPool
from nemodiff_compile.backends.eager import TorchDenoiser
from nemodiff_compile.decoding import loops

MAX_LEN = 96
PROMPTS = [[1, 40, 41, 42, 43, 44, 45], [1, 50, 51], [1, 60, 61, 62, 63, 64, 65, 66, 67, 68]]


class FakeGraphs(GraphPool):
    """Capture = remember the function; replay = call it. Counts like the CUDA pool."""

    def _side_stream(self):
        from contextlib import nullcontext
        return nullcontext()

    def _record(self, fn):
        class Replay:
            replay = staticmethod(fn)
        self.recorded = getattr(self, "recorded", 0) + 1
        return Replay()


@pytest.fixture(scope="module")
def trained():
    return load_reference("tiny")


@pytest.fixture(scope="module")
def with_lora(random_tiny):
    m = copy.deepcopy(random_tiny)
    cfg = m.config
    g = torch.Generator().manual_seed(1)
    a = [torch.randn(4, cfg.q_width, generator=g) * 0.05 for _ in range(cfg.num_hidden_layers)]
    b = [torch.randn(cfg.hidden_size, 4, generator=g) * 0.05 for _ in range(cfg.num_hidden_layers)]
    m.set_draft_lora(a, b, 2.0)
    return m


def _same(a: loops.Generation, b: loops.Generation):
    assert a.tokens == b.tokens
    assert a.finish == b.finish
    assert a.nfe_by_phase == b.nfe_by_phase
    assert a.row_nfe == b.row_nfe


def test_passes_match_reference_logits(random_tiny):
    ref = TorchDenoiser(random_tiny, MAX_LEN, return_logits=True)
    fast = FastDenoiser(random_tiny, MAX_LEN, return_logits=True)
    B = len(PROMPTS)
    n = torch.tensor([len(p) for p in PROMPTS])
    ids = torch.zeros(B, int(n.max()), dtype=torch.long)
    for b, p in enumerate(PROMPTS):
        ids[b, : len(p)] = torch.tensor(p)
    blk = torch.randint(0, 1000, (B, 8))
    for den in (ref, fast):
        den.reset(B)
    for kw, tokens in ((dict(causal=True, write=True, num_valid=n), ids),        # ragged prefill
                       (dict(causal=False, write=False), blk),                   # refinement
                       (dict(causal=True, write=True), blk),                     # commit
                       (dict(causal=False, write=False), blk.flip(1))):          # next block
        r, f = ref.step(tokens, **kw), fast.step(tokens, **kw)
        torch.testing.assert_close(f.logits, r.logits, rtol=1e-4, atol=1e-5)
        assert torch.equal(f.token, r.token)
        assert torch.equal(fast.lengths(), ref.lengths())


@pytest.mark.parametrize("mode,kw", [("ar", {}), ("dlm", dict(threshold=0.9)), ("dlm", dict(threshold=0.5)),
                                     ("dlm", dict(steps=4)), ("linear-spec", {})])
def test_trajectories_match_reference(trained, mode, kw):
    ref = loops.generate(TorchDenoiser(trained, MAX_LEN), PROMPTS, mode, max_new_tokens=40, **kw)
    fast = loops.generate(FastDenoiser(trained, MAX_LEN, graphs=FakeGraphs()), PROMPTS, mode,
                          max_new_tokens=40, **kw)
    _same(fast, ref)


def test_linear_spec_with_draft_lora(with_lora):
    ref = loops.generate(TorchDenoiser(with_lora, MAX_LEN), PROMPTS[:2], "linear-spec", max_new_tokens=24)
    fast = loops.generate(FastDenoiser(with_lora, MAX_LEN), PROMPTS[:2], "linear-spec", max_new_tokens=24)
    _same(fast, ref)


@pytest.mark.parametrize("kw", [dict(threshold=0.9), dict(threshold=0.0), dict(threshold=None, steps=5)])
@pytest.mark.parametrize("check_every", [1, 3])
def test_device_loop_equals_reference_loop(trained, kw, check_every):
    ref = loops.diffusion_generate(TorchDenoiser(trained, MAX_LEN), PROMPTS, max_new_tokens=48, **kw)
    den = FastDenoiser(trained, MAX_LEN, graphs=FakeGraphs())
    got = loops.diffusion_generate(den, PROMPTS, max_new_tokens=48, check_every=check_every, **kw)
    _same(got, ref)
    assert den.executed >= got.nfe                       # wasted passes are counted apart
    assert got.device_passes >= got.nfe_by_phase["denoise"] > 0 and got.nfe == ref.nfe


def test_the_loop_hands_only_untraced_blocks_to_the_refiner(trained):
    den = FastDenoiser(trained, MAX_LEN, graphs=FakeGraphs())
    device = loops.generate(den, PROMPTS[:1], "dlm", max_new_tokens=16)
    assert device.device_passes >= device.nfe_by_phase["denoise"] > 0
    for kw in (dict(trace=True), dict(device_refine=False)):
        g = loops.generate(den, PROMPTS[:1], "dlm", max_new_tokens=16, **kw)
        assert g.device_passes == 0 and g.tokens == device.tokens
    assert TorchDenoiser(trained, MAX_LEN).block_refiner(loops.DecodePolicy()) is None


@pytest.mark.parametrize("kw", [dict(threshold=0.5), dict(threshold=None, steps=4)])
def test_sampled_device_loop_equals_the_host_loop(trained, kw):
    """Temperature > 0 stays on the device loop (Gumbel noise drawn there, decoding/noise.py) and gives
    the host passes' tokens and NFE for the same seed; another seed gives other tokens."""
    pool = FakeGraphs()
    den = FastDenoiser(trained, MAX_LEN, graphs=pool)
    kw = dict(max_new_tokens=40, block_length=8, temperature=1.5, check_every=3, **kw)
    device = loops.diffusion_generate(den, PROMPTS, seed=11, **kw)
    assert device.device_passes >= device.nfe_by_phase["denoise"] > 0
    assert any(k[0] == "denoise" and k[-1] == 1.5 for k in pool.graphs)       # the sampled pass is captured
    host = loops.diffusion_generate(den, PROMPTS, seed=11, device_refine=False, **kw)
    assert host.device_passes == 0
    _same(device, host)
    ref = loops.diffusion_generate(TorchDenoiser(trained, MAX_LEN), PROMPTS, seed=11, **kw)
    _same(device, ref)                                               # the eager reference draws the same
    greedy = loops.diffusion_generate(den, PROMPTS, **{**kw, "temperature": 0.0})
    other = loops.diffusion_generate(den, PROMPTS, seed=12, **kw)
    assert device.tokens != greedy.tokens and device.tokens != other.tokens


def test_graph_bookkeeping(trained):
    pool = FakeGraphs()
    den = FastDenoiser(trained, MAX_LEN, graphs=pool)
    dlm = lambda prompts: loops.diffusion_generate(den, prompts, max_new_tokens=32)  # noqa: E731
    first = dlm(PROMPTS[:2])                                          # bucket 2
    keys = set(pool.graphs)
    assert pool.captures == len(keys) == pool.recorded
    assert {k[0] for k in keys} >= {"denoise", "step"}                # refinement; commit passes
    again = dlm(PROMPTS[:2])                                          # same bucket: replay only
    assert pool.captures == len(keys) and again.tokens == first.tokens
    dlm(PROMPTS[:1])                                                  # bucket 1: new buffers, recapture
    assert den.bucket == 1 and pool.captures > len(keys)
    dlm(PROMPTS)                                                      # 3 rows pad to bucket 4
    assert den.bucket == 4


def test_replayed_passes_match_reference_confidence_per_pass(trained):
    """Host dlm passes through the (fake) graph pool: per-pass candidates AND confidences equal the
    reference's, so a replay of the wrong graph (a commit pass replaying the bidirectional denoise
    capture of the same length) is caught even where the tiny model's tokens survive it."""
    pool = FakeGraphs()
    kw = dict(max_new_tokens=24, block_length=8, threshold=0.9, trace=True)
    ref = loops.diffusion_generate(TorchDenoiser(trained, MAX_LEN), PROMPTS, **kw)
    got = loops.diffusion_generate(FastDenoiser(trained, MAX_LEN, graphs=pool), PROMPTS, **kw)
    assert [r.phase for r in got.trace] == [r.phase for r in ref.trace]
    for r, g in zip(ref.trace, got.trace):
        assert torch.equal(g.out_token, r.out_token), r.phase
        torch.testing.assert_close(g.conf, r.conf, rtol=1e-4, atol=1e-5, msg=lambda m: f"{r.phase}: {m}")
    steps = {(k[2], k[3]) for k in pool.graphs if k[0] == "step"}
    assert {(8, True), (8, False)} <= steps                    # commit and denoise passes: two graphs


def test_capture_warmup_does_not_advance_state():
    pool = FakeGraphs(warmup=3)
    x = torch.zeros(2)
    pool.run("k", lambda: x.add_(1), state=(x,))
    assert x.tolist() == [1.0, 1.0]                                   # warm-ups undone, one replay
    pool.run("k", lambda: x.add_(1), state=(x,))
    assert x.tolist() == [2.0, 2.0] and pool.captures == 1 and pool.replays == 2


def test_buckets():
    b = BatchBuckets((8, 1, 4))
    assert [b.pick(n) for n in (1, 2, 4, 5, 8)] == [1, 4, 4, 8, 8]
    with pytest.raises(InvalidArgument, match="largest batch bucket 8"):
        b.pick(9)


@pytest.mark.parametrize("mode", ["row", "tensor", "static"])
def test_fp8_layout_tracks_fp32(random_tiny, mode):
    """FP8 weights and dynamic activations (the CPU emulation of the _scaled_mm paths)."""
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    lengths, nv = torch.zeros(2, dtype=torch.long), torch.full((2,), 16)
    cfg = random_tiny.config
    shape = (cfg.num_hidden_layers, 2, cfg.num_key_value_heads, 32, cfg.head_dim)
    out = {}
    for fp8 in (None, mode):
        fm = FastModel(random_tiny, fp8=fp8)
        run = lambda: fm.forward(ids, lengths, nv, causal=True, cache_k=torch.zeros(shape),  # noqa: E731
                                 cache_v=torch.zeros(shape))
        if fp8 == "static":
            with fm.calibrating():
                run()
        out[fp8] = run()
    cos = torch.nn.functional.cosine_similarity(out[mode].flatten(1), out[None].flatten(1)).min()
    print(f"fp8 {mode}: min logit cosine vs fp32 {float(cos):.4f}")
    assert 0.98 < cos < 1.0            # static per-tensor scales are the coarsest of the three
    fm = FastModel(random_tiny, fp8=mode)
    assert fm.layers[0].qkv.weight.dtype == torch.float8_e4m3fn
    assert fm.weight_bytes < FastModel(random_tiny).weight_bytes / 2


def test_static_fp8_needs_and_uses_calibration(random_tiny, trained):
    den = FastDenoiser(trained, MAX_LEN, fp8="static", graphs=FakeGraphs())
    with pytest.raises(RuntimeError, match="not calibrated"):
        loops.generate(den, PROMPTS[:1], "dlm", max_new_tokens=8)
    den.calibrate(PROMPTS, max_new_tokens=16)
    lins = den.fast.linears()
    assert all(lin.x_scale is not None and float(lin.x_scale) > 0 and lin.amax is None for lin in lins)
    assert lins[0].in_scale is not None                              # producers now emit FP8 inputs
    ref = loops.generate(TorchDenoiser(trained, MAX_LEN), PROMPTS, "dlm", max_new_tokens=32)
    got = loops.generate(den, PROMPTS, "dlm", max_new_tokens=32, device_refine=False)   # host passes
    agree = sum(a == b for r, g in zip(ref.tokens, got.tokens) for a, b in zip(r, g))
    assert agree / sum(len(r) for r in ref.tokens) > 0.8
    dev = loops.generate(den, PROMPTS, "dlm", max_new_tokens=32)     # the device loop, same numbers
    assert dev.tokens == got.tokens
    with pytest.raises(InvalidArgument, match="static FP8"):
        FastDenoiser(trained, MAX_LEN).calibrate(PROMPTS)


def test_session_from_model_uses_the_device_loop(trained):
    from nemodiff_compile.session import Session

    with Session.from_model("tiny", max_len=MAX_LEN) as s:
        assert isinstance(s.denoiser, FastDenoiser) and s.tokenizer is not None
        res = s.generate("What is 3 + 4?", mode="dlm", max_new_tokens=32)
        assert s.denoiser.executed >= res.generation.nfe > 0
        assert res.generation.device_passes >= res.generation.nfe_by_phase["denoise"] > 0   # the device refiner ran
        ref = loops.diffusion_generate(TorchDenoiser(trained, MAX_LEN), [s.encode("What is 3 + 4?")],
                                       max_new_tokens=32, threshold=0.9)
        assert res.completions[0].tokens == ref.tokens[0] and res.text
        steps = s.generate("Count from 5:", mode="dlm", max_new_tokens=16, steps=4, threshold=None)
        assert steps.generation.nfe_by_phase["denoise"] <= 4 * 1          # one block of 16, 4 passes
        streamed = "".join(s.stream("Once upon a time", mode="dlm", max_new_tokens=16))
        assert streamed == s.generate("Once upon a time", mode="dlm", max_new_tokens=16).text
    with pytest.raises(InvalidArgument, match="calibration"):
        Session.from_model("tiny", fp8="static", max_len=MAX_LEN)


def test_scheduler_refines_sampled_rows_on_the_device(trained):
    """Sampled dlm rows of different seeds share device refinements in the scheduler (each row's own noise
    stream, advanced by the passes it took part in) and each gets its solo run's tokens and NFE."""
    from nemodiff_compile.decoding.policy import DecodePolicy
    from nemodiff_compile.decoding.scheduler import Scheduler

    den = FastDenoiser(trained, MAX_LEN, graphs=FakeGraphs())
    policies = [DecodePolicy("dlm", temperature=1.0, seed=s, block_length=8, threshold=0.5) for s in (1, 2, 3)]
    solo = [loops.generate(den, [p], pol, max_new_tokens=24) for p, pol in zip(PROMPTS, policies)]
    assert all(g.device_passes > 0 for g in solo)
    s = Scheduler(den, max_batch=4)
    try:
        got = [r.result(120) for r in [s.submit(p, pol, 24) for p, pol in zip(PROMPTS, policies)]]
    finally:
        s.close()
    for want, g in zip(solo, got):
        assert g.tokens == want.tokens and g.nfe_by_phase == want.nfe_by_phase and g.row_nfe == want.row_nfe
        assert g.device_passes > 0
    assert s.passes < sum(g.nfe for g in solo)                     # the rows shared passes
