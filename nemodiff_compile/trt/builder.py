"""ONNX -> serialized TensorRT engine, written once against the TensorRT API (`tensorrt` or `tensorrt_rtx`).

    plan, info = build_plan(onnx_path, io_spec=..., buckets=..., precision="fp16", target="sm89")

What it does, in order: register our plugin creators (before parsing, the parser looks them up by
name/version/namespace), parse the ONNX from its path (external weights resolve beside it), as a
strongly typed network; check GEMM precisions on the network (precision.py); one optimization
profile per batch bucket (profiles.py); memory-pool limits; a progress monitor; the compatibility
options; the target compute capability; the persistent timing cache; build; and, where a runtime can
deserialize the plan (a GPU), the engine inspector's layer report.

Executed here only with tensorrt_rtx 1.7.1 on CPU. Never executed here: anything on the datacenter
`tensorrt` module, `Runtime.deserialize_cuda_engine` + `create_engine_inspector` (needs a GPU), a
non-empty timing cache (no-op in TensorRT-RTX).
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..build_config import HW_LEVELS
from ..errors import InvalidArgument, NemodiffError
from . import precision as precision_check
from ..artifact.profiles import make_profiles
from ..artifact.targets import DeviceInfo, current_device, parse_target
from ..backends.trt_shim import Trt, load



@dataclass(frozen=True)
class BuildOptions:
    workspace_bytes: int | None = None           # MemoryPoolType.WORKSPACE limit (None: TensorRT's default)
    tactic_bytes: int | None = None              # MemoryPoolType.TACTIC_DRAM limit
    hardware_compatibility: str = "NONE"         # NONE | AMPERE_PLUS | SAME_COMPUTE_CAPABILITY
    version_compatible: bool = False             # BuilderFlag.VERSION_COMPATIBLE
    optimization_level: int | None = None        # builder_optimization_level 0..5
    timing_cache_dir: Path | None = None         # default ~/.cache/nemodiff-compile/timing
    check_precision: bool = True


class TrtBuildError(NemodiffError):
    """The TensorRT parser or builder rejected the graph."""


@dataclass
class PlanInfo:
    target: str
    trt_module: str
    trt_version: str
    build_seconds: float
    precision_check: dict[str, Any]
    profiles: list[dict[str, Any]]
    plugins: list[str]
    timing_cache: dict[str, Any]
    phases: list[str] = field(default_factory=list)


def _logger(trt: Trt, messages: list[str]):
    mod = trt.mod

    class Logger(mod.ILogger):
        def __init__(self):
            mod.ILogger.__init__(self)

        def log(self, severity, msg):
            if severity <= mod.ILogger.Severity.ERROR:
                messages.append(str(msg))

    return Logger()


def _progress_monitor(trt: Trt, report: Callable[[str], None], phases: list[str]):
    """IProgressMonitor reporting top-level phases (where the module has it; both flavors do)."""
    mod = trt.mod

    class Monitor(mod.IProgressMonitor):
        def __init__(self):
            mod.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            phases.append(phase_name)
            if parent_phase is None or parent_phase == "Building engine":
                report(f"tensorrt: {phase_name}")

        def step_complete(self, phase_name, step):
            return True          # False would cancel the build

        def phase_finish(self, phase_name):
            pass

    return Monitor()


def timing_cache_path(trt: Trt, target: str, cache_dir: Path | None, device: DeviceInfo | None = None) -> Path:
    """One cache per TensorRT version and GPU: the GPU's name where the build runs on it (H100 and H200
    share sm90 but not timings), else the target (ahead-of-time builds time nothing)."""
    import re

    base = Path(cache_dir or os.environ.get("NEMODIFF_TIMING_CACHE")
                or Path.home() / ".cache" / "nemodiff-compile" / "timing")
    gpu = target
    if device is not None and device.target == target:
        gpu = f"{target}-{re.sub(r'[^A-Za-z0-9]+', '_', device.name).strip('_')}"
    return base / f"{trt.flavor}-{trt.version}-{gpu}.cache"


def resolve_target(trt: Trt, target: str | None, device: DeviceInfo | None) -> str:
    """The compute capability to build for. tensorrt_rtx: any it lists (AOT, no GPU needed);
    tensorrt: tactics are timed on the GPU it runs on, so only this GPU's."""
    if target is None:
        if device is None:
            if trt.is_rtx:
                raise InvalidArgument("--gpus: no GPU here to build for; name the targets (e.g. --gpus sm89,sm86)")
            raise InvalidArgument("--backend tensorrt: no CUDA GPU visible; the tensorrt module builds on the "
                                  "GPU it targets (or install tensorrt-rtx for CPU builds of RTX targets)")
        return device.target
    name = "sm{}{}".format(*parse_target(target))
    if trt.is_rtx:
        if not hasattr(trt.mod.ComputeCapability, name.upper()):
            have = [c.lower() for c in trt.mod.ComputeCapability.__members__ if c.startswith("SM")]
            raise InvalidArgument(f"--gpus {name}: {trt.flavor} {trt.version} cannot target it (it targets "
                                  f"{', '.join(have)}); build {name} on that GPU with the tensorrt module")
        return name
    if device is None or device.target != name:
        here = device.target if device else "no GPU"
        raise InvalidArgument(f"--gpus {name}: tensorrt builds for the GPU it runs on ({here}); run this "
                              f"build on a {name} machine to add that target")
    return name


