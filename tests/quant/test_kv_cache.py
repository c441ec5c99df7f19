"""FP8 KV cache (quant/kv_cache.py): the graph pass on a float step graph (exact against the float
graph fed the dequantized cache), and one quantized build with `--kv-cache fp8` for the module: FP8
cache I/O with per-layer DQ/Q of the calibrated scales, manifest and inspect, the engine's 1-byte
cache, validate's gates; bad --kv-cache values are one-line errors."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from nemodiff_compile import TINY_ASSET  # noqa: E402
from nemodiff_compile.artifact.manifest import read_manifest  # noqa: E402
from nemodiff_compile.cli import cli  # noqa: E402
from nemodiff_compile.errors import NemodiffError  # noqa: E402
from nemodiff_compile.artifact.spec import IOSpec  # noqa: E402
from nemodiff_compile.quant.kv_cache import FP8_DTYPE, fp8_cache_graph, fp8_spec  # noqa: E402
from nemodiff_compile.backends.ort import OrtDenoiser  # noqa: E402

TRAINED = (TINY_ASSET / "config.json").is_file()
CACHE = ("past_keys", "past_values")
NEW = ("new_keys", "new_values")
PRECISION = "fp8"                 # the module's build: fp8 weights and activations + the FP8 cache


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _q(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [layers, ...] -> FP8 codes with per-layer scales, as QuantizeLinear (round to nearest even, saturate)."""
    s = scale.reshape(-1, *([1] * (x.dim() - 1)))
    return (x.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn)


def _dq(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.float() * scale.reshape(-1, *([1] * (x.dim() - 1)))


def _graph_io(path):
    m = onnx.load(str(path), load_external_data=False)
    types = {v.name: onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type)
             for v in (*m.graph.input, *m.graph.output)}
    return m, types


# ---- the graph pass on the float tiny graph (no calibration) ----------------------------------------

@pytest.fixture(scope="module")
def float_and_fp8(tiny_engine, tmp_path_factory):
    """(float graph, fp8-cache copy of it, spec, per-layer K and V scales)."""
    src = tiny_engine / "model.onnx"
    out = tmp_path_factory.mktemp("kv-pass")
    shutil.copyfile(src, out / "model.onnx")
    shutil.copyfile(tiny_engine / "model.onnx.data", out / "model.onnx.data")
    spec = IOSpec.from_json(read_manifest(tiny_engine).io_spec)
    n = spec.input("past_keys").shape[0]
    # distinct per layer, so a scale on the wrong layer/axis shows; sized near the tiny model's amax
    k = torch.tensor([0.02 + 0.004 * i for i in range(n)])
    v = torch.tensor([0.015 + 0.003 * i for i in range(n)])
    summary = fp8_cache_graph(out / "model.onnx", k.tolist(), v.tolist())
    assert summary == {"QuantizeLinear": 2, "DequantizeLinear": 2}
    return src, out / "model.onnx", spec, k, v


def test_graph_pass_io_and_nodes(float_and_fp8):
    src, path, spec, k, v = float_and_fp8
    onnx.checker.check_model(str(path), full_check=True)
    m, types = _graph_io(path)
    assert all(types[n] == "FLOAT8E4M3FN" for n in (*CACHE, *NEW))
    assert types["logits"] == "FLOAT" and types["token"] == "INT64"
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer if not t.external_data}
    dq = {n.input[0]: n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in CACHE}
    qn = {n.output[0]: n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.output[0] in NEW}
    assert set(dq) == set(CACHE) and set(qn) == set(NEW)
    for past, new, scale in (("past_keys", "new_keys", k), ("past_values", "new_values", v)):
        for node in (dq[past], qn[new]):
            assert {a.name: a.i for a in node.attribute}.items() >= {"axis": 0}.items()
            assert torch.allclose(torch.from_numpy(inits[node.input[1]].copy()), scale)
        assert dq[past].input[1] == qn[new].input[1]                     # one scale per layer for K, one for V
        # the raw cache input feeds only its DQ
        assert [n.op_type for n in m.graph.node if past in n.input] == ["DequantizeLinear"]
    # weights untouched: still external, in the same file
    assert any(t.external_data for t in m.graph.initializer)
    with pytest.raises(NemodiffError, match="already FLOAT8E4M3FN"):
        fp8_cache_graph(path, k.tolist(), v.tolist())


