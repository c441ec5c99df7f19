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