def build_plan(onnx_path: str | Path, *, io_spec: dict[str, Any], buckets: dict[str, Any], precision: str,
               target: str | None = None, options: BuildOptions = BuildOptions(),
               progress: Callable[[str], None] = lambda m: None, trt: Trt | None = None,
               device: DeviceInfo | None = None, profiles: list | None = None) -> tuple[bytes, PlanInfo]:
    """profiles: the optimization profiles (artifact.profiles.Profile); default one per batch bucket of
    `buckets` (the step graph's)."""
    from ..kernels.registry import graph_plugin_ids, register_plugins

    trt = trt or load()
    mod = trt.mod
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise InvalidArgument(f"{onnx_path}: ONNX file not found")
    if precision not in precision_check.EXPECTED:
        raise InvalidArgument(f"--precision {precision}: the TensorRT builder checks "
                              f"{', '.join(precision_check.EXPECTED)}")
    if options.hardware_compatibility not in HW_LEVELS:
        raise InvalidArgument(f"--hardware-compatibility {options.hardware_compatibility}: expected one of "
                              f"{', '.join(HW_LEVELS)}")
    if not trt.has("HardwareCompatibilityLevel", options.hardware_compatibility):     # SAME_COMPUTE_CAPABILITY: 10.9+
        raise InvalidArgument(f"--hardware-compatibility {options.hardware_compatibility}: {trt.flavor} "
                              f"{trt.version} does not have it (TensorRT 10.9 added SAME_COMPUTE_CAPABILITY)")
    if options.version_compatible and trt.is_rtx:
        raise InvalidArgument(f"--version-compatible: {trt.flavor} {trt.version} cannot build version-compatible "
                              "engines (it needs libnvinfer_lean, which its wheel lacks); build them with the "
                              "tensorrt module")
    device = device if device is not None else current_device()
    target = resolve_target(trt, target, device)

    needed = graph_plugin_ids(onnx_path)
    if needed:
        if not trt.can_build_plugins:
            raise TrtBuildError(f"{onnx_path}: needs plugin layer(s) {', '.join(p.qualified_version for p in needed)}, "
                                f"which {trt.flavor} {trt.version} cannot build (no INetworkDefinition.add_plugin_v3; "
                                "its parser aborts the process on them): export with --remask onnx, or build "
                                "with the tensorrt module")
        register_plugins(trt, needed)
    errors: list[str] = []
    logger = _logger(trt, errors)
    builder = mod.Builder(logger)
    flags = 0
    if trt.has("NetworkDefinitionCreationFlag", "STRONGLY_TYPED"):
        flags = 1 << int(mod.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = mod.OnnxParser(network, logger)
    progress(f"parsing {onnx_path.name} ({trt.flavor} {trt.version})")
    if not parser.parse_from_file(str(onnx_path)):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)] or errors
        raise TrtBuildError(f"{onnx_path}: the TensorRT ONNX parser rejected the graph: "
                            f"{errs[0].splitlines()[0] if errs else 'no message'}")

    report = precision_check.check_network(network, mod, precision)
    if options.check_precision:
        report.raise_if_failed(str(onnx_path))

    config = builder.create_builder_config()
    profiles = profiles or make_profiles(io_spec, buckets)
    for p in profiles:
        prof = builder.create_optimization_profile()
        for name, (lo, opt, hi) in p.shapes.items():
            prof.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(prof)
    if options.workspace_bytes is not None:
        config.set_memory_pool_limit(mod.MemoryPoolType.WORKSPACE, int(options.workspace_bytes))
    if options.tactic_bytes is not None and hasattr(mod.MemoryPoolType, "TACTIC_DRAM"):
        config.set_memory_pool_limit(mod.MemoryPoolType.TACTIC_DRAM, int(options.tactic_bytes))
    if options.optimization_level is not None:
        config.builder_optimization_level = int(options.optimization_level)
    config.profiling_verbosity = mod.ProfilingVerbosity.DETAILED       # layer info for the inspector
    set_compatibility(config, trt, options)
    if trt.is_rtx:
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(mod.ComputeCapability, target.upper()), 0)
    phases: list[str] = []
    if trt.has("IProgressMonitor"):
        config.progress_monitor = _progress_monitor(trt, progress, phases)

    cache_file = timing_cache_path(trt, target, options.timing_cache_dir, device)
    cache_info = _load_timing_cache(trt, config, cache_file)

    progress(f"building the {target} engine ({len(profiles)} profile(s))")
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if plan is None:
        raise TrtBuildError(f"{onnx_path}: TensorRT could not build the {target} engine: "
                            f"{errors[-1].splitlines()[0] if errors else 'no message'}")
    cache_info.update(_save_timing_cache(trt, config, cache_file))
    data = bytes(plan)

    if device is not None and device.target == target:
        report = _inspect(trt, data, precision, logger, version_compatible=options.version_compatible) or report
        if options.check_precision:
            report.raise_if_failed(f"{onnx_path} ({target} engine)")
    info = PlanInfo(target=target, trt_module=trt.flavor, trt_version=trt.version, build_seconds=round(seconds, 3),
                    precision_check=report.to_json(), profiles=[p.to_json() for p in profiles],
                    plugins=[p.qualified_version for p in needed], timing_cache=cache_info, phases=phases[:8])
    return data, info


