"""A fake TensorRT runtime for the CPU tests of backends/trt.py: the rules NVIDIA documents are enforced
(the desk check, team research note trt_desk_check.md), and every pass is computed by ONNX Runtime over
the very pointers and shapes the runtime bound, so a wrong binding gives wrong tokens or an error.

Rules enforced:
  - a context whose enqueue was captured into a CUDA graph may not change its profile, input shapes,
    tensor addresses or device memory afterwards, and a graph replays only the state it captured
    (TensorRT-RTX best practices: one execution context per captured graph; replay after modifying
    the captured context is undefined)
  - deserialize_cuda_engine returns None for a version-compatible plan unless
    Runtime.engine_host_code_allowed was set first
  - USER_MANAGED contexts need set_device_memory (at least device_memory_size_v2 bytes) before enqueue
  - set_optimization_profile_async / set_input_shape / set_tensor_address return False for an unknown
    profile or name or a shape outside the profile; execute_async_v3 returns False with unset shapes or
    addresses
  - is_stream_capturable is what the plan says (tensorrt_rtx without kREQUIRE_USER_ALLOCATION: False)
  - the engine inspector answers with the spellings real engines use ("Row major linear FP16 format",
    "Half", "Float", "BFloat16", Myelin regions named after the MatMuls they hold)
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from types import SimpleNamespace

from nemodiff_compile.backends.graphs import GraphPool

ELEM = {"float32": 1, "int64": 7, "bool": 9, "float16": 10, "bfloat16": 16, "int32": 6, "float8_e4m3fn": 17}


class FakeTrtError(AssertionError):
    """The runtime did something TensorRT documents as undefined."""


def make_plan(onnx_path, io_spec: dict, profiles: list, *, version_compatible: bool = False,
              capturable: bool = True, inspector: dict | None = None) -> bytes:
    return json.dumps({"fake_plan": 1, "onnx": str(onnx_path), "io_spec": io_spec,
                       "profiles": [p.to_json() for p in profiles], "version_compatible": version_compatible,
                       "capturable": capturable, "inspector": inspector or {"Layers": []}}).encode()


class FakeTensorRT:
    """Stands in for the `tensorrt` module (the names backends/trt.py and trt/builder.py use)."""

    __version__ = "10.13.0"
    ExecutionContextAllocationStrategy = SimpleNamespace(STATIC=0, ON_PROFILE_CHANGE=1, USER_MANAGED=2)
    ProfilingVerbosity = SimpleNamespace(NONE=0, LAYER_NAMES_ONLY=1, DETAILED=2)
    LayerInformationFormat = SimpleNamespace(ONELINE=0, JSON=1)

    class Logger:
        WARNING = 2

        def __init__(self, severity=None):
            self.severity = severity

    def __init__(self):
        self.capturing: list | None = None          # set by FakeGraphPool while a graph is recorded
        self.runtimes: list[FakeRuntime] = []
        self.engines: list[FakeEngine] = []
        self.ort_runs = 0

    def Runtime(self, logger):                      # noqa: N802 (TensorRT's spelling)
        rt = FakeRuntime(self)
        self.runtimes.append(rt)
        return rt


class FakeRuntime:
    def __init__(self, fake: FakeTensorRT):
        self.fake = fake
        self.engine_host_code_allowed = False

    def deserialize_cuda_engine(self, data: bytes):
        plan = json.loads(bytes(data))
        if plan["version_compatible"] and not self.engine_host_code_allowed:
            return None                             # TensorRT: "engine host code not allowed" + nullptr
        engine = FakeEngine(plan, self.fake)
        self.fake.engines.append(engine)
        return engine


class FakeEngine:
    def __init__(self, plan: dict, fake: FakeTensorRT):
        self.plan, self.fake = plan, fake
        self.num_optimization_profiles = len(plan["profiles"])
        self.contexts: list[FakeContext] = []
        self.inputs = {t["name"]: t for t in plan["io_spec"]["inputs"]}
        self.outputs = {t["name"]: t for t in plan["io_spec"]["outputs"]}
        self._session = None

    def get_device_memory_size_for_profile_v2(self, profile: int) -> int:
        return 4096 * (profile + 1)

    @property
    def device_memory_size_v2(self) -> int:
        return max(self.get_device_memory_size_for_profile_v2(p) for p in range(self.num_optimization_profiles))

    def create_execution_context(self, strategy=0):
        ctx = FakeContext(self, strategy)
        self.contexts.append(ctx)
        return ctx

    def create_engine_inspector(self):
        return SimpleNamespace(get_engine_information=lambda fmt: json.dumps(self.plan["inspector"]))

    def run(self, shapes: dict, addresses: dict) -> None:
        """One pass with ONNX Runtime over the bound pointers and shapes."""
        from nemodiff_compile.artifact.profiles import _resolve

        io = self.session().io_binding()
        if "merge_patch" in self.plan["io_spec"]:       # the vision graph: tokens from the image size, as TensorRT
            m, (_, H, W) = self.plan["io_spec"]["merge_patch"], shapes["pixels"]        # infers it from the graph
            dims = {"height": H, "width": W, "tokens": (H // m) * (W // m)}
        else:
            dims = {"batch": shapes["input_ids"][0], "block": shapes["input_ids"][1],
                    "cache_len": shapes["past_keys"][3]}
        for name, t in self.inputs.items():
            io.bind_input(name, "cpu", 0, ELEM[t["dtype"]], list(shapes[name]), addresses[name])
        for name, t in self.outputs.items():
            io.bind_output(name, "cpu", 0, ELEM[t["dtype"]], list(_resolve(t["shape"], dims)), addresses[name])
        self.session().run_with_iobinding(io)
        self.fake.ort_runs += 1

    def session(self):
        if self._session is None:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            if self.plan["io_spec"].get("extra", {}).get("remask", {}).get("variant") == "plugin":
                from nemodiff_compile.kernels.remask.ort_op import plugin_session

                self._session = plugin_session(self.plan["onnx"], opts, ["CPUExecutionProvider"])
            else:
                self._session = ort.InferenceSession(self.plan["onnx"], opts, providers=["CPUExecutionProvider"])
        return self._session


class FakeContext:
    def __init__(self, engine: FakeEngine, strategy):
        self.engine, self.strategy = engine, strategy
        self.profile: int | None = None
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.memory: tuple[int, int] | None = None
        self.captured = False
        self.nvtx_verbosity = FakeTensorRT.ProfilingVerbosity.DETAILED
        self.executions = 0

    def _mutable(self, what: str) -> None:
        if self.captured:
            raise FakeTrtError(f"{what} on a context whose enqueue was captured into a CUDA graph: the graph's "
                               "replay is undefined from here on (use one execution context per captured graph)")

    def set_device_memory(self, ptr: int, size: int) -> None:
        self._mutable("set_device_memory")
        if size < self.engine.device_memory_size_v2:
            raise FakeTrtError(f"set_device_memory: {size} bytes < device_memory_size_v2 {self.engine.device_memory_size_v2}")
        self.memory = (ptr, size)

    def set_optimization_profile_async(self, profile: int, stream: int) -> bool:
        self._mutable("set_optimization_profile_async")
        if not 0 <= profile < self.engine.num_optimization_profiles:
            return False
        self.profile = profile
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        self._mutable(f"set_input_shape({name})")
        if name not in self.engine.inputs:
            return False
        shape = tuple(int(s) for s in shape)
        prof = self.engine.plan["profiles"][self.profile or 0]["shapes"]
        if name in prof:
            lo, _, hi = prof[name]
            if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
                return False
        elif len(shape) != len(self.engine.inputs[name]["shape"]):
            return False
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self._mutable(f"set_tensor_address({name})")
        if name not in self.engine.inputs and name not in self.engine.outputs:
            return False
        self.addresses[name] = int(ptr)
        return True

    def is_stream_capturable(self, stream: int) -> bool:
        return bool(self.engine.plan["capturable"])

    def snapshot(self) -> tuple:
        return (self.profile, tuple(sorted(self.shapes.items())), tuple(sorted(self.addresses.items())), self.memory)

    def execute_async_v3(self, stream: int) -> bool:
        e = self.engine
        if self.strategy == FakeTensorRT.ExecutionContextAllocationStrategy.USER_MANAGED and self.memory is None:
            return False
        if set(self.shapes) != set(e.inputs) or set(self.addresses) != set(e.inputs) | set(e.outputs):
            return False
        if e.fake.capturing is not None:            # recorded, not run (stream capture)
            e.fake.capturing.append((self, self.snapshot()))
            self.captured = True
            return True
        self.compute(self.snapshot())
        return True

    def compute(self, snap: tuple) -> None:
        _, shapes, addresses, _ = snap
        self.executions += 1
        self.engine.run(dict(shapes), dict(addresses))


class FakeGraph:
    def __init__(self, records: list):
        self.records = records

    def replay(self) -> None:
        for ctx, snap in self.records:
            if ctx.snapshot() != snap:
                raise FakeTrtError("a CUDA graph replayed after its context's shapes or addresses changed")
            ctx.compute(snap)


class FakeGraphPool(GraphPool):
    """GraphPool whose capture records the fake's enqueues (the CUDA specifics replaced, as graphs.py allows)."""

    def __init__(self, fake: FakeTensorRT, **kw):
        super().__init__(**kw)
        self.fake = fake

    def _side_stream(self):
        return nullcontext()

    def _record(self, fn):
        self.fake.capturing = []
        try:
            fn()
        finally:
            records, self.fake.capturing = self.fake.capturing, None
        return FakeGraph(records)
