"""TensorRT backend: a built per-GPU plan (manifest["engines"]) as a `Denoiser`, replayed as CUDA graphs.

Honest status: nothing below `TrtDenoiser.__init__` has run anywhere yet. Development machines have
no GPU and the GPU machine has no TensorRT; tensorrt_rtx builds plans here but cannot deserialize
them without a GPU. What the CPU tests cover is the bookkeeping that decides what gets bound
(`BindingPlan`: batch bucket, profile, every input/output shape, buffer reuse) and the engine choice
(`artifact.targets.select_engine`). The GPU calls follow the TensorRT Python API docs
(IExecutionContext.set_input_shape / set_tensor_address / execute_async_v3) and the CUDA-graph recipe
of TensorRT's performance guide: run once outside capture (flushes deferred shape work), then capture
the same call on a non-default stream; recapture only when shapes or addresses change.

Layout:
  - one execution context per optimization profile (= per batch bucket), set to it once, so a pass
    never switches profiles (a captured graph is only valid for the profile it was captured with);
  - static buffers per (bucket, block length): inputs are copied into them, outputs read from them;
    the KV cache [layers, bucket, kv_heads, max_context, head_dim] is bound whole (cache_len is fixed
    at max_context in the profiles) and causal passes scatter the block's K/V into it, like the ORT
    backend;
  - one CUDA graph per (bucket, block length), captured through the fast engine's `GraphPool`
    (warm-up runs outside capture, then capture, then replay).
The `Denoiser` contract returns token/confidence on the host, so every pass ends with one device to
host copy of [B, L]; a device-resident block loop (done flag read every k passes, no other host read
inside a block) is the `BlockRefiner` capability (decoding/refine.py), which this backend does not
declare yet: a plan built with a remask stage can implement it over `run_pass`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..artifact.buckets import BatchBuckets
from ..artifact.profiles import binding_shapes, output_shapes, profile_for, profiles_from_json
from ..config import ModelConfig
from ..errors import NemodiffError
from ..decoding.denoiser import StepOut
from .base import TORCH_DTYPES, BackendDenoiser, scatter_block
from .graphs import GraphPool


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
    """The manifest engine entry for this GPU and TensorRT, or a refusal naming what to build."""
    from ..artifact.targets import current_device, select_engine
    from .trt_shim import load

    trt = trt or load()
    device = device if device is not None else current_device()
    return select_engine(manifest.engines, device, trt.flavor, trt.version, engine_dir)


class TrtDenoiser(BackendDenoiser):
    """GPU only (see the module docstring for what has and has not been executed)."""

    def __init__(self, engine_dir: str | Path, manifest, config: ModelConfig, max_len: int | None = None, *,
                 use_cuda_graphs: bool = True, device_index: int = 0):
        from .trt_shim import load
        from ..kernels.registry import PluginRef, register_plugins

        engine_dir = Path(engine_dir)
        self.trt = load()
        mod = self.trt.mod
        self.entry = select_plan(engine_dir, manifest, trt=self.trt)
        max_len = max_len or int(manifest.buckets["max_context"])
        self.plan = BindingPlan(manifest.io_spec, self.entry, manifest.buckets, max_len)
        # the plans have no logits output in the hot loop
        super().__init__(config, max_len, torch.device("cuda", device_index), buckets=self.plan.buckets)
        self.spec = manifest.io_spec
        self.output_names = [t["name"] for t in self.spec["outputs"]]
        if self.entry["plugins"]:          # the Python Remask creator must be registered before deserializing
            register_plugins(self.trt, [PluginRef.parse(p) for p in self.entry["plugins"]])
        self.stream = torch.cuda.Stream(self.device)
        self.logger = mod.Logger(mod.Logger.WARNING)
        self.runtime = mod.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine((engine_dir / self.entry["file"]).read_bytes())
        if self.engine is None:
            raise NemodiffError(f"{engine_dir / self.entry['file']}: TensorRT could not deserialize it "
                                f"(see the log above); rebuild with `nemodiff-compile build --backend tensorrt "
                                f"--gpus {self.entry['target']} --output {engine_dir}`")
        self.contexts: dict[int, Any] = {}        # profile -> IExecutionContext
        self.graphs = GraphPool(enabled=use_cuda_graphs)
        self.kv_dtype = TORCH_DTYPES[next(t for t in self.spec["inputs"] if t["name"] == "past_keys")["dtype"]]
        self.k = self.v = None
        self._bufs: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def _allocate(self, rows: int) -> None:
        self.k, self.v = self.kv_cache(rows, self.kv_dtype)
        self._bufs.clear()
        self.graphs.clear()               # captured graphs hold the old cache's addresses

    def _pass(self, tokens, *, causal, write, num_valid, draft_lora, temperature, noise) -> StepOut:
        B, L = tokens.shape
        binding = self.plan.plan(B, L)
        bufs = self._buffers(binding)
        with torch.cuda.stream(self.stream):
            bufs["input_ids"][:B].copy_(tokens, non_blocking=True)
            bufs["cache_lengths"][:B].copy_(self._lengths, non_blocking=True)
            bufs["num_valid"][:B].copy_(num_valid, non_blocking=True)
            if binding.bucket > B:        # padding rows: an empty row with a full block, never read
                bufs["cache_lengths"][B:].zero_()
                bufs["num_valid"][B:].fill_(L)
            bufs["causal"].fill_(bool(causal))
            bufs["temperature"].fill_(float(temperature))
            if noise is not None:         # the host draw, fed as float32
                bufs["gumbel_noise"][:B].copy_(noise.to(torch.float32))
            else:
                bufs["gumbel_noise"].zero_()
            if "draft_lora" in bufs:
                bufs["draft_lora"].fill_(bool(draft_lora))
            self.run_pass(binding, bufs)
            if write:
                scatter_block(self.k, self.v, bufs["cache_lengths"], bufs["new_keys"], bufs["new_values"])
            token = bufs["token"][:B].to("cpu", non_blocking=True)
            conf = bufs["confidence"][:B].to("cpu", non_blocking=True)
        self.stream.synchronize()
        return StepOut(token, conf, None)

    def run_pass(self, binding: Binding, bufs: dict[str, torch.Tensor]) -> None:
        """Enqueue one pass on the current stream, through the graph pool: warm-up runs, then one CUDA graph
        per (bucket, block) replayed (eager when CUDA graphs are off)."""
        ctx = self._context(binding.profile)

        def enqueue() -> None:
            for name, shape in binding.inputs.items():
                ctx.set_input_shape(name, shape)
            for name, t in bufs.items():
                if name in binding.inputs or name in binding.outputs:
                    ctx.set_tensor_address(name, t.data_ptr())
            if not ctx.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
                raise NemodiffError(f"TensorRT execute_async_v3 failed for batch {binding.bucket}, "
                                    f"block {binding.block}")

        self.graphs.run((binding.bucket, binding.block), enqueue)

    def _context(self, profile: int):
        if profile not in self.contexts:
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(profile, self.stream.cuda_stream)
            self.contexts[profile] = ctx
        return self.contexts[profile]

    def _buffers(self, binding: Binding) -> dict[str, torch.Tensor]:
        key = (binding.bucket, binding.block)
        if key not in self._bufs:
            dt = {t["name"]: TORCH_DTYPES[t["dtype"]] for t in (*self.spec["inputs"], *self.spec["outputs"])}
            bufs = {}
            for name, shape in {**binding.inputs, **binding.outputs}.items():
                if name == "past_keys":
                    bufs[name] = self.k
                elif name == "past_values":
                    bufs[name] = self.v
                else:
                    bufs[name] = torch.zeros(shape, dtype=dt[name], device=self.device)
            self._bufs[key] = bufs
        return self._bufs[key]