def set_compatibility(config, trt: Trt, options: BuildOptions) -> None:
    """Hardware / version compatibility, and what tensorrt_rtx needs for CUDA-graph capture."""
    mod = trt.mod
    config.hardware_compatibility_level = getattr(mod.HardwareCompatibilityLevel, options.hardware_compatibility)
    if options.version_compatible:
        config.set_flag(mod.BuilderFlag.VERSION_COMPATIBLE)
    if trt.is_rtx and trt.has("BuilderFlag", "REQUIRE_USER_ALLOCATION"):
        # tensorrt_rtx captures a context's enqueue in a CUDA graph only when every allocation is the
        # user's (IExecutionContext::isStreamCapturable); the runtime gives it all (USER_MANAGED memory,
        # static outputs)
        config.set_flag(mod.BuilderFlag.REQUIRE_USER_ALLOCATION)


def _load_timing_cache(trt: Trt, config, path: Path) -> dict[str, Any]:
    if not hasattr(config, "create_timing_cache"):
        return {"path": None, "note": "no timing-cache API"}
    blob = path.read_bytes() if path.is_file() else b""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)     # tensorrt_rtx: "no-ops in TensorRT-RTX"
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, False)
    return {"path": str(path), "loaded_bytes": len(blob),
            "note": "no-op in TensorRT-RTX" if trt.is_rtx else "keyed by TensorRT version and GPU target"}


def _save_timing_cache(trt: Trt, config, path: Path) -> dict[str, Any]:
    if not hasattr(config, "get_timing_cache"):
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        cache = config.get_timing_cache()
        blob = bytes(cache.serialize()) if cache is not None else b""
    if not blob:
        return {"saved_bytes": 0}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".timing.", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)
    return {"saved_bytes": len(blob)}


def _inspect(trt: Trt, plan: bytes, precision: str, logger, *, version_compatible: bool = False):
    """The engine inspector's layer report, or None where the plan cannot be deserialized here or the
    inspector lists no GEMM layer (all inside Myelin regions: the network check stands). Not executed on
    this CPU machine (no GPU): written from the IEngineInspector docs, tested against a fake runtime."""
    mod = trt.mod
    runtime = mod.Runtime(logger)
    if version_compatible:
        runtime.engine_host_code_allowed = True      # else a version-compatible plan deserializes to None
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        return None
    inspector = engine.create_engine_inspector()
    info = inspector.get_engine_information(mod.LayerInformationFormat.JSON)
    report = precision_check.check_inspector(info, precision)
    return report if report.gemms else None
