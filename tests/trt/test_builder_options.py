"""Builder and engine-choice rules from the TensorRT desk check: what tensorrt_rtx needs for CUDA-graph
capture, options an older TensorRT lacks, version-compatible plans across a major version."""

from types import SimpleNamespace

import pytest

from nemodiff_compile.artifact.targets import DeviceInfo, select_engine
from nemodiff_compile.backends.trt_shim import Trt
from nemodiff_compile.errors import InvalidArgument
from nemodiff_compile.trt.builder import BuildOptions, build_plan, set_compatibility


def test_rtx_plans_are_built_for_stream_capture(rtx):
    """tensorrt_rtx contexts are stream capturable only for plans built with kREQUIRE_USER_ALLOCATION [7]."""
    trt = Trt(rtx, "tensorrt_rtx", rtx.__version__)
    config = rtx.Builder(rtx.Logger(rtx.Logger.ERROR)).create_builder_config()
    assert not config.get_flag(rtx.BuilderFlag.REQUIRE_USER_ALLOCATION)
    set_compatibility(config, trt, BuildOptions(hardware_compatibility="AMPERE_PLUS"))
    assert config.get_flag(rtx.BuilderFlag.REQUIRE_USER_ALLOCATION)


def test_same_compute_capability_needs_a_tensorrt_that_has_it(tmp_path):
    """HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY exists from TensorRT 10.9 [9]: older modules get a
    sentence, not an AttributeError halfway through a build."""
    old = SimpleNamespace(HardwareCompatibilityLevel=SimpleNamespace(NONE=0, AMPERE_PLUS=1))
    (tmp_path / "m.onnx").write_bytes(b"")
    with pytest.raises(InvalidArgument, match="SAME_COMPUTE_CAPABILITY: tensorrt 10.8.0 does not have it"):
        build_plan(tmp_path / "m.onnx", io_spec={}, buckets={}, precision="fp16", target="sm89",
                   options=BuildOptions(hardware_compatibility="SAME_COMPUTE_CAPABILITY"),
                   trt=Trt(old, "tensorrt", "10.8.0"))


def test_version_compatible_plans_run_on_a_later_major():
    """TensorRT 11 runs version-compatible plans built with 10 [10]; an older runtime never does."""
    h100 = DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0))
    vc10 = {"target": "sm90", "trt_module": "tensorrt", "trt_version": "10.13.0.35", "file": "a.plan",
            "version_compatible": True}
    assert select_engine([vc10], h100, "tensorrt", "11.1.0.106") is vc10
    plain = {**vc10, "version_compatible": False}
    with pytest.raises(Exception, match=r"no TensorRT engine for this GPU .* it has: sm90 \(tensorrt 10.13.0.35\)"):
        select_engine([plain], h100, "tensorrt", "11.1.0.106")
    with pytest.raises(Exception):
        select_engine([vc10], h100, "tensorrt", "10.12.0.1")