def test_graph_pass_computes_the_float_graph_on_the_dequantized_cache(float_and_fp8, tiny_cfg):
    """Prefill in both graphs: the FP8 graph's cached block is exactly Q(the float graph's K/V). Then a
    bidirectional pass of the float graph over DQ(that cache) gives the FP8 graph's logits."""
    src, path, spec, ks, vs = float_and_fp8
    flt = OrtDenoiser(src, spec, tiny_cfg, 32, return_logits=True, fuse=False)
    f8 = OrtDenoiser(path, fp8_spec(spec), tiny_cfg, 32, return_logits=True, fuse=False)
    prompt = torch.tensor([[1, 60, 61, 62, 63, 64, 65, 66], [1, 70, 71, 72, 73, 0, 0, 0]])
    nv = torch.tensor([8, 5])
    outs = []
    for den in (flt, f8):
        den.reset(2)
        outs.append(den.step(prompt, causal=True, write=True, num_valid=nv))
    assert f8.k.dtype == torch.float8_e4m3fn and f8.k.element_size() == 1
    assert torch.equal(outs[0].token, outs[1].token) and torch.allclose(outs[0].logits, outs[1].logits)
    for cached, ref, s in ((f8.k, flt.k, ks), (f8.v, flt.v, vs)):
        assert torch.equal(cached[..., :8, :].view(torch.uint8), _q(ref[..., :8, :], s).view(torch.uint8))
    flt.k, flt.v = _dq(f8.k, ks), _dq(f8.v, vs)               # the float graph reads the same cache
    block = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    a = flt.step(block, causal=False, write=False)
    b = f8.step(block, causal=False, write=False)
    assert torch.equal(a.token, b.token)
    assert (a.logits - b.logits).abs().max() < 1e-4
    # and it is not the float cache's result
    flt.reset(2)
    flt.step(prompt, causal=True, write=True, num_valid=nv)
    c = flt.step(block, causal=False, write=False)
    assert (c.logits - b.logits).abs().max() > 1e-3


def test_fp8_spec_changes_only_the_cache(tiny_cfg):
    from nemodiff_compile.artifact.spec import step_spec

    spec = step_spec(tiny_cfg, "float32", with_logits=True)
    got = fp8_spec(spec)
    for a, b in zip((*spec.inputs, *spec.outputs), (*got.inputs, *got.outputs)):
        assert a.name == b.name and a.shape == b.shape
        assert b.dtype == (FP8_DTYPE if a.name in CACHE + NEW else a.dtype)
    assert IOSpec.from_json(json.loads(json.dumps(got.to_json()))) == got


# ---- one quantized build with --kv-cache fp8 -----------------------------------------------------------

@pytest.fixture(scope="module")
def kv_engine(tmp_path_factory):
    """fp8 + FP8 KV cache through the CLI (validated below, once)."""
    pytest.importorskip("modelopt")
    if not TRAINED:
        pytest.skip("needs the trained tiny checkpoint")
    out = tmp_path_factory.mktemp("kvfp8") / f"tiny-{PRECISION}-kvfp8"
    r = run("build", "--precision", PRECISION, "--kv-cache", "fp8", "--with-logits", "--no-validate",
            "--backend", "onnxruntime", "--output", out)
    assert r.exit_code == 0, r.output
    return out


def test_build_graph_has_fp8_cache_with_the_calibrated_scales(kv_engine, quantized_linears):
    m, types = _graph_io(kv_engine / "model.onnx")
    assert all(types[n] == "FLOAT8E4M3FN" for n in (*CACHE, *NEW))
    man = read_manifest(kv_engine, deep=True)
    kv = man.quantization["kv_cache"]
    assert man.quantization["recipe"]["kv_cache_dtype"] == "fp8" and kv["dtype"] == "FLOAT8E4M3FN"
    n = man.model_config["num_hidden_layers"]
    assert len(kv["k_scale"]) == len(kv["v_scale"]) == n and kv["positions"] > 0
    for amax, scale in ((kv["k_amax"], kv["k_scale"]), (kv["v_amax"], kv["v_scale"])):
        assert all(a > 0 and abs(s - a / 448) < 1e-9 for a, s in zip(amax, scale))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer if not t.external_data}
    for past, new, want in (("past_keys", "new_keys", kv["k_scale"]), ("past_values", "new_values", kv["v_scale"])):
        dq = next(x for x in m.graph.node if x.op_type == "DequantizeLinear" and x.input[0] == past)
        qn = next(x for x in m.graph.node if x.op_type == "QuantizeLinear" and x.output[0] == new)
        assert dq.input[1] == qn.input[1]
        assert torch.allclose(torch.from_numpy(inits[dq.input[1]].copy()), torch.tensor(want))
    # the I/O spec the engines bind from says so too
    dtypes = {t["name"]: t["dtype"] for t in (*man.io_spec["inputs"], *man.io_spec["outputs"])}
    assert all(dtypes[n] == FP8_DTYPE for n in (*CACHE, *NEW)) and dtypes["logits"] == "float32"
    # the weight Q/DQ are the recipe's as usual
    assert man.quantization["graph"]["qdq_nodes"]["QuantizeLinear"] == quantized_linears(PRECISION)
    assert kv["qdq_nodes"] == {"QuantizeLinear": 2, "DequantizeLinear": 2}


