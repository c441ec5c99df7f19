"""Native ONNX Q/DQ in the exported step graph, weights stored already quantized.

We write the Q/DQ graph ourselves from ModelOpt's calibrated state rather than through ModelOpt's
ONNX exporter, whose torch path emits `trt::TRT_FP8QuantizeLinear` style custom ops (ONNX Runtime
rejects them) via the TorchScript exporter. `insert_qdq` edits the traced step graph (onnx_ir,
before it is written; export/onnx.py `save_step`): each quantized Linear's MatMul(x, W^T) becomes

    x ─[Mul pre_scale]─ QuantizeLinear ─ DequantizeLinear ─┐            (activation Q/DQ: fp8, int8)
    W^T codes (FLOAT8E4M3FN | INT8 | INT4) ─ DequantizeLinear(axis / block_size) ─ MatMul

(weight-only int4: no activation Q/DQ, the AWQ pre-scale Mul stays). The float weight of a quantized
layer leaves the graph; its codes are a lazy initializer, computed from the calibrated module while
the graph is written, so one layer's codes are in memory at a time. `native_qdq` rewrites any `trt::`
Q/DQ node (ModelOpt's legacy export) to the standard op, so graphs from elsewhere pass too.
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import NemodiffError
from .ptq import QuantizedLinear

# trt:: op -> (native op, zero-point element type to add when the node has none)
_TRT_QDQ = {"TRT_FP8QuantizeLinear": ("QuantizeLinear", "FLOAT8E4M3FN"),
            "TRT_FP8DequantizeLinear": ("DequantizeLinear", None),
            "TRT_INT4QuantizeLinear": ("QuantizeLinear", None),
            "TRT_INT4DequantizeLinear": ("DequantizeLinear", None)}
_ZERO = {"FLOAT8E4M3FN": np.uint8, "INT8": np.int8}          # zero-point storage per activation type


def linear_matmuls(graph) -> dict:
    """module name -> MatMul node, for every MatMul(x, W^T initializer) that the exporter traced
    from an nn.Linear (read from the node's name-scope metadata); graph: onnx_ir Graph."""
    out = {}
    for node in graph:
        if node.op_type != "MatMul" or not node.inputs[1].is_initializer():
            continue
        scopes = ast.literal_eval(node.metadata_props.get("pkg.torch.onnx.name_scopes", "[]"))
        classes = ast.literal_eval(node.metadata_props.get("pkg.torch.onnx.class_hierarchy", "[]"))
        if len(scopes) < 2 or not classes[-2:-1] == ["torch.nn.modules.linear.Linear"]:
            continue
        name = scopes[-2].removeprefix("model.")
        if name in out:
            raise NemodiffError(f"Linear {name} appears twice in the graph; cannot place its Q/DQ")
        out[name] = node
    return out


def insert_qdq(graph_model, layers: Iterable[QuantizedLinear], *, float_dtype: str = "float32") -> list[str]:
    """Put each layer's Q/DQ into `graph_model` (onnx_ir, in place); return the quantized names."""
    import onnx_ir as ir
    import torch

    from ..export.weights import lazy_initializer, np_dtype

    graph = graph_model.graph
    where = linear_matmuls(graph)
    fdt = np_dtype(getattr(torch, float_dtype))
    fir = ir.DataType.from_numpy(fdt)

    def const(name: str, arr: np.ndarray, dtype=None):
        value = ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(dtype or fir),
                         const_value=ir.Tensor(arr, dtype=dtype or fir, name=name))
        graph.register_initializer(value)
        return value

    quantized = []
    for q in layers:
        if q.name not in where:
            raise NemodiffError(f"step graph: no MatMul traced from Linear {q.name}")
        matmul = where[q.name]
        weight = matmul.inputs[1]
        if tuple(weight.shape) != q.shape:
            raise NemodiffError(f"{q.name}: the graph's weight is {list(weight.shape)}, the layer's {list(q.shape)}")
        p = f"{q.name}.q"
        nodes = []
        x = matmul.inputs[0]
        if q.pre_scale is not None:
            mul = ir.node("Mul", [x, const(p + ".pre_scale", q.pre_scale.astype(fdt))], name=p + ".pre_scale_mul")
            nodes.append(mul)
            x = mul.outputs[0]
        if q.act_type is not None:
            elem = getattr(ir.DataType, q.act_type)
            s = const(p + ".act_scale", np.array(q.act_scale, dtype=fdt))
            zp = const(p + ".act_zero_point", np.zeros((), _ZERO[q.act_type]), elem)
            qx = ir.node("QuantizeLinear", [x, s, zp], name=p + ".act_quant")
            dqx = ir.node("DequantizeLinear", [qx.outputs[0], s, zp], name=p + ".act_dequant")
            nodes += [qx, dqx]
            x = dqx.outputs[0]
        codes = lazy_initializer(graph_model, p + ".weight", q.codes, getattr(ir.DataType, q.weight_type), q.shape)
        ws = const(p + ".weight_scale", q.weight_scale.astype(fdt))
        attrs = {"axis": 1} if q.block is None else {"axis": 0, "block_size": q.block}
        dqw = ir.node("DequantizeLinear", [codes, ws], attributes=attrs, name=p + ".weight_dequant")
        nodes.append(dqw)
        for n in nodes:
            n.outputs[0].name = n.name + ".out"
        graph.insert_before(matmul, nodes)
        matmul.replace_input_with(0, x)
        matmul.replace_input_with(1, dqw.outputs[0])
        if not weight.uses():                                  # the float weight leaves the graph
            graph.initializers.pop(weight.name)
        quantized.append(q.name)
    return quantized


