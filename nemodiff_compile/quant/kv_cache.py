"""FP8 (E4M3) KV cache for quantized builds: per-layer K/V scales from the calibration decode loops,
and a pass over the saved Q/DQ graph that makes the cache tensors FLOAT8E4M3FN.

    kv = calibration_for(recipe, cfg)          # None unless recipe.kv_cache_dtype == "fp8"
    loop = kv.wrap(loop)                       # the calibration forward loop, hooked: amax of what is cached
    ...ModelOpt calibration runs `loop`, qdq writes the graph...
    spec = kv.apply(out_dir / "model.onnx", spec)  # graph pass + the I/O spec with fp8 cache tensors
    record["kv_cache"] = kv.record()           # manifest quantization block

Scales: static, one per layer for K and one for V, scale = amax / 448 over the post-RoPE keys and the
values that the decode loops actually write into the cache (causal prefill / commit / verify passes;
bidirectional passes never write it). The hook reads the reference's `StaticKVCache` after each
writing forward, so it sees exactly the cached positions.

Graph (opset 21, standard ops only, so ONNX Runtime and TensorRT read it alike):

    past_keys  FLOAT8E4M3FN [layers, B, Hkv, S, D] -> DequantizeLinear(scale [layers], axis 0) -> consumers
    producers -> new_keys_float -> QuantizeLinear(same scale, FP8 zero point, axis 0, saturate) -> new_keys FP8

(and the same for past_values / new_values). The host engine stores the returned FP8 block as-is, so
the cache holds 1 byte per element and the graph's arithmetic stays in its float dtype. Only the
graph's structure is touched (`onnx.load(..., load_external_data=False)`): the weights file is not read.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

from ..errors import NemodiffError

FP8_DTYPE = "float8_e4m3fn"         # the I/O spec's dtype name (torch / ml_dtypes spelling)
FP8_ONNX = "FLOAT8E4M3FN"
FP8_MAX = 448.0
# graph input -> the graph output carrying the block's new entries of the same cache
CACHE_TENSORS = {"past_keys": "new_keys", "past_values": "new_values"}
_MIN_AMAX = 1e-6                    # a layer whose cache stayed all zeros still gets a usable scale


def calibration_for(recipe, cfg) -> "KVCacheCalibration | None":
    """The calibration an fp8 cache needs, None for kv_cache_dtype "model"."""
    return KVCacheCalibration(cfg.num_hidden_layers) if recipe.kv_cache_dtype == "fp8" else None


class KVCacheCalibration:
    """Running per-layer amax of the K and V written into the cache during calibration."""

    def __init__(self, num_layers: int):
        self.k_amax = [0.0] * num_layers
        self.v_amax = [0.0] * num_layers
        self.positions = 0                  # cached positions observed (summed over rows)
        self.summary: dict[str, int] = {}   # Q/DQ nodes the graph pass added
        self._before = None

    # ---- calibration ----------------------------------------------------------------------------

    def wrap(self, loop: Callable[[Any], None]) -> Callable[[Any], None]:
        """`loop(model)` with forward hooks on `model` for its duration."""

        def wrapped(model) -> None:
            handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                       model.register_forward_hook(self._post, with_kwargs=True)]
            try:
                loop(model)
            finally:
                for h in handles:
                    h.remove()
                self._before = None

        return wrapped

    def _pre(self, module, args, kwargs):
        cache = kwargs.get("cache")
        self._before = None if cache is None else cache.lengths.detach().to("cpu").clone()

    def _post(self, module, args, kwargs, output):
        cache, before = kwargs.get("cache"), self._before
        self._before = None
        if cache is None or before is None:
            return
        after = cache.lengths.detach().to("cpu")
        for b in range(len(after)):
            lo, hi = int(before[b]), int(after[b])
            if hi > lo:                                                 # this row's newly cached positions
                self.observe(cache.k[:, b, :, lo:hi], cache.v[:, b, :, lo:hi])

    def observe(self, k, v) -> None:
        """k, v [layers, ..., positions, head_dim] torch tensors of cached entries."""
        n = k.shape[0]
        if n != len(self.k_amax):
            raise NemodiffError(f"KV-cache calibration: {n} layers in the cache, expected {len(self.k_amax)}")
        ka = k.detach().float().abs().reshape(n, -1).amax(dim=1).tolist()
        va = v.detach().float().abs().reshape(n, -1).amax(dim=1).tolist()
        self.k_amax = [max(a, b) for a, b in zip(self.k_amax, ka)]
        self.v_amax = [max(a, b) for a, b in zip(self.v_amax, va)]
        self.positions += k.shape[-2]

    def scales(self) -> tuple[list[float], list[float]]:
        """(k_scale, v_scale) per layer: amax / 448."""
        if not self.positions:
            raise NemodiffError("KV-cache calibration saw no cached positions: the calibration loop wrote "
                                "nothing into the cache")
        return ([max(a, _MIN_AMAX) / FP8_MAX for a in self.k_amax],
                [max(a, _MIN_AMAX) / FP8_MAX for a in self.v_amax])

    # ---- graph and records ----------------------------------------------------------------------

    def apply(self, onnx_path: str | Path, spec):
        """Rewrite the saved graph for an FP8 cache; return `spec` with the cache tensors in FP8."""
        k, v = self.scales()
        self.summary = fp8_cache_graph(onnx_path, k, v)
        return fp8_spec(spec)

    def record(self) -> dict[str, Any]:
        k, v = self.scales()
        return {"dtype": FP8_ONNX, "granularity": "per layer", "k_scale": k, "v_scale": v,
                "k_amax": list(self.k_amax), "v_amax": list(self.v_amax), "positions": self.positions,
                "qdq_nodes": dict(self.summary)}


def fp8_spec(spec):
    """The IOSpec with past_keys / past_values / new_keys / new_values in float8_e4m3fn."""
    names = set(CACHE_TENSORS) | set(CACHE_TENSORS.values())

    def fix(ts):
        return tuple(dataclasses.replace(t, dtype=FP8_DTYPE) if t.name in names else t for t in ts)

    return dataclasses.replace(spec, inputs=fix(spec.inputs), outputs=fix(spec.outputs))


def fp8_cache_graph(onnx_path: str | Path, k_scale: list[float], v_scale: list[float]) -> dict[str, int]:
    """The graph pass (module docstring), in place and atomically; returns the Q/DQ nodes added."""
    import onnx
    from onnx import TensorProto, helper

    path = Path(onnx_path)
    m = onnx.load(str(path), load_external_data=False)
    g = m.graph
    inputs = {v.name: v for v in g.input}
    outputs = {v.name: v for v in g.output}
    missing = [n for n in (*CACHE_TENSORS, *CACHE_TENSORS.values()) if n not in inputs and n not in outputs]
    if missing:
        raise NemodiffError(f"{path}: no graph I/O named {', '.join(missing)}: not a step graph")
    ftype = inputs["past_keys"].type.tensor_type.elem_type
    if ftype == TensorProto.FLOAT8E4M3FN:
        raise NemodiffError(f"{path}: the KV cache is already FLOAT8E4M3FN")
    if ftype not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16):
        raise NemodiffError(f"{path}: past_keys is {TensorProto.DataType.Name(ftype)}, expected a float type")
    layers = inputs["past_keys"].type.tensor_type.shape.dim[0].dim_value
    if layers != len(k_scale) or layers != len(v_scale):
        raise NemodiffError(f"{path}: {layers} layers in the cache, {len(k_scale)}/{len(v_scale)} scales")

    zp = "kv_cache.fp8_zero_point"
    g.initializer.append(helper.make_tensor(zp, TensorProto.FLOAT8E4M3FN, [layers], [0.0] * layers))
    head, tail = [], []
    for (past, new), scale in zip(CACHE_TENSORS.items(), (k_scale, v_scale)):
        s = f"kv_cache.{past}.scale"
        # the scale in the graph's float dtype: DequantizeLinear's output type is the scale's
        g.initializer.append(helper.make_tensor(s, ftype, [layers], [float(x) for x in scale]))
        deq = f"{past}_dequantized"
        _rename(g, past, deq, outputs=False)
        head.append(helper.make_node("DequantizeLinear", [past, s], [deq], name=f"kv_cache/{past}/DQ", axis=0))
        inputs[past].type.tensor_type.elem_type = TensorProto.FLOAT8E4M3FN
        flt = f"{new}_float"
        _rename(g, new, flt, outputs=True)
        tail.append(helper.make_node("QuantizeLinear", [flt, s, zp], [new], name=f"kv_cache/{new}/Q",
                                     axis=0, saturate=1))
        outputs[new].type.tensor_type.elem_type = TensorProto.FLOAT8E4M3FN
    nodes = head + list(g.node) + tail          # DQ read only graph inputs; Q come after every producer
    del g.node[:]
    g.node.extend(nodes)
    tmp = path.with_name(f".{path.name}.kv.tmp")
    try:
        onnx.save(m, str(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"QuantizeLinear": len(tail), "DequantizeLinear": len(head)}


def _rename(g, old: str, new: str, *, outputs: bool) -> None:
    """Every use of value `old` as a node input (and, outputs=True, its producer's output and its
    value_info) becomes `new`, in subgraphs too."""
    for node in g.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        if outputs:
            for i, name in enumerate(node.output):
                if name == old:
                    node.output[i] = new
        for attr in node.attribute:
            for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                _rename(sub, old, new, outputs=False)     # outer-scope reads only
    if outputs:
        for vi in g.value_info:
            if vi.name == old:
                vi.name = new
