"""Fail a build whose GEMMs do not run in the precision that was asked for (the silent-FP32 engine).

TensorRT 11 and TensorRT-RTX are strongly typed: a layer's precision is its input types, fixed by
the graph (dtypes, and Q/DQ for fp8/int8). Two readers, one verdict:

  check_network(...)   the parsed, strongly typed INetworkDefinition, before the build: the type of
                       every matrix-multiply input and, for fp8/int8, whether it is dequantized from
                       that type. Runs everywhere (it is what the CPU tests exercise).
  check_inspector(...) the built engine's layer information (IEngineInspector, JSON, DETAILED
                       verbosity): the Format/Datatype of every GEMM-like layer. Needs a deserialized
                       engine, i.e. a GPU: tensorrt_rtx on this CPU machine cannot deserialize
                       ("cudaError 35"), so this path is written against the documented JSON layout
                       and tested only on a sample of that layout, never on a real engine here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import NemodiffError

# precision -> (GEMM input type name in TensorRT's DataType, quantized?)
EXPECTED = {"fp32": ("FLOAT", False), "fp16": ("HALF", False), "bf16": ("BF16", False),
            "fp8": ("FP8", True), "int8": ("INT8", True)}
# the engine inspector's "Format/Datatype" strings ("Row major linear FP16 format", "Float", "Half",
# "BFloat16", "Int8", ...) -> DataType names: upper-cased substrings, most specific first (Polygraphy's
# backend/trt/util.py matches the same way, BFLOAT16 before FLOAT); "FLOAT" alone is float32
_INSPECTOR_FORMATS = (("BFLOAT16", "BF16"), ("BF16", "BF16"), ("FP8", "FP8"), ("FLOAT8", "FP8"), ("E4M3", "FP8"),
                      ("FP16", "HALF"), ("HALF", "HALF"), ("FLOAT16", "HALF"), ("FP4", "FP4"), ("INT8", "INT8"),
                      ("INT4", "INT4"), ("INT32", "INT32"), ("INT64", "INT64"), ("BOOL", "BOOL"), ("FP32", "FLOAT"),
                      ("FLOAT", "FLOAT"))


class PrecisionError(NemodiffError):
    """Layers run in another precision than the one requested."""


@dataclass
class PrecisionReport:
    requested: str
    source: str                                   # "network" | "engine_inspector"
    gemms: int = 0
    in_precision: int = 0
    offenders: list[str] = field(default_factory=list)     # "layer: types"
    unquantized: list[str] = field(default_factory=list)   # fp8/int8: GEMMs left in high precision

    @property
    def passed(self) -> bool:
        if self.gemms == 0:
            return False
        if EXPECTED[self.requested][1]:
            return self.in_precision > 0 and not self.offenders
        return not self.offenders

    def to_json(self) -> dict[str, Any]:
        return {"requested": self.requested, "source": self.source, "gemms": self.gemms,
                "in_precision": self.in_precision, "offenders": self.offenders[:20],
                "unquantized": self.unquantized[:20], "passed": self.passed}

    def raise_if_failed(self, what: str) -> None:
        if self.passed:
            return
        if self.gemms == 0:
            raise PrecisionError(f"{what}: no matrix-multiply layers found to check ({self.source})")
        if EXPECTED[self.requested][1] and self.in_precision == 0:
            raise PrecisionError(f"{what}: --precision {self.requested} requested but none of the "
                                 f"{self.gemms} matrix multiplies is fed by {self.requested} Q/DQ "
                                 "(the graph is not quantized)")
        shown = "; ".join(self.offenders[:3])
        raise PrecisionError(f"{what}: --precision {self.requested} requested but {len(self.offenders)} of "
                             f"{self.gemms} matrix multiplies run in another precision ({shown}): export "
                             f"the graph in {self.requested} or build with the precision it has")


def check_network(network, trt_mod, precision: str) -> PrecisionReport:
    """Inspect a parsed strongly typed network (INetworkDefinition of `trt_mod`)."""
    want, quantized = EXPECTED[precision]
    rep = PrecisionReport(precision, "network")
    producer = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            producer[layer.get_output(j).name] = layer
    gemm_types = {trt_mod.LayerType.MATRIX_MULTIPLY, trt_mod.LayerType.CONVOLUTION}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type not in gemm_types:
            continue
        rep.gemms += 1
        ins = [layer.get_input(j) for j in range(layer.num_inputs) if layer.get_input(j) is not None]
        if quantized:
            src = [_dequantized_from(t, producer, trt_mod) for t in ins]
            if all(s == want for s in src[:2]):
                rep.in_precision += 1
            elif any(s is not None and s != want for s in src[:2]):
                rep.offenders.append(f"{layer.name}: dequantized from {src[:2]}")
            else:
                rep.unquantized.append(f"{layer.name}: {[t.dtype.name for t in ins[:2]]}")
        else:
            types = [t.dtype.name for t in ins[:2]]
            if all(t == want for t in types):
                rep.in_precision += 1
            else:
                rep.offenders.append(f"{layer.name}: {types}")
    return rep


def _dequantized_from(tensor, producer: dict, trt_mod) -> str | None:
    """The type a GEMM input is dequantized from, looking through layout-only shuffles (the parser
    turns a Gemm's transB or a Transpose into one; TensorRT moves the DQ past it when fusing), or None."""
    p = producer.get(tensor.name)
    while p is not None and p.type == trt_mod.LayerType.SHUFFLE and p.get_input(0) is not None:
        p = producer.get(p.get_input(0).name)
    if p is not None and p.type == trt_mod.LayerType.DEQUANTIZE and p.get_input(0) is not None:
        return p.get_input(0).dtype.name
    return None


# GEMM-like layers, by the inspector's LayerType only (never by name: a Myelin region may be named after
# a MatMul it contains while its listed inputs are the region's boundary tensors)
_GEMM_LAYER_TYPES = ("matrixmultiply", "gemm", "convolution")


def inspector_dtype(fmt: str) -> str:
    """An inspector "Format/Datatype" string -> a TensorRT DataType name (the string itself if unknown)."""
    up = fmt.upper()
    return next((name for word, name in _INSPECTOR_FORMATS if word in up), fmt)


def check_inspector(info_json: str, precision: str) -> PrecisionReport:
    """Inspect IEngineInspector.get_engine_information(LayerInformationFormat.JSON) at DETAILED verbosity.

    Documented layout: {"Layers": [{"Name", "LayerType", "Inputs": [{"Name", "Format/Datatype"}], ...}]}.
    Myelin-fused regions show up as one layer (LayerType "Myelin") whose inputs are the region's boundary
    tensors; their inner GEMMs are not listed, so they are not counted (the builder keeps the network
    check's verdict when the inspector lists no GEMM at all).
    """
    want, quantized = EXPECTED[precision]
    rep = PrecisionReport(precision, "engine_inspector")
    info = json.loads(info_json)
    for layer in info.get("Layers", []):
        if isinstance(layer, str):        # LAYER_NAMES_ONLY verbosity: nothing to check
            continue
        kind = str(layer.get("LayerType", "")).lower()
        if not any(w in kind for w in _GEMM_LAYER_TYPES):
            continue
        rep.gemms += 1
        types = [inspector_dtype(t.get("Format/Datatype", "")) for t in layer.get("Inputs", [])[:2]]
        if all(t == want for t in types):
            rep.in_precision += 1
        elif quantized and all(t in ("FLOAT", "HALF", "BF16") for t in types):
            rep.unquantized.append(f"{layer.get('Name')}: {types}")
        else:
            rep.offenders.append(f"{layer.get('Name')}: {types}")
    return rep
