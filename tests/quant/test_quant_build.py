"""Quantized engines of the trained tiny model: Q/DQ graph contents, ONNX Runtime runs them, the
graph computes what ModelOpt calibrated, validate's gates pass, and a broken recipe fails them.

One engine per precision for the whole session (a build exports, calibrates and writes Q/DQ).
"""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("onnxruntime")
pytest.importorskip("modelopt")
onnx = pytest.importorskip("onnx")

from nemodiff_compile import TINY_ASSET  # noqa: E402
from nemodiff_compile.artifact.manifest import read_manifest  # noqa: E402
from nemodiff_compile.cli import cli  # noqa: E402
from nemodiff_compile.quant import recipe_for  # noqa: E402
from nemodiff_compile.quant.calib import builtin_texts  # noqa: E402

TRAINED = (TINY_ASSET / "config.json").is_file()
pytestmark = pytest.mark.skipif(not TRAINED, reason="needs the trained tiny checkpoint")
LINEARS = 6 * 7                                    # tiny: 6 layers x (q, k, v, o, gate, up, down); head excluded
# fp8 keeps decoder layer 0 in float (its recipe), int8 and int4-awq quantize all six: quantized_linears


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="session")
def engines(tmp_path_factory):
    """precision -> engine dir, built on first use: fp8 through the API (built-in calibration prompts),
    int8 through the CLI with a .jsonl --calib file (the built-in texts plus a line of ids), both
    validated at the end of the build; int4-awq with a 4-prompt text --calib file, not validated (its
    graph is what is tested here; README for its figures)."""
    root = tmp_path_factory.mktemp("quant")
    built = {}

    def get(precision):
        if precision in built:
            return built[precision]
        out = root / f"tiny-{precision}"
        if precision == "fp8":
            from nemodiff_compile.build_config import BuildConfig
            from nemodiff_compile.pipeline import build_engine

            build_engine(BuildConfig.of(source="tiny", output=out, backend="onnxruntime", precision="fp8",
                                        with_logits=True))
        elif precision == "int8":
            calib = root / "calib.jsonl"
            calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in builtin_texts())
                             + json.dumps({"ids": [1, 40, 41, 42]}) + "\n")
            r = run("build", "--precision", "int8", "--calib", calib, "--with-logits", "--backend", "onnxruntime",
                    "--output", out)
            assert r.exit_code == 0, r.output
        else:
            calib = root / "calib.txt"
            calib.write_text("Lily saw a bird in the tree.\nWhat is 6 + 1?\nCount from 7:\nThe dog ran to the park.\n")
            r = run("build", "--precision", precision, "--calib", calib, "--with-logits", "--backend", "onnxruntime",
                    "--no-validate", "--output", out)
            assert r.exit_code == 0, r.output
        built[precision] = out
        return out

    return get


EXPECT = {  # precision -> (weight element type, activation Q/DQ pairs?, DQ attributes)
    "fp8": ("FLOAT8E4M3FN", True, {"axis": 1}),
    "int8": ("INT8", True, {"axis": 1}),
    "int4-awq": ("INT4", False, {"axis": 0, "block_size": 128}),
}


@pytest.mark.parametrize("precision", list(EXPECT))
def test_qdq_graph(engines, precision, quantized_linears):
    from onnx import TensorProto

    path = engines(precision) / "model.onnx"
    m = onnx.load(str(path), load_external_data=False)
    wtype, acts, attrs = EXPECT[precision]
    nodes = m.graph.node
    assert all(n.domain in ("", "ai.onnx") for n in nodes), "custom-domain nodes left"
    inits = {t.name: t for t in m.graph.initializer}
    weight_dq = [n for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] in inits
                 and len(inits[n.input[0]].dims) == 2]
    quantized = quantized_linears(precision)
    assert quantized == (5 * 7 if precision == "fp8" else LINEARS)
    assert len(weight_dq) == quantized
    for n in weight_dq:
        w = inits[n.input[0]]
        assert TensorProto.DataType.Name(w.data_type) == wtype
        assert {a.name: a.i for a in n.attribute} == attrs
    q = [n for n in nodes if n.op_type == "QuantizeLinear"]
    assert len(q) == (quantized if acts else 0)
    for n in q:
        assert TensorProto.DataType.Name(inits[n.input[2]].data_type) == wtype
    # the float weights of quantized layers are gone; the head, the kept layers and the embedding stay float
    mats = [n for n in nodes if n.op_type == "MatMul" and n.input[1] in inits]
    assert len(mats) == 1 + LINEARS - quantized                                  # diffusion_head + kept layers
    assert all(inits[n.input[1]].data_type == TensorProto.FLOAT for n in mats)
    # stored quantized: the weights file shrank against fp32 (embedding and head stay float)
    size = (path.parent / "model.onnx.data").stat().st_size
    assert size < 0.7 * (TINY_ASSET / "model.safetensors").stat().st_size