def test_engine_cache_is_one_byte_per_element(kv_engine, tiny_cfg):
    man = read_manifest(kv_engine)
    den = OrtDenoiser(kv_engine / "model.onnx", IOSpec.from_json(man.io_spec), tiny_cfg, 64)
    den.reset(2)
    c = tiny_cfg
    elems = c.num_hidden_layers * 2 * c.num_key_value_heads * 64 * c.head_dim
    for t in (den.k, den.v):
        assert t.dtype == torch.float8_e4m3fn and t.numel() == elems and t.numel() * t.element_size() == elems
    out = den.step(torch.tensor([[1, 40, 41, 42], [1, 50, 51, 52]]), causal=True, write=True)
    assert out.token.shape == (2, 4) and torch.isfinite(out.conf).all()
    assert den.k[..., :4, :].float().abs().sum() > 0 and not den.k[..., 4:, :].float().any()
    assert torch.isfinite(den.k.float()).all() and torch.isfinite(den.v.float()).all()


def test_generation_tracks_the_reference(kv_engine):
    """4 prompts x 32 tokens in all three modes against the fp32 reference, judged by the fp8 recipe's
    bounds (unchanged for the FP8 cache). Measured on the tiny model: the teacher-forced token and
    commit-set agreement and the tokens-per-forward bounds hold; the min per-pass logit cosine drops
    from 0.983 (float cache) to 0.965 on the longest-context passes and dlm's trajectory agreement to
    its floor (README), so "model" stays the recipes' default. With fp8's decoder layer 0 kept in float
    (the recipe's default since) the lowest single position, a linear-spec verify pass, measured 0.958
    while the 5th percentile stayed 0.999: the bound below is on that one position."""
    from nemodiff_compile.validate.engine import validate_engine

    man = read_manifest(kv_engine)
    tol = man.quantization["thresholds"]
    report = validate_engine(kv_engine, write=False)
    print(report.to_table())
    assert report.modes and set(report.modes) == {"ar", "dlm", "linear-spec"}
    for name, mode in report.modes.items():
        assert mode.forced_token_agreement >= tol["forced_token_agreement"], (name, report.to_table())
        assert mode.commit_agreement is None or mode.commit_agreement >= tol["commit_agreement"], name
        assert mode.tpf_drop <= tol["tpf_drop_max"], (name, report.to_table())
        assert mode.token_agreement >= tol["mean_token_agreement"], (name, report.to_table())
        assert mode.worst()["logits_cosine_min"] >= 0.95, (name, report.to_table())     # measured 0.958
    off = [f for f in report.failures if "out of tolerance" not in f]
    assert not off, off                    # what may fail is a per-pass bound only


def test_fp8_cache_graph_builds_a_tensorrt_plan(kv_engine, tmp_path):
    """TensorRT (tensorrt_rtx here) parses the FP8 cache inputs/outputs and their DQ/Q and builds sm89."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is not installed")
    from nemodiff_compile.trt.builder import BuildOptions, build_plan

    m = read_manifest(kv_engine)
    plan, info = build_plan(kv_engine / "model.onnx", io_spec=m.io_spec, buckets=m.buckets, precision=PRECISION,
                            target="sm89", options=BuildOptions(timing_cache_dir=tmp_path))
    assert len(plan) > 0 and info.precision_check["passed"]


def test_inspect_shows_the_kv_cache(kv_engine):
    r = run("inspect", kv_engine)
    assert r.exit_code == 0, r.output
    assert "KV cache fp8" in r.output
    assert "kv cache    FLOAT8E4M3FN (1 byte per element), static scales per layer from" in r.output
    assert "past_keys      float8_e4m3fn" in r.output


def test_bad_kv_cache_flags_are_one_line(tmp_path):
    cases = [
        (("build", "--precision", "fp8", "--kv-cache", "int8", "--output", tmp_path / "e"), "--kv-cache int8"),
        (("build", "--precision", "fp32", "--kv-cache", "fp9", "--output", tmp_path / "e"), "--kv-cache fp9"),
        (("build", "--precision", "fp32", "--kv-cache", "fp8", "--output", tmp_path / "e"), "quantized builds"),
    ]
    for args, needle in cases:
        r = run(*args)
        assert r.exit_code == 2, (args, r.output)
        assert r.output.startswith("error: ") and r.output.count("\n") == 1 and needle in r.output, (args, r.output)
    assert not (tmp_path / "e").exists()
