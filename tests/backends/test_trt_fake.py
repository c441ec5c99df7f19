"""backends/trt.py driven on the CPU against a fake TensorRT that enforces the documented rules and computes
each pass with ONNX Runtime over the pointers the runtime bound (fake_trt.py): tokens equal the reference's,
the compiled refinement loop included, with one context per captured pass on shared user-managed memory;
the fixes of the desk check each meet the rule they follow."""

import warnings

import pytest
import torch

pytest.importorskip("onnxruntime")

from fake_trt import FakeGraphPool, FakeTensorRT, FakeTrtError, make_plan  # noqa: E402

from nemodiff_compile.artifact.manifest import read_manifest  # noqa: E402
from nemodiff_compile.artifact.profiles import make_profiles  # noqa: E402
from nemodiff_compile.artifact.targets import DeviceInfo  # noqa: E402
from nemodiff_compile.backends.eager import TorchDenoiser  # noqa: E402
from nemodiff_compile.backends.trt import TrtDenoiser  # noqa: E402
from nemodiff_compile.backends.trt_shim import Trt  # noqa: E402
from nemodiff_compile.decoding import loops  # noqa: E402
from nemodiff_compile.decoding.policy import DecodePolicy  # noqa: E402
from nemodiff_compile.errors import NemodiffError  # noqa: E402

GPU = DeviceInfo("NVIDIA L40S", (8, 9), "580.65")
PROMPTS = [[1, 40, 41, 42, 43, 44, 45], [1, 50, 51], [1] + list(range(60, 80))]      # 7, 3 and 21 tokens


def fake_engine(ort_dir, tmp_path, **plan_kw):
    """(engine dir, manifest, fake) for a 'TensorRT' directory whose plan is the ORT engine's graph."""
    m = read_manifest(ort_dir)
    profiles = make_profiles(m.io_spec, m.buckets)
    (tmp_path / "engine.sm89.plan").write_bytes(make_plan(ort_dir / "model.onnx", m.io_spec, profiles, **plan_kw))
    m.backend = "tensorrt"
    m.engines = [{"target": "sm89", "file": "engine.sm89.plan", "trt_module": "tensorrt", "trt_version": "10.13.0",
                  "gpu_name": GPU.name, "plugins": [], "profiles": [p.to_json() for p in profiles],
                  "version_compatible": plan_kw.get("version_compatible", False)}]
    return tmp_path, m, FakeTensorRT()


def open_fake(ort_dir, tmp_path, graphs=True, **plan_kw):
    d, m, fake = fake_engine(ort_dir, tmp_path, **plan_kw)
    from nemodiff_compile.config import ModelConfig

    cfg = ModelConfig.from_hf(m.model_config)
    den = TrtDenoiser(d, m, cfg, trt=Trt(fake, "tensorrt", "10.13.0"), gpu=GPU, device="cpu",
                      graphs=FakeGraphPool(fake, enabled=graphs), stream=object())
    den.graph_max_tokens = 16              # blocks are captured, the 21-token prefill is not
    return den, fake


@pytest.fixture(scope="module")
def reference():
    from nemodiff_compile import load_reference

    return TorchDenoiser(load_reference("tiny", dtype="float32"), 128)


