"""TensorRT backend: a built per-GPU plan (manifest["engines"]) as a `Denoiser`, replayed as CUDA graphs.

Honest status: the TensorRT calls below have not run on a GPU (development machines have no GPU, the GPU
machine has no TensorRT; tensorrt_rtx builds plans here but cannot deserialize them without one). They
follow NVIDIA's headers, Python bindings and docs as checked in the desk check (team research note
trt_desk_check.md), and the CPU tests drive this very class against a fake TensorRT that enforces the
documented rules and computes each pass with ONNX Runtime over the same bound pointers
(tests/backends/test_trt_fake.py): bookkeeping, bindings, contexts, captures and the refinement loop are
exercised there; the real API only on a GPU.

Layout (the rules it follows, desk-check items in brackets):
  - one IExecutionContext per captured pass [1]: a pass key (bucket, block length, and for the
    refinement loop the parity) owns a context whose profile, input shapes and tensor addresses are set
    once, at creation, and never again; a CUDA graph captured from it therefore stays valid (TensorRT-RTX
    best practices: graphs are specific to shapes and addresses; replay after changing the captured
    context is undefined). Passes longer than `graph_max_tokens` (prompt prefills, any length) run
    eagerly through one uncaptured context per profile that may change shapes freely.
  - all contexts share one user-managed device memory buffer [1, 5] (ExecutionContextAllocationStrategy
    .USER_MANAGED + set_device_memory, sized to the largest profile), instead of STATIC activation
    memory per context; they run on one stream, never concurrently.
  - every set_optimization_profile_async / set_input_shape / set_tensor_address / execute_async_v3
    return value is checked [6]; the CUDA device is made current before the Runtime is created [12];
    version-compatible plans get `engine_host_code_allowed` before deserializing [3]; plans built with
    DETAILED profiling get nvtx_verbosity lowered at run time [8]; a context that reports
    `is_stream_capturable(stream) == False` (tensorrt_rtx without kREQUIRE_USER_ALLOCATION) runs eagerly
    instead of being captured [7].
  - static buffers per pass key: inputs are copied into them, outputs read from them; the KV cache
    [layers, bucket, kv_heads, max_context, head_dim] is bound whole (cache_len is fixed at max_context
    in the profiles) and causal passes scatter the block's K/V into it, like the ORT backend.
Plans built with a remask stage run the compiled refinement loop (refine_stage.py): `block_refiner`
returns the shared `StageRefiner`, whose passes are `stage_pass` here (two contexts per (bucket, block),
one per ping-pong parity, each captured once).
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..artifact.buckets import BatchBuckets
from ..artifact.profiles import binding_shapes, output_shapes, profile_for, profiles_from_json
from ..artifact.spec import IOSpec, remask_stage
from ..config import ModelConfig
from ..errors import NemodiffError
from ..decoding.denoiser import StepOut
from .base import TORCH_DTYPES, BackendDenoiser, scatter_block
from .graphs import GraphPool
from .refine_stage import LoopBuffers, StageRefiner, idle_stage_feeds, loop_buffers, stage_serves


@dataclass(frozen=True)
class Binding:
    bucket: int                                   # padded batch
    block: int
    profile: int                                  # optimization profile (= execution context) index
    inputs: dict[str, tuple[int, ...]]
    outputs: dict[str, tuple[int, ...]]


class BindingPlan:
    """Pure bookkeeping: which profile and shapes a pass of (batch, block) binds. CPU-testable."""

    def __init__(self, io_spec: dict[str, Any], entry: dict[str, Any], buckets: dict[str, Any], max_len: int):
        self.io_spec, self.profiles = io_spec, profiles_from_json(entry["profiles"])
        self.buckets = BatchBuckets.built(p.batch for p in self.profiles)
        self.max_context = int(buckets["max_context"])
        if max_len != self.max_context:
            raise NemodiffError(f"max_len {max_len}: this engine's profiles bind the KV cache at exactly "
                                f"{self.max_context} positions (rebuild with --max-context {max_len})")
        self.max_len = max_len

    def plan(self, batch: int, block: int) -> Binding:
        b = self.buckets.pick(batch)
        ins = binding_shapes(self.io_spec, batch=b, block=block, cache_len=self.max_len)
        outs = output_shapes(self.io_spec, batch=b, block=block, cache_len=self.max_len)
        return Binding(b, block, profile_for(self.profiles, ins), ins, outs)


def select_plan(engine_dir: str | Path, manifest, *, device=None, trt=None) -> dict[str, Any]:
    """The manifest engine entry for this GPU and TensorRT, or a refusal naming what to build. A plan
    built on another GPU model of the same compute capability (H100 -> H200) runs, with a warning: its
    tactics were timed there [10]."""
    from ..artifact.targets import current_device, select_engine
    from .trt_shim import load

    trt = trt or load()
    device = device if device is not None else current_device()
    entry = select_engine(manifest.engines, device, trt.flavor, trt.version, engine_dir)
    if entry.get("gpu_name") and device is not None and entry["gpu_name"] != device.name:
        warnings.warn(f"{engine_dir}: {entry['file']} was built on a {entry['gpu_name']}, this is a {device.name} "
                      f"(same {device.target}): it runs, with tactics timed on the other GPU; rebuild here for "
                      f"best speed (`nemodiff-compile build --backend tensorrt --gpus {device.target} ...`)",
                      stacklevel=2)
    return entry


@dataclass
class BoundPass:
    """One pass key's context (its own, shapes and addresses set once) and the tensors bound to it."""
    context: Any
    binding: Binding
    tensors: dict[str, torch.Tensor]
    capturable: bool = True



