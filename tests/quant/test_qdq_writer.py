"""The Q/DQ writer (quant/qdq.py: linear_matmuls, insert_qdq, summarize) on a hand-made two-Linear ONNX
graph, fast (no ModelOpt, no model export): ONNX Runtime runs the rewritten graph and its output equals
a numpy evaluation of y = DQ(Q(x * pre_scale)) @ DQ(codes) layer by layer (int8 activations with int8
per-channel weights; weight-only int4 in blocks with an AWQ pre-scale; fp8); the float weights leave
the graph unless something else still reads them; the errors are one line. The mutation run of
quant/qdq.py selects this file with test_recipe.py (native_qdq)."""

from __future__ import annotations

import numpy as np
import pytest

ir = pytest.importorskip("onnx_ir")
ort = pytest.importorskip("onnxruntime")

from nemodiff_compile.errors import NemodiffError  # noqa: E402
from nemodiff_compile.quant.ptq import QuantizedLinear  # noqa: E402
from nemodiff_compile.quant.qdq import insert_qdq, linear_matmuls, summarize  # noqa: E402

LINEAR = "torch.nn.modules.linear.Linear"
RNG = np.random.default_rng(0)
WA = RNG.standard_normal((4, 4)).astype(np.float32)          # [in, out]: MatMul(x, W^T) as traced
WB = RNG.standard_normal((4, 2)).astype(np.float32)


def _matmul(x, w, module, cls=LINEAR, scopes=None):
    node = ir.node("MatMul", [x, w], name=f"{module}.matmul")
    node.metadata_props["pkg.torch.onnx.name_scopes"] = repr(scopes if scopes is not None else
                                                             ["", f"model.{module}", f"{module}.matmul"])
    node.metadata_props["pkg.torch.onnx.class_hierarchy"] = repr(["Model", cls, "aten.matmul"])
    node.outputs[0].name = f"{module}.out"
    return node


def _init(graph_inits, name, arr):
    v = ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.FLOAT),
                 const_value=ir.Tensor(arr, name=name))
    graph_inits.append(v)
    return v


def make_model(extra_reader=False, dup=False):
    """x [2, 4] -> a (Linear 4->4) -> b (Linear 4->2) -> y; plus MatMuls that are not Linear weights."""
    x = ir.Value(name="x", shape=ir.Shape([2, 4]), type=ir.TensorType(ir.DataType.FLOAT))
    inits = []
    wa, wb = _init(inits, "a.weight.T", WA), _init(inits, "b.weight.T", WB)
    a = _matmul(x, wa, "a")
    b = _matmul(a.outputs[0], wb, "b", scopes=["model.b", "b.matmul"])             # a top-level Linear
    sq = _init(inits, "sq", np.eye(2, dtype=np.float32))
    bare = ir.node("MatMul", [b.outputs[0], sq], name="bare")                          # no metadata at all
    nodes = [a, b, bare,
             _matmul(bare.outputs[0], sq, "c", cls="torch.nn.modules.Identity"),    # not a Linear
             _matmul(bare.outputs[0], sq, "d", scopes=["model.d"])]                  # no parent scope
    act = ir.node("MatMul", [nodes[-1].outputs[0], nodes[-2].outputs[0]], name="act")   # [2, 2] @ [2, 2]
    nodes.append(act)
    outputs = [act.outputs[0]]
    if extra_reader:                           # something else reads b's float weight: it must stay
        ident = ir.node("Identity", [wb], name="keep")
        nodes.append(ident)
        outputs.append(ident.outputs[0])
    if dup:
        nodes.append(_matmul(x, wa, "a"))
        nodes[-1].outputs[0].name = "a.again"
    g = ir.Graph([x], outputs, nodes=nodes, initializers=inits, opset_imports={"": 21}, name="g")
    return ir.Model(g, ir_version=10)


def q_a(**kw):
    """a: int8 activations (per-tensor 0.05), int8 per-channel weights, a SmoothQuant pre-scale."""
    scale = np.abs(WA).max(0) / 127                                                     # [out]
    codes = np.clip(np.rint(WA / scale), -127, 127).astype(np.int8)
    d = dict(name="a", codes=lambda: codes, shape=(4, 4), weight_type="INT8", weight_scale=scale.astype(np.float32),
             block=None, act_type="INT8", act_scale=0.05, pre_scale=np.array([1.0, 0.5, 2.0, 1.5], np.float32))
    d.update(kw)
    return QuantizedLinear(**d)


def q_b():
    """b: weight-only int4 in blocks of 2 along the input axis, an AWQ pre-scale."""
    scale = np.abs(WB).reshape(2, 2, 2).max(1) / 7                                      # [in/2, out]
    codes = np.clip(np.rint(WB / np.repeat(scale, 2, axis=0)), -7, 7).astype(np.int8)
    return QuantizedLinear(name="b", codes=lambda: codes, shape=(4, 2), weight_type="INT4",
                           weight_scale=scale.astype(np.float32), block=2, act_type=None, act_scale=None,
                           pre_scale=np.array([0.5, 1.0, 2.0, 4.0], np.float32))


