"""The compiled refinement loop on ONNX Runtime's CPU provider: engines built with `--remask onnx` and
`--remask plugin` (the nemodiff::Remask node as an onnxruntime-extensions Python op) run greedy dlm blocks
through their remask stage and give the reference's tokens and NFE, threshold and fixed-steps policies,
batch 1 and 4 with ragged prompts; the host reads only the done flag inside a block."""

import pytest
import torch

from nemodiff_compile.backends.eager import TorchDenoiser
from nemodiff_compile.backends.open import open_engine
from nemodiff_compile.decoding import loops
from nemodiff_compile.decoding.policy import DecodePolicy

PROMPTS = {"b1": [[1, 40, 41, 42, 43]],
           "b4-ragged": [[1, 40, 41, 42, 43, 44, 45], [1, 50, 51], [1, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69],
                         [1, 7, 8, 9, 10]]}
POLICIES = {"threshold": DecodePolicy("dlm", threshold=0.9), "topk": DecodePolicy("dlm", steps=4)}


@pytest.fixture(scope="module")
def reference():
    from nemodiff_compile import load_reference

    return TorchDenoiser(load_reference("tiny", dtype="float32"), 128)


_WANT: dict = {}


def reference_run(reference, prompts: str, policy: str):
    """The reference's generation, once per (prompts, policy) for every variant."""
    if (prompts, policy) not in _WANT:
        _WANT[(prompts, policy)] = loops.generate(reference, PROMPTS[prompts], POLICIES[policy], max_new_tokens=32)
    return _WANT[(prompts, policy)]


@pytest.fixture(scope="module")
def engines(remask_engine):
    cache = {}

    def get(variant):
        if variant not in cache:
            cache[variant] = open_engine(remask_engine(variant), threads=1).denoiser
        return cache[variant]

    return get


@pytest.mark.parametrize("prompts", PROMPTS)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("variant", ["onnx", "plugin"])
def test_device_loop_gives_the_reference_tokens(engines, reference, variant, policy, prompts):
    den, pol = engines(variant), POLICIES[policy]
    assert den.block_refiner(pol) is not None
    want = reference_run(reference, prompts, policy)
    got = loops.generate(den, PROMPTS[prompts], pol, max_new_tokens=32)
    assert got.tokens == want.tokens and got.finish == want.finish
    assert got.nfe_by_phase == want.nfe_by_phase and got.row_nfe == want.row_nfe
    assert got.device_passes >= got.nfe_by_phase["denoise"] > 0          # the blocks ran in the graph
    assert any(len(t) > 1 for t in got.tokens)


def test_a_threshold_the_graph_was_not_built_for_runs_on_the_host(engines, reference):
    """The graph bakes its threshold (0.9): other thresholds, and sampling, fall back to the host passes
    (same tokens as the reference); every fixed-steps policy runs in the graph."""
    den = engines("onnx")
    for pol in (DecodePolicy("dlm", threshold=0.5), DecodePolicy("dlm", temperature=1.0),
                DecodePolicy("ar"), DecodePolicy("linear-spec")):
        assert den.block_refiner(pol) is None
    assert den.block_refiner(DecodePolicy("dlm", steps=7)) is not None
    pol = DecodePolicy("dlm", threshold=0.5)
    got = loops.generate(den, PROMPTS["b1"], pol, max_new_tokens=16)
    assert got.device_passes == 0
    assert got.tokens == loops.generate(reference, PROMPTS["b1"], pol, max_new_tokens=16).tokens


