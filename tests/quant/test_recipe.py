"""Recipes, calibration inputs and the trt:: -> native Q/DQ rewrite: no model, no ModelOpt."""

import json
import subprocess
import sys

import numpy as np
import pytest

from nemodiff_compile.errors import InvalidArgument
from nemodiff_compile.quant import RECIPES, recipe_for
from nemodiff_compile.quant import calib


def test_import_stays_light():
    code = ("import sys, nemodiff_compile, nemodiff_compile.quant; "
            "assert 'torch' not in sys.modules and 'modelopt' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_recipes_are_data():
    fp8, int8, int4 = RECIPES["fp8"], RECIPES["int8"], RECIPES["int4-awq"]
    assert (fp8.weights, fp8.weight_block, fp8.activations, fp8.algorithm) == ("fp8", None, "fp8", "max")
    assert (int8.weights, int8.activations, int8.algorithm) == ("int8", "int8", "smoothquant")
    assert (int4.weights, int4.weight_block, int4.activations, int4.algorithm) == ("int4", 128, None, "awq_lite")
    for r in (fp8, int8, int4):
        d = r.to_json()
        json.dumps(d)
        assert d["thresholds"]["mean_token_agreement"] and d["kv_cache_dtype"] == "model"


def test_fp8_keeps_the_first_decoder_layer_in_float():
    """tiny-tasks fails fp8's trajectory floor with layer 0 quantized (README "Quantization")."""
    assert recipe_for("fp8").keep_first_layers == 1 and recipe_for("fp8").keep_last_layers == 0
    assert recipe_for("fp8").high_precision("encoder.layers.0.mlp.down_proj", 40)
    assert not recipe_for("fp8").high_precision("encoder.layers.1.mlp.down_proj", 40)
    assert not recipe_for("fp8", keep_first_layers=0).high_precision("encoder.layers.0.mlp.down_proj", 6)
    assert recipe_for("int8").keep_first_layers == recipe_for("int4-awq").keep_first_layers == 0


def test_high_precision_layers():
    r = recipe_for("fp8", keep_first_layers=1, keep_last_layers=2)
    keep = lambda n: r.high_precision(n, 6)
    assert keep("diffusion_head") and keep("encoder.embed_tokens") and keep("encoder.layers.3.input_layernorm")
    assert keep("encoder.layers.0.self_attn.q_proj") and keep("encoder.layers.4.mlp.up_proj")
    assert keep("encoder.layers.5.mlp.down_proj")
    assert not keep("encoder.layers.1.self_attn.q_proj") and not keep("encoder.layers.3.mlp.down_proj")


def test_kv_cache_override():
    assert recipe_for("int8", kv_cache="fp8").kv_cache_dtype == "fp8"
    assert recipe_for("fp8").kv_cache_dtype == "model"             # the default stays the float cache
    with pytest.raises(InvalidArgument, match="--kv-cache fp16: expected one of model, fp8"):
        recipe_for("fp8", kv_cache="fp16")


def test_bad_recipes_are_one_line():
    with pytest.raises(InvalidArgument, match="--precision fp4"):
        recipe_for("fp4")
    for kw, msg in [(dict(weights="int3"), "weights"), (dict(algorithm="gptq"), "algorithm"),
                    (dict(kv_cache_dtype="int8"), "--kv-cache int8"), (dict(calib_modes=("beam",)), "calibration mode")]:
        with pytest.raises(InvalidArgument, match=msg):
            RECIPES["fp8"].with_(**kw).check()


def test_calib_files(tmp_path):
    builtin = calib.read_prompts(None)              # the general prompts, then the corpus-style file's lines
    corpus = [x for x in calib.CORPUS_PROMPTS_FILE.read_text().splitlines() if x.strip()]
    assert len(builtin) == len(calib.BUILTIN_PROMPTS) + len(corpus) and len(corpus) == 64
    assert builtin[0]["text"] == calib.BUILTIN_PROMPTS[0] and builtin[-1]["text"] == corpus[-1].strip()
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\n second \n")
    assert calib.read_prompts(txt) == [{"text": "first prompt"}, {"text": "second"}]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"text": "a"}\n{"prompt": "b"}\n{"ids": [1, 2, 3]}\n')
    assert calib.read_prompts(jl) == [{"text": "a"}, {"text": "b"}, {"ids": [1, 2, 3]}]
    bad = tmp_path / "bad.jsonl"
    for content, msg in [("{oops\n", r"bad.jsonl:1: not JSON"), ('{"ids": ["x"]}\n', r"bad.jsonl:1: expected"),
                         ("\n\n", "no prompts")]:
        bad.write_text(content)
        with pytest.raises(InvalidArgument, match=msg):
            calib.read_prompts(bad)
    with pytest.raises(InvalidArgument, match="--calib .*missing.txt: file not found"):
        calib.read_prompts(tmp_path / "missing.txt")


