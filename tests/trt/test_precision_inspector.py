"""The engine-inspector reader of the precision check, on the documented JSON layout (no engine here:
deserializing needs a GPU, so this sample stands in for IEngineInspector output)."""

import json

import pytest

from nemodiff_compile.trt.precision import PrecisionError, check_inspector


def _info(fmt_a, fmt_b):
    return json.dumps({"Layers": [
        {"Name": "node_linear", "LayerType": "MatrixMultiply",
         "Inputs": [{"Name": "x", "Format/Datatype": fmt_a}, {"Name": "w", "Format/Datatype": fmt_b}]},
        {"Name": "node_softmax", "LayerType": "Softmax",
         "Inputs": [{"Name": "y", "Format/Datatype": "Row major linear FP32"}]},
    ]})


def test_fp16_engine_passes_and_silent_fp32_fails():
    ok = check_inspector(_info("Row major linear FP16 format", "Row major linear FP16 format"), "fp16")
    assert ok.passed and ok.gemms == 1                     # the FP32 softmax is not a GEMM
    bad = check_inspector(_info("Row major linear FP32", "Row major linear FP32"), "fp16")
    assert not bad.passed
    with pytest.raises(PrecisionError, match="--precision fp16 requested but 1 of 1"):
        bad.raise_if_failed("engine")


def test_quantized_engine():
    assert check_inspector(_info("Row major linear FP8 format", "Row major linear FP8 format"), "fp8").passed
    rep = check_inspector(_info("Row major linear FP16 format", "Row major linear FP16 format"), "fp8")
    with pytest.raises(PrecisionError, match="not quantized"):
        rep.raise_if_failed("engine")


def _layers(*layers):
    return json.dumps({"Layers": [{"Name": n, "LayerType": t, "Inputs": [{"Name": "x", "Format/Datatype": a},
                                                                         {"Name": "w", "Format/Datatype": b}]}
                                  for n, t, a, b in layers]})


@pytest.mark.parametrize("precision, fmt", [
    ("fp32", "Float"), ("fp32", "Row major linear FP32"), ("fp16", "Half"), ("fp16", "Row major linear FP16 format"),
    ("fp16", "Two wide channel vectorized row major FP16 format"), ("bf16", "BFloat16"),
    ("bf16", "Row major linear BFloat16 format"), ("fp8", "Row major linear FP8 format"), ("int8", "Int8"),
    ("int8", "Channel major INT8 format where channel % 4 == 0")])
def test_the_inspectors_real_spellings(precision, fmt):
    """Formats as real engines print them, matched as Polygraphy does (upper-cased substrings, BFloat16 before
    Float): a GEMM in the asked precision passes whatever the spelling [4]."""
    rep = check_inspector(_layers(("gemm", "CaskGemmMatrixMultiply", fmt, fmt)), precision)
    assert rep.passed and rep.gemms == rep.in_precision == 1, rep.to_json()


def test_gemms_are_classified_by_layer_type_only():
    """A Myelin region named after a MatMul it holds, whose listed inputs are its float boundary tensors, is
    not a GEMM of the check (its inner GEMMs are not listed); the old name match refused every such fp16
    engine. An fp16 engine whose only GEMM layers are Myelin regions lists none: the builder keeps the
    network check's verdict then."""
    info = _layers(("{ForeignNode[/layers.0/MatMul.../down_proj/MatMul]}", "Myelin", "Float", "Float"),
                   ("/head/MatMul", "CaskGemmMatrixMultiply", "Half", "Half"))
    rep = check_inspector(info, "fp16")
    assert rep.passed and rep.gemms == 1
    only_myelin = check_inspector(_layers(("/layers.0/MatMul_region", "Myelin", "Float", "Float")), "fp16")
    assert only_myelin.gemms == 0
