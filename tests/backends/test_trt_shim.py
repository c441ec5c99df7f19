"""Which TensorRT module the builder uses (no TensorRT needed: fake modules)."""

import sys
import types

import pytest

from nemodiff_compile.backends import trt_shim


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.setattr(trt_shim, "_CACHE", {})


def test_prefers_datacenter_tensorrt(monkeypatch):
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "11.4.0.106"
    fake.INetworkDefinition = type("INetworkDefinition", (), {"add_plugin_v3": lambda self: None})
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    t = trt_shim.load()
    assert (t.flavor, t.version, t.is_rtx, t.can_build_plugins) == ("tensorrt", "11.4.0.106", False, True)


def test_unavailable_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)       # import raises ImportError
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    with pytest.raises(trt_shim.TensorRTUnavailable, match="pip install tensorrt-rtx") as e:
        trt_shim.load()
    assert "\n" not in str(e.value) and not trt_shim.available()


def test_rtx_facts(rtx, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    t = trt_shim.load()
    assert t.is_rtx and not t.can_build_plugins and t.has("IProgressMonitor")
    assert not hasattr(t.mod.ComputeCapability, "SM90")
