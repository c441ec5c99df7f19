"""Which TensorRT: the datacenter `tensorrt` module when importable, else `tensorrt_rtx`. Imported late.

Both expose the same Python API names for what the builder uses (Builder, OnnxParser, strongly typed
networks, optimization profiles, IProgressMonitor, IPluginCreatorV3One, the plugin registry). What
differs, measured here (CPU-only machine, `pip install tensorrt-rtx` = 1.7.1.116, 2026-11):

  - tensorrt_rtx builds engines ahead of time without a GPU (`build_serialized_network` works); its
    Runtime cannot deserialize them here ("cudaError 35: CUDA driver version is insufficient"), so
    the engine inspector is unreachable on this machine (see trt/precision.py for the fallback).
  - tensorrt_rtx targets compute capabilities through `IBuilderConfig.set_compute_capability` with
    `ComputeCapability` in {SM75, SM80, SM86, SM89, SM120, SM121}: no SM90 (H100/H200), those need
    the datacenter module on the GPU itself.
  - tensorrt_rtx keeps the timing-cache API but documents it as a no-op ("Timing cache operations
    are no-ops in TensorRT-RTX", DeprecationWarning since 1.2); we still load/save it, it stays empty.
  - `tensorrt_rtx.plugin` (Python-defined plugins, AOT) fails to import in that wheel; Python
    IPluginV3 classes (IPluginCreatorV3One, IPluginV3OneCore/Build/Runtime) are present and work.
  - hardware compatibility levels (AMPERE_PLUS, SAME_COMPUTE_CAPABILITY) are accepted by tensorrt_rtx
    (same plan size as NONE for a small graph); BuilderFlag.VERSION_COMPATIBLE makes its build fail
    ("Unable to load library: libnvinfer_lean.so.1"), so the builder refuses it there up front.
  - `ILayer.precision` does not exist (strongly typed only); `ILayer.get_output_type` does.
  - tensorrt_rtx cannot build custom plugin layers: `INetworkDefinition` has no `add_plugin_v3` (nor
    any add_plugin*), and its ONNX parser, after resolving our registered `nemodiff::Remask` creator
    ("Successfully created plugin: Remask" in its log), ends the process with std::terminate. So the
    `--remask plugin` graph is refused up front on tensorrt_rtx (`can_build_plugins`); it builds only
    with the datacenter module, which has `add_plugin_v3` (TensorRT >= 10).
  - CUDA graphs on tensorrt_rtx: a context is stream capturable only for plans built with
    `BuilderFlag.REQUIRE_USER_ALLOCATION` (the builder sets it; the runtime asks
    `IExecutionContext.is_stream_capturable(stream)` and runs uncaptured otherwise). Its built-in graphs
    exist in the 1.7.1 Python bindings as `ICudaEngine.create_runtime_config()`,
    `IRuntimeConfig.cuda_graph_strategy = CudaGraphStrategy.WHOLE_GRAPH_CAPTURE` and
    `create_execution_context(runtime_config=...)` (spellings read from the module here, not run); the
    runtime does not use them: it captures one graph per context itself, the same way on both modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from ..errors import NemodiffError

MODULES = ("tensorrt", "tensorrt_rtx")
INSTALL_HINT = ("pip install tensorrt-rtx (CPU ahead-of-time builds, RTX targets) or install TensorRT "
                "from NVIDIA's index on the GPU machine (pip install tensorrt)")


class TensorRTUnavailable(NemodiffError):
    """Neither tensorrt nor tensorrt_rtx can be imported."""


@dataclass(frozen=True)
class Trt:
    mod: ModuleType
    flavor: str           # "tensorrt" | "tensorrt_rtx"
    version: str

    @property
    def is_rtx(self) -> bool:
        return self.flavor == "tensorrt_rtx"

    @property
    def can_build_plugins(self) -> bool:
        """Whether networks of this module can hold IPluginV3 layers (see the module docstring)."""
        return self.has("INetworkDefinition", "add_plugin_v3")

    def has(self, *path: str) -> bool:
        """Whether mod.a.b... exists: feature checks instead of version checks."""
        obj = self.mod
        for p in path:
            if not hasattr(obj, p):
                return False
            obj = getattr(obj, p)
        return True


_CACHE: dict[tuple[str, ...], Trt] = {}


def load(prefer: tuple[str, ...] = MODULES) -> Trt:
    """Import the first of `prefer` that works; raise TensorRTUnavailable naming the install command."""
    if prefer in _CACHE:
        return _CACHE[prefer]
    import importlib

    errors = []
    for name in prefer:
        try:
            mod = importlib.import_module(name)
        except Exception as e:            # ImportError, or OSError from a missing libnvinfer
            errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        _CACHE[prefer] = Trt(mod, name, str(getattr(mod, "__version__", "unknown")))
        return _CACHE[prefer]
    raise TensorRTUnavailable(f"TensorRT is not importable ({'; '.join(errors)}): {INSTALL_HINT}")


def available() -> bool:
    try:
        load()
        return True
    except TensorRTUnavailable:
        return False