class _Reads(torch.overrides.TorchFunctionMode):
    """Records every torch call touching one of `watched` (name -> tensor storage), with the number of
    session runs so far: reads between passes show up as calls on output buffers."""

    def __init__(self, watched: dict, runs: list):
        super().__init__()
        self.ptrs = {t.untyped_storage().data_ptr(): name for name, t in watched.items()}
        self.runs, self.log = runs, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        for a in args:
            if isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() in self.ptrs:
                self.log.append((self.runs[0], getattr(func, "__name__", str(func)),
                                 self.ptrs[a.untyped_storage().data_ptr()]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("check_every", [1, 3])
def test_inside_a_block_the_host_reads_only_the_done_flag(engines, check_every):
    """Count the host's reads of the loop's device buffers between its passes: the done flag after every
    check_every-th pass, the final canvas and row counts once, nothing else."""
    den = engines("onnx")
    pol = DecodePolicy("dlm", threshold=0.9, check_every=check_every).resolve(den.config)
    prompt = PROMPTS["b4-ragged"]
    den.reset(len(prompt))
    den.step(torch.tensor([p[:3] for p in prompt]), causal=True, write=True)
    refiner = den.block_refiner(pol)
    bufs = den.stage_buffers(16)
    runs = [0]
    session = den.session
    real_run = session.run_with_iobinding

    class Counting:
        def __getattr__(self, name):
            return getattr(session, name)

        def run_with_iobinding(self, *a):
            runs[0] += 1
            return real_run(*a)

    watched = {"done": bufs.done, "canvas0": bufs.state(0)[0], "canvas1": bufs.state(1)[0],
               "row_nfe0": bufs.state(0)[1], "row_nfe1": bufs.state(1)[1], "token": bufs.outputs[0]["token"],
               "confidence": bufs.outputs[0]["confidence"], "commit": bufs.outputs[0]["commit"]}
    canvas = torch.full((4, 16), den.config.mask_token_id)
    canvas[:, 0] = 5
    den.session = Counting()
    reads_before = refiner.host_reads
    try:
        with _Reads(watched, runs) as mode:
            out = refiner.refine(canvas, torch.tensor([True, True, False, True]), None, pol)
    finally:
        den.session = session
    assert runs[0] == out.executed and out.executed >= out.nfe > 0
    during = [(r, f, n) for r, f, n in mode.log if 0 < r < out.executed]
    assert during and all(n == "done" for _, _, n in during)                   # only the flag inside the block
    assert sorted({r for r, _, _ in during}) == list(range(check_every, out.executed, check_every))
    last = [n for r, _, n in mode.log if r == out.executed]
    assert sorted(set(last) - {"done"}) == sorted({f"canvas{out.executed % 2}", f"row_nfe{out.executed % 2}"})
    done_reads = {r for r, _, n in mode.log if n == "done" and r > 0}
    assert refiner.host_reads - reads_before == 2 + len(done_reads)              # + final canvas and row_nfe
    assert out.row_nfe[2] == 0 and out.canvas[2].eq(den.config.mask_token_id).sum() == 15   # inactive row untouched


def test_cuda_graph_bookkeeping_on_the_cpu(engines, reference):
    """The CUDA provider's contract, driven on the CPU provider: each (bucket, block, parity) runs with its
    own gpu_graph_id and always the same binding (so ORT may capture it once and replay it), runs are not
    synchronized with the host, and `step` passes are never captured (gpu_graph_id -1)."""
    from nemodiff_compile.backends.ort_stage import GRAPH_ID_KEY, NO_SYNC_KEY, OrtStage

    den = engines("onnx")
    saved, session = den._stage, den.session
    den._stage = OrtStage(den, cuda_graphs=True)
    runs = []

    class Recording:
        def __getattr__(self, name):
            return getattr(session, name)

        def io_binding(self):
            return session.io_binding()

        def run_with_iobinding(self, io, options=None):
            runs.append((io, entry(options, GRAPH_ID_KEY), entry(options, NO_SYNC_KEY)))
            return session.run_with_iobinding(io, options)

    def entry(options, key):
        try:
            return options.get_run_config_entry(key)
        except (AttributeError, RuntimeError):          # no options, or the key unset
            return None

    den.session = Recording()
    try:
        for _ in range(2):                                                  # the same 4 rows twice
            got = loops.generate(den, PROMPTS["b4-ragged"], POLICIES["threshold"], max_new_tokens=32)
            assert got.tokens == reference_run(reference, "b4-ragged", "threshold").tokens
    finally:
        den._stage, den.session = saved, session
    loop = [(io, gid, sync) for io, gid, sync in runs if gid != "-1"]
    steps = [r for r in runs if r[1] == "-1"]
    assert steps and all(io is den.io for io, _, _ in steps)
    by_id = {}
    for io, gid, sync in loop:
        assert sync == "1" and by_id.setdefault(gid, io) is io          # one binding per graph id, reused
    assert len(by_id) == 2 and len(loop) > 4                            # (4 rows, block 16) x 2 parities