@pytest.mark.parametrize("precision", list(EXPECT))
def test_manifest_records_the_quantization(engines, precision, quantized_linears):
    m = read_manifest(engines(precision), deep=True)
    q = m.quantization
    assert m.precision == precision and q["recipe"]["name"] == precision
    assert q["quantized_layers"] == quantized_linears(precision) and "diffusion_head" in q["excluded_layers"]
    assert "encoder.embed_tokens" in q["excluded_layers"]
    assert len(q["calibration"]["sha256"]) == 64 and q["calibration"]["modes"] == ["dlm", "linear-spec"]
    assert q["thresholds"] == recipe_for(precision).thresholds
    assert q["calibration"]["source"] == ("builtin" if precision == "fp8" else str(engines(precision).parent /
                                                                                 ("calib.jsonl" if precision == "int8" else "calib.txt")))
    v = m.validation                                # the build's own quick validation, with the recipe's bounds
    if precision == "int4-awq":                     # built with --no-validate
        assert v is None
        return
    assert v["passed"] is True, v
    assert v["prompts"] == 32 and v["prompts_source"] == "builtin"   # enough to be judged by distributions
    assert v["tolerances"]["kl_mean_max"] == q["thresholds"]["kl_mean_max"]
    assert set(v["per_mode"]) == {"ar", "dlm", "linear-spec"}


def test_calibration_sets_differ_in_the_manifest(engines):
    h = {p: read_manifest(engines(p)).quantization["calibration"]["sha256"] for p in ("fp8", "int8")}
    assert h["fp8"] != h["int8"]


def test_inspect_shows_the_recipe(engines):
    r = run("inspect", engines("int8"))
    assert r.exit_code == 0, r.output
    assert "recipe      int8: int8 weights per channel, int8 activations per tensor, smoothquant" in r.output
    assert f"calibration {len(builtin_texts()) + 1} prompts from" in r.output and "excluded    diffusion_head" in r.output
    assert "thresholds  " in r.output and "cosine_p05=0.99" in r.output and "kl_mean_max=0.005" in r.output


HELDOUT = Path(__file__).resolve().parents[2] / "docs" / "prompts" / "tiny-heldout-200.txt"
HELDOUT_CI = 32          # of its 200 prompts, x 16 new tokens (the README's figures use all 200 x 32)


@pytest.fixture(scope="session")
def heldout_subset(tmp_path_factory):
    """The first HELDOUT_CI held-out prompts (the generator's order keeps the chat / raw alternation)."""
    out = tmp_path_factory.mktemp("heldout") / "heldout.txt"
    out.write_text("".join(HELDOUT.read_text().splitlines(keepends=True)[:HELDOUT_CI]))
    return out


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_heldout_validation_passes_its_gates(engines, heldout_subset, precision):
    """Prompts no recipe or bound was tuned on (tiny/heldout.py, its own seed), all three modes,
    against the fp32 reference: the recipe's distribution-level gates hold."""
    from nemodiff_compile.validate.engine import validate_engine

    report = validate_engine(engines(precision), prompts_file=heldout_subset, max_new_tokens=16, write=False)
    assert report.passed, report.to_table()
    js = report.to_json()
    assert js["settings"]["prompts"] == HELDOUT_CI and js["explanation"] is None
    bounds = recipe_for(precision).thresholds
    for name, mode in js["per_mode"].items():
        assert mode["forced_token_agreement"] >= 0.95 and mode["tpf_drop"] <= 0.1, name
        assert mode["token_agreement"] >= bounds["mean_token_agreement"], name
        assert mode["prompt_spread"]["prompts"] == HELDOUT_CI
        for phase, d in mode["phases"].items():
            assert d["cosine"]["p05"] >= bounds["cosine_p05"] and d["kl"]["mean"] <= bounds["kl_mean_max"], phase
    assert set(js["per_mode"]["linear-spec"]["phases"]) == {"prefill", "draft", "verify"}   # draft reported apart


def test_graph_computes_what_modelopt_calibrated(tmp_path):
    """The Q/DQ graph in ONNX Runtime equals ModelOpt's fake-quantized torch model (and differs from
    the float one): scales, codes, pre-scales and placement are right. (Basic graph optimizations:
    ORT's fused int8 CPU kernels round differently, ~0.3 on these logits.)"""
    import torch

    from nemodiff_compile import load_reference
    from nemodiff_compile.quant.calibration import decoding_loop
    from nemodiff_compile.quant.export import quantize_step
    from nemodiff_compile.backends.ort import OrtDenoiser
    from nemodiff_compile.backends.eager import TorchDenoiser

    model, ref = load_reference("tiny"), load_reference("tiny")
    recipe = recipe_for("int8").with_(calib_modes=("dlm",), calib_max_new_tokens=16)
    prompts = [[1, 30, 31, 32, 33, 34], [1, 50, 51, 52]]
    loop = decoding_loop(prompts, recipe.calib_modes, recipe.calib_max_new_tokens, model.config.block_size)
    spec, record = quantize_step(model, recipe, loop, tmp_path, with_logits=True, calibration={"source": "test"})
    assert record["graph"]["qdq_nodes"] == {"QuantizeLinear": LINEARS, "DequantizeLinear": 2 * LINEARS}
    x = torch.tensor([[1, 60, 61, 62, 63, 64, 65, 66]])
    outs = []
    for den in (OrtDenoiser(tmp_path / "model.onnx", spec, model.config, 32, return_logits=True, fuse=False),
                TorchDenoiser(model, 32, return_logits=True), TorchDenoiser(ref, 32, return_logits=True)):
        den.reset(1)
        den.step(x[:, :5], causal=True, write=True)
        outs.append(den.step(x[:, 5:], causal=False, write=False).logits.float())       # [1, 3, V]
    graph, fake, flt = outs
    # equal up to a rare activation that lands on the other side of a rounding boundary (float
    # reduction order): one int8 step there moves a few logits by ~0.05
    to_fake, to_float = (graph - fake).abs(), (graph - flt).abs()
    print("graph vs fake-quant mean/max", float(to_fake.mean()), float(to_fake.max()),
          "graph vs float mean", float(to_float.mean()))
    assert float(to_fake.mean()) < 0.05 * float(to_float.mean()) and float(to_fake.max()) < 0.2