def test_tensorrt_runtime_gives_the_reference_tokens(remask_engine, reference, tmp_path):
    den, fake = open_fake(remask_engine("onnx"), tmp_path)
    runs = [(DecodePolicy("ar"), PROMPTS[:1]), (DecodePolicy("dlm", steps=4), PROMPTS),
            (DecodePolicy("dlm"), PROMPTS[:1]), (DecodePolicy("dlm"), PROMPTS)]   # bucket 1, 3 rows in bucket 4
    for policy, prompts in runs:                                    # the last one is checked below
        want = loops.generate(reference, prompts, policy, max_new_tokens=32)
        got = loops.generate(den, prompts, policy, max_new_tokens=32)
        assert got.tokens == want.tokens and got.nfe_by_phase == want.nfe_by_phase, (policy, len(prompts))
        assert (got.device_passes > 0) == (policy.mode == "dlm")       # dlm blocks ran the plan's loop
    keys = [k for k in den._bound]
    assert {k[0] for k in keys} == {"step", "stage"} and {k[3] for k in keys if k[0] == "stage"} == {0, 1}
    contexts = [b.context for b in den._bound.values()]
    assert len({id(c) for c in contexts}) == len(contexts)                     # one context per captured pass
    assert set(den.graphs.graphs) == set(keys) and den.graphs.replays > den.graphs.captures   # a graph per context
    (engine,) = fake.engines
    memory = {c.memory for c in engine.contexts}
    assert len(memory) == 1 and memory.pop()[1] == engine.device_memory_size_v2     # one shared buffer [1, 5]
    assert all(c.strategy == FakeTensorRT.ExecutionContextAllocationStrategy.USER_MANAGED for c in engine.contexts)
    assert all(c.nvtx_verbosity == FakeTensorRT.ProfilingVerbosity.LAYER_NAMES_ONLY for c in engine.contexts)
    eager = [c for c in engine.contexts if not c.captured]
    assert eager and all(c.executions > 0 for c in eager)         # long prefills: uncaptured, shapes may change


def test_the_fake_refuses_what_tensorrt_leaves_undefined(remask_engine, tmp_path):
    """The rules themselves: the old runtime (one context per profile, shapes changed between captures)
    fails here; a version-compatible plan needs the host-code flag; unset memory or shapes fail enqueue."""
    from fake_trt import FakeGraph

    d, m, fake = fake_engine(remask_engine("onnx"), tmp_path, version_compatible=True)
    rt = fake.Runtime(None)
    data = (d / "engine.sm89.plan").read_bytes()
    assert rt.deserialize_cuda_engine(data) is None
    rt.engine_host_code_allowed = True
    engine = rt.deserialize_cuda_engine(data)
    ctx = engine.create_execution_context(FakeTensorRT.ExecutionContextAllocationStrategy.USER_MANAGED)
    assert ctx.set_optimization_profile_async(0, 0) and not ctx.set_optimization_profile_async(9, 0)
    assert not ctx.set_input_shape("input_ids", (1, 500)) and not ctx.set_input_shape("nope", (1,))
    assert not ctx.set_tensor_address("nope", 0)
    assert not ctx.execute_async_v3(0)                                            # nothing bound, no memory
    assert ctx.set_input_shape("input_ids", (1, 16))
    graph = FakeGraph([(ctx, ctx.snapshot())])                                    # as if captured here
    assert ctx.set_input_shape("input_ids", (1, 1))                               # the old runtime did this
    with pytest.raises(FakeTrtError, match="replayed after its context's shapes or addresses changed"):
        graph.replay()
    ctx.captured = True
    with pytest.raises(FakeTrtError, match="one execution context per captured graph"):
        ctx.set_input_shape("input_ids", (1, 16))


def test_version_compatible_plans_deserialize(remask_engine, tmp_path):
    den, fake = open_fake(remask_engine("onnx"), tmp_path, version_compatible=True)
    assert fake.runtimes[0].engine_host_code_allowed
    den.reset(1)
    den.step(torch.tensor([[1, 40, 41]]), causal=True, write=True)
    assert den.lengths().tolist() == [3]


def test_the_builders_inspector_reads_version_compatible_plans(remask_engine, tmp_path):
    from nemodiff_compile.trt.builder import _inspect

    d, m, fake = fake_engine(remask_engine("onnx"), tmp_path, version_compatible=True, inspector={"Layers": [
        {"Name": "gemm_0", "LayerType": "CaskGemmMatrixMultiply",
         "Inputs": [{"Name": "a", "Format/Datatype": "Row major linear FP32"}, {"Name": "b", "Format/Datatype": "Float"}]}]})
    trt = Trt(fake, "tensorrt", "10.13.0")
    plan = (d / "engine.sm89.plan").read_bytes()
    assert _inspect(trt, plan, "fp32", None) is None                      # without the flag: no engine [3]
    rep = _inspect(trt, plan, "fp32", None, version_compatible=True)
    assert rep is not None and rep.source == "engine_inspector" and rep.passed and rep.gemms == 1


