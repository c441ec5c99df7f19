"""TensorRT backend: a built per-GPU plan (manifest["engines"]) as a `Denoiser`, replayed as CUDA graphs.

Honest status: nothing below `TrtDenoiser.__init__` has run anywhere yet. Development machines have
no GPU and the GPU machine has no TensorRT; tensorrt_rtx builds plans here but cannot deserialize
them without a GPU. What the CPU tests cover is the bookkeeping that decides what gets bound
(`BindingPlan`: batch bucket, profile, every input/output shape, buffer reuse) and the engine choice
(`build.targets.select_engine`). The GPU calls follow the TensorRT Python API docs
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
  - one CUDA graph per (bucket, block length), captured at that shape's second use.
The `Denoiser` contract returns token/confidence on the host, so every pass ends with one device to
host copy of [B, L]; the device-resident loop (done-flag check every k passes, no host sync inside a
block) is the fast runtime's job, which can drive `run_pass` below directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..artifact.profiles import batch_bucket, binding_shapes, output_shapes, profile_for, profiles_from_json
from ..config import ModelConfig
from ..errors import NemodiffError
from ..model.cache import check_room, check_trim, scatter_positions
from ..decoding import remask
from ..decoding.denoiser import StepOut

_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "int64": torch.int64, "bool": torch.bool, "float8_e4m3fn": torch.float8_e4m3fn}   # fp8: FP8 KV cache


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
        self.batch_sizes = tuple(sorted(p.batch for p in self.profiles))
        self.max_context = int(buckets["max_context"])
        if max_len != self.max_context:
            raise NemodiffError(f"max_len {max_len}: this engine's profiles bind the KV cache at exactly "
                                f"{self.max_context} positions (rebuild with --max-context {max_len})")
        self.max_len = max_len

    def bucket(self, batch: int) -> int:
        return batch_bucket(batch, self.batch_sizes)

    def plan(self, batch: int, block: int) -> Binding:
        b = self.bucket(batch)
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


class TrtDenoiser:
    """GPU only (see the module docstring for what has and has not been executed)."""

    def __init__(self, engine_dir: str | Path, manifest, config: ModelConfig, max_len: int | None = None, *,
                 use_cuda_graphs: bool = True, device_index: int = 0):
        from .trt_shim import load
        from ..kernels.registry import PluginRef, register_plugins

        engine_dir = Path(engine_dir)
        self.trt = load()
        mod = self.trt.mod
        self.entry = select_plan(engine_dir, manifest, trt=self.trt)
        self.config, self.max_len = config, max_len or int(manifest.buckets["max_context"])
        self.plan = BindingPlan(manifest.io_spec, self.entry, manifest.buckets, self.max_len)
        self.spec = manifest.io_spec
        self.output_names = [t["name"] for t in self.spec["outputs"]]
        if self.entry["plugins"]:          # the Python Remask creator must be registered before deserializing
            register_plugins(self.trt, [PluginRef.parse(p) for p in self.entry["plugins"]])
        self.device = torch.device("cuda", device_index)
        self.stream = torch.cuda.Stream(self.device)
        self.logger = mod.Logger(mod.Logger.WARNING)
        self.runtime = mod.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine((engine_dir / self.entry["file"]).read_bytes())
        if self.engine is None:
            raise NemodiffError(f"{engine_dir / self.entry['file']}: TensorRT could not deserialize it "
                                f"(see the log above); rebuild with `nemodiff-compile build --backend tensorrt "
                                f"--gpus {self.entry['target']} --output {engine_dir}`")
        self.contexts: dict[int, Any] = {}        # profile -> IExecutionContext
        self.use_cuda_graphs = use_cuda_graphs
        self.return_logits = False              # the plans have no logits output in the hot loop
        self.kv_dtype = _TORCH[next(t for t in self.spec["inputs"] if t["name"] == "past_keys")["dtype"]]
        self.k = self.v = None
        self._batch = 0
        self._lengths = torch.zeros(0, dtype=torch.long)
        self._bufs: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._runs: dict[tuple[int, int], int] = {}

    # ---- cache --------------------------------------------------------------------------------

    def reset(self, batch: int) -> None:
        bucket = self.plan.bucket(batch)
        if self.k is None or self.k.shape[1] != bucket:
            c = self.config
            shape = (c.num_hidden_layers, bucket, c.num_key_value_heads, self.max_len, c.head_dim)
            self.k = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
            self.v = torch.zeros_like(self.k)
            self._bufs.clear()
            self._graphs.clear()          # captured graphs hold the old cache's addresses
            self._runs.clear()
        else:
            self.k.zero_()
            self.v.zero_()
        self._batch = batch
        self._lengths = torch.zeros(batch, dtype=torch.long)

    def lengths(self) -> torch.Tensor:
        return self._lengths.clone()

    def trim(self, lengths: torch.Tensor) -> None:
        lengths = lengths.to("cpu", torch.long)
        check_trim(self._lengths, lengths)
        self._lengths = lengths.clone()

    # ---- one pass -----------------------------------------------------------------------------

    def step(self, tokens, *, causal, write, num_valid=None, draft_lora=False, temperature=0.0,
             generator=None) -> StepOut:
        B, L = tokens.shape
        if write and not causal:
            raise ValueError("the KV cache only holds causal K/V: bidirectional passes cannot write it")
        check_room(self._lengths, L, self.max_len)
        binding = self.plan.plan(B, L)
        bufs = self._buffers(binding)
        pad = binding.bucket - B
        num_valid = torch.full((B,), L) if num_valid is None else num_valid.to("cpu", torch.long)
        with torch.cuda.stream(self.stream):
            bufs["input_ids"][:B].copy_(tokens, non_blocking=True)
            bufs["cache_lengths"][:B].copy_(self._lengths, non_blocking=True)
            bufs["num_valid"][:B].copy_(num_valid, non_blocking=True)
            if pad:
                bufs["cache_lengths"][B:].zero_()
                bufs["num_valid"][B:].fill_(L)
            bufs["causal"].fill_(bool(causal))
            bufs["temperature"].fill_(float(temperature))
            if temperature > 0:      # the same host draw as the other backends, fed as float32
                noise = remask.gumbel_noise((B, L, self.config.vocab_size), generator)
                bufs["gumbel_noise"][:B].copy_(noise.to(torch.float32))
            else:
                bufs["gumbel_noise"].zero_()
            if "draft_lora" in bufs:
                bufs["draft_lora"].fill_(bool(draft_lora))
            self.run_pass(binding, bufs)
            if write:
                idx = bufs["cache_lengths"][:, None] + torch.arange(L, device=self.device)
                idx = idx[None, :, None, :, None].expand_as(bufs["new_keys"])
                scatter_positions(self.k, idx, bufs["new_keys"])
                scatter_positions(self.v, idx, bufs["new_values"])
            token = bufs["token"][:B].to("cpu", non_blocking=True)
            conf = bufs["confidence"][:B].to("cpu", non_blocking=True)
        self.stream.synchronize()
        if write:
            self._lengths = self._lengths + num_valid
        return StepOut(token, conf, None)

    def run_pass(self, binding: Binding, bufs: dict[str, torch.Tensor]) -> None:
        """Enqueue one pass on self.stream: eager the first time a shape is seen, then captured and replayed."""
        key = (binding.bucket, binding.block)
        if key in self._graphs:
            self._graphs[key].replay()
            return
        ctx = self._context(binding.profile)
        for name, shape in binding.inputs.items():
            ctx.set_input_shape(name, shape)
        for name, t in bufs.items():
            if name in binding.inputs or name in binding.outputs:
                ctx.set_tensor_address(name, t.data_ptr())
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise NemodiffError(f"TensorRT execute_async_v3 failed for batch {binding.bucket}, block {binding.block}")
        self._runs[key] = self._runs.get(key, 0) + 1
        if self.use_cuda_graphs and self._runs[key] >= 2:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                ctx.execute_async_v3(self.stream.cuda_stream)
            self._graphs[key] = graph
            # capture does not execute; this pass's results came from the eager call above

    def _context(self, profile: int):
        if profile not in self.contexts:
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(profile, self.stream.cuda_stream)
            self.contexts[profile] = ctx
        return self.contexts[profile]

    def _buffers(self, binding: Binding) -> dict[str, torch.Tensor]:
        key = (binding.bucket, binding.block)
        if key not in self._bufs:
            dt = {t["name"]: _TORCH[t["dtype"]] for t in (*self.spec["inputs"], *self.spec["outputs"])}
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
