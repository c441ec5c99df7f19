"""The vision graph's TensorRT plan (trt/vision_plan.py) at run time: pixels in, image features out.

One image per call, like ort_vision.OrtVision: pixels [3, H, W] float32 (preprocessed: H and W multiples of
the merge patch, inside the plan's one profile) -> features [(H/m)*(W/m), hidden] float32 (host). The plan
has its own execution context (USER_MANAGED device memory of its own, its own stream): image prompts are
encoded when they are submitted, off the decode loop's thread, so it shares nothing with the step plan's
contexts; a lock keeps two callers off the one context. Shapes change per image, so the context is never
captured into a CUDA graph; every set_input_shape / set_tensor_address / execute_async_v3 return value is
checked (desk-check item [6], as in trt.py).

Executed here only against the fake TensorRT (tests/backends/fake_trt.py); the real API only on a GPU.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ..artifact.profiles import profiles_from_json
from ..errors import InvalidArgument, NemodiffError


class TrtVision:
    def __init__(self, engine_dir: str | Path, entry: dict[str, Any], spec: dict[str, Any], *, trt, runtime,
                 device: torch.device):
        """entry: the step plan entry's `vision` (file, profiles); spec: the io_spec's extra["vision"];
        trt / runtime / device: the step backend's (trt_shim.Trt, its Runtime, its torch device)."""
        mod = trt.mod
        self.spec, self.device = spec, torch.device(device)
        path = Path(engine_dir) / entry["file"]
        self.lo, _, self.hi = profiles_from_json(entry["profiles"])[0].shapes["pixels"]      # [3, H, W] bounds
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise NemodiffError(f"{path}: TensorRT could not deserialize the vision plan (see the log above)")
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        size = int(self.engine.get_device_memory_size_for_profile_v2(0)
                   if hasattr(self.engine, "get_device_memory_size_for_profile_v2")
                   else self.engine.device_memory_size_v2)
        self._memory = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
        self.context = self.engine.create_execution_context(mod.ExecutionContextAllocationStrategy.USER_MANAGED)
        if self.context is None:
            raise NemodiffError(f"{path}: TensorRT could not create an execution context (see the log above)")
        self.context.set_device_memory(self._memory.data_ptr(), self._memory.numel())
        if not self.context.set_optimization_profile_async(0, self._stream_handle()):
            raise NemodiffError(f"{path}: TensorRT refused the vision plan's optimization profile 0")
        if hasattr(self.context, "nvtx_verbosity") and hasattr(mod.ProfilingVerbosity, "LAYER_NAMES_ONLY"):
            self.context.nvtx_verbosity = mod.ProfilingVerbosity.LAYER_NAMES_ONLY     # plans are DETAILED
        self._lock = threading.Lock()

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [3, H, W] -> features [tokens, hidden] float32 (host)."""
        m = int(self.spec["merge_patch"])
        shape = tuple(int(s) for s in pixels.shape)
        _, H, W = shape
        if H % m or W % m or any(not a <= s <= b for a, s, b in zip(self.lo, shape, self.hi)):
            raise InvalidArgument(f"image of {H}x{W} pixels: the engine's vision plan takes multiples of {m} "
                                  f"up to {self.hi[1]}x{self.hi[2]} (its profile; preprocess it with model/images.py)")
        hidden = int(self.spec["outputs"][0]["shape"][1])
        ctx = self.context
        with self._lock, (torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()):
            x = pixels.detach().to(self.device, torch.float32).contiguous()         # [3, H, W]
            out = torch.empty((H // m) * (W // m), hidden, dtype=torch.float32, device=self.device)
            if not ctx.set_input_shape("pixels", shape):
                raise NemodiffError(f"TensorRT refused the vision plan's input shape {shape}")
            for name, t in (("pixels", x), ("features", out)):
                if not ctx.set_tensor_address(name, t.data_ptr()):
                    raise NemodiffError(f"TensorRT refused the address of the vision plan's {name}")
            if not ctx.execute_async_v3(self._stream_handle()):
                raise NemodiffError(f"TensorRT execute_async_v3 failed for the vision plan on {shape} "
                                    "(see the log above)")
            if self.stream is not None:
                self.stream.synchronize()
            return out.cpu()

    def _stream_handle(self) -> int:
        return self.stream.cuda_stream if self.stream is not None else 0       # 0: the CPU tests