def test_refused_calls_are_one_line_errors(remask_engine, tmp_path, monkeypatch):
    from fake_trt import FakeContext

    den, fake = open_fake(remask_engine("onnx"), tmp_path)
    den.reset(1)
    monkeypatch.setattr(FakeContext, "set_tensor_address", lambda self, name, ptr: name != "past_keys")
    with pytest.raises(NemodiffError, match="TensorRT refused the address of past_keys"):
        den.step(torch.tensor([[1, 40, 41]]), causal=True, write=True)
    monkeypatch.undo()
    monkeypatch.setattr(FakeContext, "execute_async_v3", lambda self, stream: False)
    den2, _ = open_fake(remask_engine("onnx"), tmp_path)
    den2.reset(1)
    with pytest.raises(NemodiffError, match=r"execute_async_v3 failed for pass \('step', 1, 3\)"):
        den2.step(torch.tensor([[1, 40, 41]]), causal=True, write=True)


def test_contexts_that_cannot_be_captured_run_eagerly(remask_engine, reference, tmp_path):
    """tensorrt_rtx plans without kREQUIRE_USER_ALLOCATION are not stream capturable [7]: no graph is captured
    from them, and the passes still compute the reference's tokens."""
    den, fake = open_fake(remask_engine("onnx"), tmp_path, capturable=False)
    got = loops.generate(den, PROMPTS[:1], "dlm", max_new_tokens=16)
    assert got.tokens == loops.generate(reference, PROMPTS[:1], "dlm", max_new_tokens=16).tokens
    assert den.graphs.captures == 0 and got.device_passes > 0


def test_a_plan_from_another_gpu_model_runs_with_a_warning(remask_engine, tmp_path):
    from nemodiff_compile.backends.trt import select_plan

    d, m, fake = fake_engine(remask_engine("onnx"), tmp_path)
    m.engines[0]["gpu_name"] = "NVIDIA L4"                             # same sm89, another model [10]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert select_plan(d, m, device=GPU, trt=Trt(fake, "tensorrt", "10.13.0"))["target"] == "sm89"
    assert any("built on a NVIDIA L4, this is a NVIDIA L40S" in str(x.message) for x in w)


def test_commit_and_denoise_rows_share_a_plan_pass(tiny_engine, tmp_path):
    """Plans take `causal` per row: the scheduler runs a row's commit in the same pass as other rows' denoise
    passes (the whole bucket, idle and padding rows bidirectional), and every row gets its solo tokens."""
    from nemodiff_compile.decoding.scheduler import Scheduler

    den, _ = open_fake(tiny_engine, tmp_path)
    assert den.row_causal
    pols = [DecodePolicy("dlm", threshold=t) for t in (0.9, 0.5, 0.3)]
    want = [loops.generate(den, [p], pol, max_new_tokens=24) for p, pol in zip(PROMPTS, pols)]
    s = Scheduler(den, max_batch=4)
    try:
        with s.exclusive():                      # all three queued before the first pass
            reqs = [s.submit(p, pol, 24) for p, pol in zip(PROMPTS, pols)]
        got = [r.result(120) for r in reqs]
    finally:
        s.close()
    assert [g.tokens for g in got] == [w.tokens for w in want]
    phases: dict[int, set[str]] = {}
    for r in reqs:
        for index, phase in r.passes:
            phases.setdefault(index, set()).add(phase)
    assert any({"commit", "denoise"} <= p for p in phases.values())