def test_calib_ids_and_hash(tiny_cfg):
    ids = calib.encode_prompts([{"ids": [1, 5, 6]}], None, tiny_cfg, "--calib f")
    assert ids == [[1, 5, 6]]
    with pytest.raises(InvalidArgument, match="outside the vocabulary"):
        calib.encode_prompts([{"ids": [1, 10**6]}], None, tiny_cfg, "--calib f")
    with pytest.raises(InvalidArgument, match="--calib f: this model has no tokenizer"):
        calib.encode_prompts([{"text": "hi"}], None, tiny_cfg, "--calib f")
    assert calib.prompts_hash([[1, 2]]) != calib.prompts_hash([[1, 3]])
    assert calib.prompts_hash([[1, 2]]) == calib.prompts_hash([[1, 2]])


def test_trt_qdq_nodes_become_native():
    """ModelOpt's legacy export writes trt::TRT_FP8QuantizeLinear / DequantizeLinear; ORT rejects them.
    native_qdq rewrites them and ONNX Runtime then runs the graph."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto as T, helper as h, numpy_helper as nh

    from nemodiff_compile.quant.qdq import native_qdq

    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    nodes = [h.make_node("TRT_FP8QuantizeLinear", ["x", "s"], ["xq"], domain="trt"),
             h.make_node("TRT_FP8DequantizeLinear", ["xq", "s"], ["xd"], domain="trt"),
             h.make_node("MatMul", ["xd", "w"], ["y"])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [2, 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, [2, 4])],
                     [nh.from_array(np.array(0.01, np.float32), "s"), nh.from_array(w, "w")],
                     value_info=[h.make_tensor_value_info("xq", T.UINT8, [2, 8])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21), h.make_opsetid("trt", 1)])
    m.ir_version = 10
    assert native_qdq(m) == 2
    assert {n.op_type for n in m.graph.node} == {"QuantizeLinear", "DequantizeLinear", "MatMul"}
    assert all(n.domain == "" for n in m.graph.node)
    onnx.checker.check_model(m)
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    import torch

    x8 = (torch.from_numpy(x / 0.01).to(torch.float8_e4m3fn).float() * 0.01).numpy()   # x through e4m3
    assert np.abs(x8 - x).max() > 1e-3                       # the pair rounds: doing nothing would show
    np.testing.assert_allclose(y, x8 @ w, rtol=1e-5, atol=1e-5)


def test_trt_int4_weight_dequant_becomes_native_and_dequantizes():
    """A blocked int4 weight DQ (trt::TRT_INT4DequantizeLinear, axis 0, block 4) rewritten to the
    standard op computes x @ (codes * scale per block), not x @ the float weights it approximates."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto as T, helper as h, numpy_helper as nh

    from nemodiff_compile.quant.qdq import native_qdq

    rng = np.random.default_rng(2)
    K, N, blk = 8, 3, 4
    w = rng.standard_normal((K, N)).astype(np.float32)
    scale = (np.abs(w).reshape(K // blk, blk, N).max(1) / 7).astype(np.float32)          # [K/blk, N]
    codes = np.clip(np.round(w / np.repeat(scale, blk, 0)), -8, 7).astype(np.int8)      # [K, N] in int4 range
    deq = codes.astype(np.float32) * np.repeat(scale, blk, 0)
    nodes = [h.make_node("TRT_INT4DequantizeLinear", ["wq", "ws"], ["wd"], domain="trt", axis=0, block_size=blk,
                         junk=1),
             h.make_node("MatMul", ["x", "wd"], ["y"])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [2, K])],
                     [h.make_tensor_value_info("y", T.FLOAT, [2, N])],
                     [h.make_tensor("wq", T.INT4, [K, N], codes.flatten().tolist()), nh.from_array(scale, "ws")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21), h.make_opsetid("trt", 1)])
    m.ir_version = 10
    assert native_qdq(m) == 1
    dq = m.graph.node[0]
    assert (dq.op_type, dq.domain) == ("DequantizeLinear", "") and len(dq.input) == 2      # no zero point added
    assert {a.name: a.i for a in dq.attribute} == {"axis": 0, "block_size": blk}          # unknown attrs dropped
    assert [o.domain for o in m.opset_import] == [""]
    onnx.checker.check_model(m)
    x = rng.standard_normal((2, K)).astype(np.float32)
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ deq, rtol=1e-5, atol=1e-5)
    assert np.abs(x @ deq - x @ w).max() > 1e-2                 # int4 rounding is visible: the DQ did work