def test_broken_recipe_fails_the_gate(tmp_path, heldout_subset):
    """int4 per-channel weights with int8 activations, diffusion head included, judged by fp8's
    bounds: validate says FAILED on the held-out prompts and on the build's own prompts, explains
    where (mode, pass kind, pass, per-layer error), and the CLI exits 1 saying why."""
    from nemodiff_compile.build_config import BuildConfig
    from nemodiff_compile.pipeline import build_engine
    from nemodiff_compile.validate.engine import validate_engine

    broken = recipe_for("fp8").with_(weights="int4", weight_block=None, activations="int8", exclude=(),
                                     calib_max_new_tokens=16)
    out = build_engine(BuildConfig.of(source="tiny", output=tmp_path / "broken", backend="onnxruntime",
                                      precision="fp8", with_logits=True), recipe=broken)
    v = read_manifest(out).validation                     # the build's own validation
    assert v["passed"] is False and v["prompts"] == 32 and v["explanation"]
    report = validate_engine(out, prompts_file=heldout_subset, max_new_tokens=16, write=False)
    assert not report.passed
    assert any("mean KL" in f or "percentile logit cosine" in f for f in report.failures), report.failures
    why = report.explanation
    assert why["mode"] in ("ar", "dlm", "linear-spec") and not report.modes[why["mode"]].passed
    assert why["phase"] in ("prefill", "decode", "denoise", "commit", "draft", "verify")
    assert len(why["layers"]["relative"]) == 6 and 0 <= why["layers"]["jump"] < 6
    assert f"layer {why['layers']['jump']}" in why["text"] and why["phase"] in why["text"]
    r = run("validate", out, "--max-new-tokens", "8", "--mode", "dlm", "--prompts", heldout_subset)
    assert r.exit_code == 1, r.output
    assert "FAILED" in r.output and "why: dlm mode" in r.output and "relative error by layer" in r.output


def test_bad_quant_flags_are_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    cases = [
        (("build", "--precision", "nvfp4", "--output", tmp_path / "e"), "nvfp4"),
        (("build", "--precision", "fp8", "--calib", tmp_path / "none.txt", "--output", tmp_path / "e"), "--calib"),
        (("build", "--precision", "int8", "--calib", bad, "--output", tmp_path / "e"), "bad.jsonl:1"),
        (("build", "--precision", "fp32", "--calib", bad, "--output", tmp_path / "e"), "--calib"),
        (("build", "--precision", "fp32", "--keep-first-layers", "1", "--output", tmp_path / "e"), "--keep-first"),
        (("build", "--precision", "fp32", "--calib-device", "cpu", "--output", tmp_path / "e"), "--calib-device cpu"),
    ]
    import torch

    if not torch.cuda.is_available():
        cases.append((("build", "--precision", "fp8", "--calib-device", "cuda", "--output", tmp_path / "e"),
                      "--calib-device cuda: this machine has no CUDA GPU"))
    for args, needle in cases:
        r = run(*args)
        assert r.exit_code == 2, (args, r.output)
        assert r.output.startswith("error: ") and r.output.count("\n") == 1 and needle in r.output, (args, r.output)
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_quantized_graph_builds_a_tensorrt_plan(engines, precision, tmp_path, quantized_linears):
    """The ONNX Runtime engine's Q/DQ graph, parsed and built by TensorRT (tensorrt_rtx here) for sm89:
    every quantized projection must reach its GEMM through DQ (a Gemm's transB shuffle in between)."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is not installed")
    from nemodiff_compile.artifact.manifest import read_manifest
    from nemodiff_compile.trt.builder import BuildOptions, build_plan

    d = engines(precision)
    m = read_manifest(d)
    plan, info = build_plan(d / "model.onnx", io_spec=m.io_spec, buckets=m.buckets, precision=precision,
                            target="sm89", options=BuildOptions(timing_cache_dir=tmp_path))
    check = info.precision_check
    assert len(plan) > 0 and check["passed"] and not check["offenders"]
    assert check["in_precision"] == m.quantization["quantized_layers"] == quantized_linears(precision)   # every quantized projection
