"""Write native ONNX Q/DQ into the exported float step graph, weights stored already quantized.

We write the Q/DQ graph ourselves (plain onnx protobuf edits) from ModelOpt's calibrated state
rather than through ModelOpt's ONNX exporter, whose torch path emits `trt::TRT_FP8QuantizeLinear`
style custom ops (ONNX Runtime rejects them) via the TorchScript exporter. Each quantized Linear's
MatMul(x, W^T) becomes

    x ─[Mul pre_scale]─ QuantizeLinear ─ DequantizeLinear ─┐            (activation Q/DQ: fp8, int8)
    W^T codes (FLOAT8E4M3FN | INT8 | INT4) ─ DequantizeLinear(axis / block_size) ─ MatMul

(weight-only int4: no activation Q/DQ, the AWQ pre-scale Mul stays). Float weights of quantized
layers are dropped; the other initializers are copied tensor by tensor from the memory-mapped
source data file, so the pass holds one layer's codes at a time. `native_qdq` rewrites any `trt::`
Q/DQ node (ModelOpt's legacy export) to the standard op, so graphs from elsewhere pass too.
"""

from __future__ import annotations

import ast
import mmap
import os
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import NemodiffError
from .ptq import QuantizedLinear

INLINE_BYTES = 1024                   # smaller tensors stay inside model.onnx
_COPY_CHUNK = 64 << 20
# trt:: op -> (native op, zero-point element type to add when the node has none)
_TRT_QDQ = {"TRT_FP8QuantizeLinear": ("QuantizeLinear", "FLOAT8E4M3FN"),
            "TRT_FP8DequantizeLinear": ("DequantizeLinear", None),
            "TRT_INT4QuantizeLinear": ("QuantizeLinear", None),
            "TRT_INT4DequantizeLinear": ("DequantizeLinear", None)}


def linear_matmuls(graph) -> dict[str, tuple[int, str]]:
    """module name -> (node index, weight initializer name) for every MatMul(x, W^T) that the
    exporter traced from an nn.Linear (read from the node's name-scope metadata)."""
    inits = {t.name for t in graph.initializer}
    out = {}
    for i, node in enumerate(graph.node):
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        meta = {m.key: m.value for m in node.metadata_props}
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        classes = ast.literal_eval(meta.get("pkg.torch.onnx.class_hierarchy", "[]"))
        if len(scopes) < 2 or not classes[-2:-1] == ["torch.nn.modules.linear.Linear"]:
            continue
        name = scopes[-2].removeprefix("model.")
        if name in out:
            raise NemodiffError(f"Linear {name} appears twice in the graph; cannot place its Q/DQ")
        out[name] = (i, node.input[1])
    return out