def test_unknown_custom_quantize_op_is_refused():
    onnx = pytest.importorskip("onnx")
    from onnx import helper as h

    from nemodiff_compile.errors import NemodiffError
    from nemodiff_compile.quant.qdq import native_qdq

    g = h.make_graph([h.make_node("MyQuantizeLinear", ["x"], ["y"], domain="acme")], "g", [], [])
    with pytest.raises(NemodiffError, match="acme::MyQuantizeLinear has no native ONNX equivalent"):
        native_qdq(h.make_model(g))


def test_recipe_thresholds_become_tolerances():
    from nemodiff_compile.validate import tolerances_for

    t = tolerances_for("fp8")
    assert t.cosine_min == RECIPES["fp8"].thresholds["cosine_min"] and t.tpf_drop_max == 0.1
    t2 = tolerances_for("fp8", {"cosine_min": 0.5})            # as recorded in a manifest
    assert t2.cosine_min == 0.5 and t2.forced_token_agreement is None
    with pytest.raises(InvalidArgument, match="unknown bound"):
        tolerances_for("fp8", {"bogus": 1})


def test_tpf_drop_and_pooled_agreement_gates():
    from nemodiff_compile.validate import tolerances_for
    from nemodiff_compile.validate.compare import ModeResult, _judge_mode

    tol = tolerances_for("fp8")
    m = ModeResult("dlm", [1.0, 1.0], 20, 20, {"reference": 5, "engine": 8},
                   {"reference": 2.0, "engine": 1.5}, [], None)
    assert [f for f in _judge_mode(m, tol) if "tokens per forward fell 25.0%" in f]
    m.tokens_per_forward = {"reference": 2.0, "engine": 2.4}          # committing more per pass is fine
    assert _judge_mode(m, tol) == []
    m.matched = 10                                                    # pooled trajectory agreement 0.5
    assert tol.mean_token_agreement == 0.85                            # the recipe's loose floor
    assert [f for f in _judge_mode(m, tol) if "over all prompts 0.5000 < 0.85" in f]


def test_native_nodes_are_kept_and_rewritten_nodes_keep_their_options():
    """Standard Q/DQ nodes (domain "" or "ai.onnx") before the custom ones are left alone; every
    unnamed custom FP8 quantize gets its own zero point; `saturate` survives the rewrite."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto as T, helper as h, numpy_helper as nh

    from nemodiff_compile.quant.qdq import native_qdq

    nodes = [h.make_node("QuantizeLinear", ["x", "s8", "zp8"], ["xq0"]),
             h.make_node("DequantizeLinear", ["xq0", "s8", "zp8"], ["x0"], domain="ai.onnx"),
             h.make_node("TRT_FP8QuantizeLinear", ["x0", "s"], ["xq1"], domain="trt", saturate=1),
             h.make_node("TRT_FP8DequantizeLinear", ["xq1", "s"], ["x1"], domain="trt"),
             h.make_node("TRT_FP8QuantizeLinear", ["x1", "s"], ["xq2"], domain="trt"),
             h.make_node("TRT_FP8DequantizeLinear", ["xq2", "s"], ["y"], domain="trt")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [2, 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, [2, 8])],
                     [nh.from_array(np.array(0.01, np.float32), "s"), nh.from_array(np.array(0.05, np.float32), "s8"),
                      nh.from_array(np.array(0, np.int8), "zp8")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21), h.make_opsetid("trt", 1)])
    m.ir_version = 10
    assert native_qdq(m) == 4
    assert [n.domain for n in m.graph.node] == ["", "ai.onnx", "", "", "", ""]
    assert [a.name for a in m.graph.node[2].attribute] == ["saturate"]
    names = [t.name for t in m.graph.initializer]
    assert len(names) == len(set(names)) == 5                       # two new zero points, distinct
    m.graph.node[1].domain = ""                                     # "ai.onnx" is the same domain; ORT spells it ""
    onnx.checker.check_model(m)
    x = np.random.default_rng(3).standard_normal((2, 8)).astype(np.float32)
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    x0 = np.clip(np.round(x / 0.05), -128, 127) * 0.05                # the int8 pair ran
    np.testing.assert_allclose(y, x0, rtol=1 / 16, atol=1e-6)