def summarize(path: Path, quantized: list[str] | None = None) -> dict:
    """Counts of Q/DQ nodes and of quantized weight initializers by element type."""
    import onnx
    from onnx import TensorProto

    m = onnx.load(str(path), load_external_data=False)
    ops = Counter(n.op_type for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))
    low = Counter(TensorProto.DataType.Name(t.data_type) for t in m.graph.initializer
                  if t.data_type in (TensorProto.FLOAT8E4M3FN, TensorProto.INT8, TensorProto.INT4)
                  and len(t.dims) == 2)
    out = {"qdq_nodes": dict(ops), "quantized_weights": dict(low)}
    if quantized is not None:
        out["quantized_layers"] = len(quantized)
    return out


def native_qdq(model) -> int:
    """Rewrite `trt::` Q/DQ custom nodes (ModelOpt's legacy export) to ONNX QuantizeLinear /
    DequantizeLinear in place; return how many were rewritten. Other custom Q/DQ ops are refused."""
    from onnx import TensorProto, helper

    n = 0
    zps = []
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx"):
            continue
        if node.op_type in _TRT_QDQ:
            op, zp_type = _TRT_QDQ[node.op_type]
            if zp_type is not None and len(node.input) == 2:
                zp = helper.make_tensor(f"{node.name or node.output[0]}.zero_point",
                                        getattr(TensorProto, zp_type), [], b"\x00", raw=True)
                zps.append(zp)
                node.input.append(zp.name)
            keep = [a for a in node.attribute if a.name in ("axis", "block_size", "saturate")]
            del node.attribute[:]
            node.attribute.extend(keep)
            node.op_type, node.domain = op, ""
            n += 1
        elif "quantize" in node.op_type.lower():
            raise NemodiffError(f"custom Q/DQ op {node.domain}::{node.op_type} has no native ONNX equivalent here")
    model.graph.initializer.extend(zps)
    if n:
        rewritten = {o for node in model.graph.node if node.op_type == "QuantizeLinear" for o in node.output}
        keep = [v for v in model.graph.value_info if v.name not in rewritten]   # types were the custom op's
        del model.graph.value_info[:]
        model.graph.value_info.extend(keep)
        used = {node.domain for node in model.graph.node}
        keep_ops = [o for o in model.opset_import if o.domain in used or o.domain in ("", "ai.onnx")]
        del model.opset_import[:]
        model.opset_import.extend(keep_ops)
    return n