def write_qdq(src: Path, dst: Path, layers: Iterable[QuantizedLinear], *, float_dtype: str = "float32",
              onnx_name: str = "model.onnx", data_name: str = "model.onnx.data") -> dict:
    """src/onnx_name (+ external data) -> dst/onnx_name with Q/DQ for `layers`; returns a summary."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(src / onnx_name), load_external_data=False)
    graph = model.graph
    where = linear_matmuls(graph)
    fdt = _float_np(float_dtype)
    before: dict[int, list] = {}                   # node index -> nodes to insert before it
    dropped: set[str] = set()
    new_inits = []
    data_path = dst / data_name
    quantized = []
    with open(data_path, "wb") as data:
        def put(name: str, arr: np.ndarray | bytes, dims, elem: int):
            raw = arr if isinstance(arr, bytes) else np.ascontiguousarray(arr).tobytes()
            t = TensorProto(name=name, data_type=elem, dims=list(dims))
            if len(raw) >= INLINE_BYTES:
                _external(t, data, raw, data_name)
            else:
                t.raw_data = raw
            new_inits.append(t)
            return name

        for q in layers:
            if q.name not in where:
                raise NemodiffError(f"{src / onnx_name}: no MatMul traced from Linear {q.name}")
            idx, w_name = where[q.name]
            node = graph.node[idx]
            p = f"{q.name}.q"
            nodes = []
            x = node.input[0]
            if q.pre_scale is not None:
                nodes.append(helper.make_node("Mul", [x, put(p + ".pre_scale", q.pre_scale.astype(fdt), q.pre_scale.shape,
                                                             _elem(fdt))], [p + ".x_scaled"], name=p + ".pre_scale_mul"))
                x = p + ".x_scaled"
            if q.act_type is not None:
                elem = getattr(TensorProto, q.act_type)
                s = put(p + ".act_scale", np.array(q.act_scale, dtype=fdt), (), _elem(fdt))
                zp = put(p + ".act_zero_point", b"\x00", (), elem)
                nodes += [helper.make_node("QuantizeLinear", [x, s, zp], [p + ".x_q"], name=p + ".act_quant"),
                          helper.make_node("DequantizeLinear", [p + ".x_q", s, zp], [p + ".x_dq"], name=p + ".act_dequant")]
                x = p + ".x_dq"
            w_elem = getattr(TensorProto, q.weight_type)
            codes = _pack_int4(q.weight) if q.weight_type == "INT4" else q.weight.tobytes()
            wq = put(p + ".weight", codes, q.weight.shape, w_elem)
            ws = put(p + ".weight_scale", q.weight_scale.astype(fdt), q.weight_scale.shape, _elem(fdt))
            attrs = {"axis": 1} if q.block is None else {"axis": 0, "block_size": q.block}
            nodes.append(helper.make_node("DequantizeLinear", [wq, ws], [p + ".w_dq"], name=p + ".weight_dequant", **attrs))
            node.input[0], node.input[1] = x, p + ".w_dq"
            before[idx] = nodes
            dropped.add(w_name)
            quantized.append(q.name)
        for t in graph.initializer:                                   # the rest, one tensor at a time
            if t.name not in dropped:
                if t.data_location == TensorProto.EXTERNAL:
                    _copy_external(t, src, data, data_name)
                new_inits.append(t)
    still = dropped & {i for n in graph.node for i in n.input}
    if still:
        raise NemodiffError(f"float weights {sorted(still)[:3]} are still used after quantization")
    nodes = []
    for i, n in enumerate(graph.node):
        nodes += before.get(i, [])
        nodes.append(n)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(new_inits)
    native_qdq(model)
    onnx.save_model(model, str(dst / onnx_name))
    return summarize(dst / onnx_name, quantized)


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


def _external(t, data, raw: bytes, location: str) -> None:
    offset = data.tell()
    pad = (-offset) % 64                           # aligned tensors map cleanly
    data.write(b"\0" * pad)
    offset += pad
    data.write(raw)
    _set_external(t, location, offset, len(raw))


def _set_external(t, location: str, offset: int, length: int) -> None:
    from onnx import TensorProto

    del t.external_data[:]
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    t.data_location = TensorProto.EXTERNAL
    t.ClearField("raw_data")


def _copy_external(t, src: Path, data, location: str) -> None:
    """Copy one external tensor's bytes from the source data file (memory-mapped) to `data`."""
    info = {e.key: e.value for e in t.external_data}
    path = src / info["location"]
    offset, length = int(info.get("offset", 0)), int(info.get("length", 0)) or os.path.getsize(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        out = data.tell()
        pad = (-out) % 64
        data.write(b"\0" * pad)
        out += pad
        for start in range(offset, offset + length, _COPY_CHUNK):
            data.write(mm[start:min(start + _COPY_CHUNK, offset + length)])
    _set_external(t, location, out, length)


def _pack_int4(codes: np.ndarray) -> bytes:
    """int8 codes in [-8, 7] -> ONNX INT4 packing (two per byte, first element in the low nibble)."""
    flat = (codes.reshape(-1).astype(np.int16) & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).tobytes()


def _float_np(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype({"float32": np.float32, "float16": np.float16}[name])


def _elem(dt: np.dtype) -> int:
    from onnx import TensorProto

    if dt == np.float32:
        return TensorProto.FLOAT
    if dt == np.float16:
        return TensorProto.FLOAT16
    return TensorProto.BFLOAT16


def onnx_bytes(folder: Path) -> int:
    """model.onnx + external data size on disk."""
    return sum(p.stat().st_size for p in Path(folder).glob("model.onnx*"))