def reference(x, qa, qb):
    xa = x * qa.pre_scale
    xa = np.clip(np.rint(xa / qa.act_scale), -128, 127) * qa.act_scale                 # Q/DQ int8
    ya = xa @ (qa.codes().astype(np.float32) * qa.weight_scale)
    wb = qb.codes().astype(np.float32) * np.repeat(qb.weight_scale, 2, axis=0)
    yb = (ya * qb.pre_scale) @ wb
    return (yb @ np.eye(2) @ np.eye(2)) @ (yb @ np.eye(2) @ np.eye(2))


def run(model, tmp_path, name="m.onnx"):
    path = tmp_path / name
    ir.save(model, path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return path, sess


def test_linear_matmuls_finds_the_traced_linears_only():
    where = linear_matmuls(make_model().graph)
    assert sorted(where) == ["a", "b"] and where["a"].name == "a.matmul" and where["b"].name == "b.matmul"
    with pytest.raises(NemodiffError, match="Linear a appears twice"):
        linear_matmuls(make_model(dup=True).graph)


def test_rewritten_graph_computes_the_quantized_layers(tmp_path):
    model = make_model()
    qa, qb = q_a(), q_b()
    assert insert_qdq(model, [qa, qb]) == ["a", "b"]
    inits = model.graph.initializers
    assert "a.weight.T" not in inits and "b.weight.T" not in inits                    # float weights left
    assert inits["a.q.weight"].type.dtype == ir.DataType.INT8 and inits["b.q.weight"].type.dtype == ir.DataType.INT4
    path, sess = run(model, tmp_path)
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    (y,) = sess.run(None, {"x": x})
    want = reference(x, qa, qb)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    xa = x * qa.pre_scale                          # the activation Q/DQ rounds: doing nothing would show
    assert np.abs(np.clip(np.rint(xa / 0.05), -128, 127) * 0.05 - xa).max() > 1e-3
    assert summarize(path, ["a", "b"]) == {"qdq_nodes": {"QuantizeLinear": 1, "DequantizeLinear": 3},
                                           "quantized_weights": {"INT8": 1, "INT4": 1}, "quantized_layers": 2}
    assert "quantized_layers" not in summarize(path)
    ext = tmp_path / "ext" / "m.onnx"                          # weights outside the graph file, then gone:
    ext.parent.mkdir()                                         # the summary reads the graph only
    ir.save(model, ext, external_data="w.data", size_threshold_bytes=0)
    (ext.parent / "w.data").unlink()
    assert summarize(ext)["qdq_nodes"] == {"QuantizeLinear": 1, "DequantizeLinear": 3}
    names = {n.name for n in model.graph}
    assert {"a.q.pre_scale_mul", "a.q.act_quant", "a.q.act_dequant", "a.q.weight_dequant",
            "b.q.pre_scale_mul", "b.q.weight_dequant"} <= names and "b.q.act_quant" not in names


def test_fp8_layer_and_weights_still_read_elsewhere_stay(tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    model = make_model(extra_reader=True)
    scale = (np.abs(WA).max(0) / 448).astype(np.float32)
    codes = (WA / scale).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    qa = q_a(codes=lambda: codes, weight_type="FLOAT8E4M3FN", weight_scale=scale, act_type="FLOAT8E4M3FN",
             act_scale=0.01, pre_scale=None)
    assert insert_qdq(model, [qa]) == ["a"]
    assert "b.weight.T" in model.graph.initializers and "a.weight.T" not in model.graph.initializers
    path, sess = run(model, tmp_path)
    x = np.random.default_rng(2).standard_normal((2, 4)).astype(np.float32)
    y, wb = sess.run(None, {"x": x})
    np.testing.assert_array_equal(wb, WB)
    x8 = (x / 0.01).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * 0.01
    assert np.abs(x8 - x).max() > 1e-3                      # the pair rounds
    ya = x8 @ (codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale)
    yb = ya @ WB
    np.testing.assert_allclose(y, yb @ yb, rtol=1e-4, atol=1e-4)
    assert summarize(path) == {"qdq_nodes": {"QuantizeLinear": 1, "DequantizeLinear": 2},
                               "quantized_weights": {"FLOAT8E4M3FN": 1}}


def test_float16_graph_gets_float16_scales():
    model = make_model()
    insert_qdq(model, [q_a(), q_b()], float_dtype="float16")
    inits = model.graph.initializers
    for name in ("a.q.pre_scale", "a.q.act_scale", "a.q.weight_scale", "b.q.weight_scale"):
        assert inits[name].type.dtype == ir.DataType.FLOAT16, name
    assert inits["a.q.act_zero_point"].type.dtype == ir.DataType.INT8


def test_layers_the_graph_does_not_hold_are_refused():
    with pytest.raises(NemodiffError, match="no MatMul traced from Linear c"):
        insert_qdq(make_model(), [q_a(name="c")])
    with pytest.raises(NemodiffError, match=r"a: the graph's weight is \[4, 4\], the layer's \[4, 2\]"):
        insert_qdq(make_model(), [q_a(shape=(4, 2))])