class TrtDenoiser(BackendDenoiser):
    """GPU only in production (see the module docstring for what has and has not been executed)."""

    graph_max_tokens = 128          # passes up to this many positions get their own captured context

    def __init__(self, engine_dir: str | Path, manifest, config: ModelConfig, max_len: int | None = None, *,
                 use_cuda_graphs: bool = True, device_index: int = 0, trt=None, gpu=None,
                 device: torch.device | str | None = None, graphs: GraphPool | None = None, stream=None):
        """trt (trt_shim.Trt), gpu (artifact.targets.DeviceInfo), device, graphs and stream are for the CPU
        tests: a fake TensorRT, a fake GPU, CPU tensors, a graph pool that enforces the replay rules and a
        stand-in stream. Default: the TensorRT module, this GPU, cuda:device_index, CUDA graphs, a new stream."""
        from .trt_shim import load
        from ..kernels.registry import PluginRef, register_plugins

        engine_dir = Path(engine_dir)
        self.trt = trt or load()
        mod = self.trt.mod
        self.entry = select_plan(engine_dir, manifest, trt=self.trt, device=gpu)
        self.stage = remask_stage(manifest.io_spec, where=str(engine_dir))     # refuses an older stage's I/O
        max_len = max_len or int(manifest.buckets["max_context"])
        self.plan = BindingPlan(manifest.io_spec, self.entry, manifest.buckets, max_len)
        device = torch.device(device) if device is not None else torch.device("cuda", device_index)
        # the plans have no logits output in the hot loop
        super().__init__(config, max_len, device, buckets=self.plan.buckets)
        self.spec = manifest.io_spec
        self.io_spec = IOSpec.from_json(manifest.io_spec)
        self.row_causal = self.io_spec.causal_per_row                # older plans: one flag per pass
        self.output_names = [t["name"] for t in self.spec["outputs"]]
        self.dtypes = {t["name"]: TORCH_DTYPES[t["dtype"]] for t in (*self.spec["inputs"], *self.spec["outputs"])}
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)       # TensorRT allocates on the current device [12]
        if self.entry["plugins"]:          # the Python Remask creator must be registered before deserializing
            register_plugins(self.trt, [PluginRef.parse(p) for p in self.entry["plugins"]])
        self.stream = stream if stream is not None else torch.cuda.Stream(self.device)
        self.logger = mod.Logger(mod.Logger.WARNING)
        self.runtime = mod.Runtime(self.logger)
        if self.entry.get("version_compatible"):
            self.runtime.engine_host_code_allowed = True    # else deserialize returns None [3]
        self.engine = self.runtime.deserialize_cuda_engine((engine_dir / self.entry["file"]).read_bytes())
        if self.engine is None:
            raise NemodiffError(f"{engine_dir / self.entry['file']}: TensorRT could not deserialize it "
                                f"(see the log above); rebuild with `nemodiff-compile build --backend tensorrt "
                                f"--gpus {self.entry['target']} --output {engine_dir}`")
        self.graphs = graphs if graphs is not None else GraphPool(enabled=use_cuda_graphs)
        self.kv_dtype = TORCH_DTYPES[next(t for t in self.spec["inputs"] if t["name"] == "past_keys")["dtype"]]
        self.k = self.v = None
        self._memory = self._shared_memory()
        self._bound: dict[tuple, BoundPass] = {}        # pass key -> its own context and tensors
        self._loops: dict[tuple, LoopBuffers] = {}      # (bucket, block) -> the refinement loop's buffers
        self._eager: dict[int, Any] = {}                # profile -> the uncaptured context for long passes
        self._refiner = StageRefiner(self, self.stage) if self.stage is not None else None

    # ---- the Denoiser contract ---------------------------------------------------------------------------

    def _kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k, self.v         # (regroup copies rows into them in place: bound addresses stay valid)

    def _allocate(self, rows: int) -> None:
        self.k, self.v = self.kv_cache(rows, self.kv_dtype)
        self._bound.clear()               # their contexts point at the old cache
        self._loops.clear()
        self.graphs.clear()               # and so do the captured graphs

    @property
    def accepts_embeds(self) -> bool:
        """Plans of vision-language models take the prefill's input embeddings (embed_mask, embeds)."""
        return self.io_spec.has_input("embeds")

    def _pass(self, tokens, *, causal, write, num_valid, draft_lora, temperature, noise, embeds=None) -> StepOut:
        B, L = tokens.shape
        binding = self.plan.plan(B, L)
        captured = L <= self.graph_max_tokens
        bound = self._step_pass(binding) if captured else None
        bufs = bound.tensors if captured else self._tensors(binding)
        with self.on_stream():
            bufs["input_ids"][:B].copy_(tokens, non_blocking=True)
            bufs["cache_lengths"][:B].copy_(self._lengths, non_blocking=True)
            bufs["num_valid"][:B].copy_(num_valid, non_blocking=True)
            if binding.bucket > B:        # padding rows: an empty row with a full block, never read
                bufs["cache_lengths"][B:].zero_()
                bufs["num_valid"][B:].fill_(L)
            if isinstance(causal, torch.Tensor):         # a mixed pass: per row (padding rows bidirectional)
                bufs["causal"][B:].fill_(False)
                bufs["causal"][:B].copy_(causal, non_blocking=True)
            else:                                         # [bucket], or [] in plans exported before per-row causal
                bufs["causal"].fill_(bool(causal))
            bufs["temperature"].fill_(float(temperature))
            if noise is not None:         # the host draw, fed as float32
                bufs["gumbel_noise"][:B].copy_(noise.to(torch.float32))
            else:
                bufs["gumbel_noise"].zero_()
            if "draft_lora" in bufs:
                bufs["draft_lora"].fill_(bool(draft_lora))
            if "embed_mask" in bufs:      # image features on the prefill; every other pass: none
                bufs["embed_mask"].zero_()
                if embeds is not None:
                    bufs["embed_mask"][:B].copy_(embeds.mask)
                    bufs["embeds"][:B].copy_(embeds.values.to(bufs["embeds"].dtype))
            if captured:
                self._run(("step", binding.bucket, L), bound)
            else:
                self._run_eager(binding, bufs)
            if write:
                scatter_block(self.k, self.v, bufs["cache_lengths"], bufs["new_keys"], bufs["new_values"])
            token = bufs["token"][:B].to("cpu", non_blocking=True)
            conf = bufs["confidence"][:B].to("cpu", non_blocking=True)
        self.synchronize()
        return StepOut(token, conf, None)

    # ---- the compiled refinement loop (refine_stage.py) -------------------------------------------------

    def block_refiner(self, policy) -> "StageRefiner | None":
        """The plan's remask stage drives greedy dlm blocks whose policy it was exported for."""
        return self._refiner if self._refiner is not None and stage_serves(self.stage, policy) else None

    def stage_buffers(self, block: int) -> LoopBuffers:
        key = (self.bucket, block)
        if key not in self._loops:
            bufs = loop_buffers(self.io_spec, rows=self.bucket, block=block, vocab=self.config.vocab_size,
                                device=self.device, dtypes=TORCH_DTYPES, cache=(self.k, self.v))
            binding = self.plan.plan(self.bucket, block)
            for parity in (0, 1):                 # a context (and a captured graph) per parity
                self._bound[("stage", *key, parity)] = self._bind(binding, {**bufs.feeds[parity],
                                                                             **bufs.outputs[parity]})
            self._loops[key] = bufs
        return self._loops[key]

    def stage_pass(self, bufs: LoopBuffers, parity: int) -> None:
        key = ("stage", bufs.rows, bufs.block, parity)
        self._run(key, self._bound[key])

    def on_stream(self):
        """Torch work of a pass goes on the engine's stream (CPU tests: no stream)."""
        return torch.cuda.stream(self.stream) if self.device.type == "cuda" else nullcontext()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            self.stream.synchronize()

    # ---- contexts -------------------------------------------------------------------------------------

    def _shared_memory(self) -> torch.Tensor:
        """One device buffer every context runs in (USER_MANAGED), sized to the largest profile [1, 5]."""
        e = self.engine
        n = int(getattr(e, "num_optimization_profiles", 1))
        if hasattr(e, "get_device_memory_size_for_profile_v2"):
            size = max(int(e.get_device_memory_size_for_profile_v2(p)) for p in range(n))
        else:
            size = int(getattr(e, "device_memory_size_v2", getattr(e, "device_memory_size", 0)))
        return torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)

    def _context(self, profile: int):
        """A new context on the shared device memory, set to `profile` (return values checked [6])."""
        mod = self.trt.mod
        ctx = self.engine.create_execution_context(mod.ExecutionContextAllocationStrategy.USER_MANAGED)
        if ctx is None:
            raise NemodiffError("TensorRT could not create an execution context (see the log above)")
        ctx.set_device_memory(self._memory.data_ptr(), self._memory.numel())
        if not ctx.set_optimization_profile_async(profile, self._stream_handle()):
            raise NemodiffError(f"TensorRT refused optimization profile {profile}")
        if hasattr(ctx, "nvtx_verbosity") and hasattr(mod.ProfilingVerbosity, "LAYER_NAMES_ONLY"):
            ctx.nvtx_verbosity = mod.ProfilingVerbosity.LAYER_NAMES_ONLY     # plans are DETAILED [8]
        return ctx

    def _bind(self, binding: Binding, tensors: dict[str, torch.Tensor]) -> BoundPass:
        """A context of its own for one pass key: shapes and addresses set here, once."""
        ctx = self._context(binding.profile)
        self._set(ctx, binding, tensors)
        capturable = True
        if hasattr(ctx, "is_stream_capturable"):       # tensorrt_rtx: needs kREQUIRE_USER_ALLOCATION [7]
            capturable = bool(ctx.is_stream_capturable(self._stream_handle()))
        return BoundPass(ctx, binding, tensors, capturable)

    def _set(self, ctx, binding: Binding, tensors: dict[str, torch.Tensor]) -> None:
        for name, shape in binding.inputs.items():
            if not ctx.set_input_shape(name, shape):
                raise NemodiffError(f"TensorRT refused input {name} shape {shape} (profile {binding.profile})")
        for name in (*binding.inputs, *binding.outputs):
            if not ctx.set_tensor_address(name, tensors[name].data_ptr()):
                raise NemodiffError(f"TensorRT refused the address of {name}")

    def _step_pass(self, binding: Binding) -> BoundPass:
        key = ("step", binding.bucket, binding.block)
        if key not in self._bound:
            self._bound[key] = self._bind(binding, self._tensors(binding))
        return self._bound[key]

    def _tensors(self, binding: Binding) -> dict[str, torch.Tensor]:
        """Fresh static tensors of one pass (the KV cache bound whole); the remask stage's inputs idle."""
        out = {}
        for name, shape in {**binding.inputs, **binding.outputs}.items():
            if name == "past_keys":
                out[name] = self.k
            elif name == "past_values":
                out[name] = self.v
            else:
                out[name] = torch.zeros(shape, dtype=self.dtypes[name], device=self.device)
        if self.stage is not None:        # a step is no refinement pass: the stage commits nothing
            out.update(idle_stage_feeds(out["input_ids"]))
        return out

    def _run(self, key: tuple, bound: BoundPass) -> None:
        """Enqueue a bound pass: replayed from its CUDA graph (captured on first use), or eagerly."""
        def enqueue() -> None:
            self._execute(bound.context, key)

        if bound.capturable:
            self.graphs.run(key, enqueue)
        else:
            enqueue()

    def _run_eager(self, binding: Binding, tensors: dict[str, torch.Tensor]) -> None:
        """A long pass (e.g. a prompt prefill) through the profile's uncaptured context."""
        if binding.profile not in self._eager:
            self._eager[binding.profile] = self._context(binding.profile)
        ctx = self._eager[binding.profile]
        self._set(ctx, binding, tensors)
        self._execute(ctx, ("eager", binding.bucket, binding.block))

    def _execute(self, ctx, key: tuple) -> None:
        if not ctx.execute_async_v3(self._stream_handle()):
            raise NemodiffError(f"TensorRT execute_async_v3 failed for pass {key} (see the log above)")

    def _stream_handle(self) -> int:
        """The current torch stream (inside a capture: the capturing stream); 0 for the CPU tests."""
        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0
