"""ONNX Runtime's side of the compiled refinement loop (refine_stage.py): IOBindings pinned per parity.

For each (bucket, block length) the loop's buffers (refine_stage.loop_buffers) are bound once to two
IOBindings, one per parity, every tensor by pointer; a pass is then one `run_with_iobinding` and nothing
is copied in or out. On the CPU provider the run returns when the pass is done. On the CUDA provider
(session made with `cuda_provider` below: ORT on torch's current stream, CUDA graphs enabled), each
(bucket, block, parity) gets its own `gpu_graph_id`: ORT captures that pass as a CUDA graph on its first
runs and replays it after, which is valid because the bound addresses never change; runs are not
synchronized with the host (`disable_synchronize_execution_providers`), so the host waits only where it
reads the done flag or the results (torch reads on the same stream). Passes through `step` run with
gpu_graph_id -1 (not captured: their shapes vary). The CUDA path is written against ONNX Runtime's
documented run options and has not run here (no GPU with onnxruntime-gpu); the CPU tests drive the same
code with the same bindings.
"""

from __future__ import annotations

from typing import Any

import torch

from .refine_stage import LoopBuffers, loop_buffers

GRAPH_ID_KEY = "gpu_graph_id"                           # ORT run option: which captured CUDA graph
NO_SYNC_KEY = "disable_synchronize_execution_providers"  # ORT run option: return before the GPU finishes


def cuda_provider(device_id: int = 0) -> tuple[str, dict[str, str]]:
    """The CUDA provider entry for a session driven by the refinement loop: on torch's current stream
    (so torch's writes and ORT's passes are ordered without a host sync), CUDA graphs enabled."""
    stream = torch.cuda.current_stream(device_id).cuda_stream
    return ("CUDAExecutionProvider", {"device_id": str(device_id), "enable_cuda_graph": "1",
                                      "has_user_compute_stream": "1", "user_compute_stream": str(stream)})


class OrtStage:
    """The pinned bindings of an `OrtDenoiser` whose graph has the remask stage."""

    def __init__(self, den, *, cuda_graphs: bool):
        self.den, self.cuda_graphs = den, cuda_graphs
        self._bufs: dict[tuple[int, int], tuple[LoopBuffers, tuple[Any, Any], tuple[Any, Any], tuple]] = {}
        self._next_graph_id = 1

    def clear(self) -> None:
        """Drop every binding (the KV cache they point at was reallocated)."""
        self._bufs.clear()

    def buffers(self, block: int) -> LoopBuffers:
        """The pinned buffers of (bucket, block), bound to the current KV cache window: made again (new
        bindings, new graph ids) only when the cache was reallocated (the window grew or shrank)."""
        from .base import TORCH_DTYPES

        den = self.den
        key = (den.bucket, block)
        cache = (den.k.data_ptr(), tuple(den.k.shape))
        if key not in self._bufs or self._bufs[key][3] != cache:
            bufs = loop_buffers(den.spec, rows=den.bucket, block=block, vocab=den.config.vocab_size,
                                device=den.device, dtypes=TORCH_DTYPES, cache=(den.k, den.v))
            bindings = tuple(self._bind(bufs, p) for p in (0, 1))
            self._bufs[key] = (bufs, bindings, tuple(self._run_options() for _ in (0, 1)), cache)
        return self._bufs[key][0]

    def run(self, bufs: LoopBuffers, parity: int) -> None:
        _, bindings, options, _ = self._bufs[(bufs.rows, bufs.block)]
        self.den.session.run_with_iobinding(bindings[parity], options[parity])

    def step_options(self):
        """Run options of a `step` pass: never captured (None on sessions without CUDA graphs)."""
        if not self.cuda_graphs:
            return None
        import onnxruntime as ort

        ro = ort.RunOptions()
        ro.add_run_config_entry(GRAPH_ID_KEY, "-1")
        return ro

    def _bind(self, bufs: LoopBuffers, parity: int):
        io = self.den.session.io_binding()
        for name, t in bufs.feeds[parity].items():
            self.den._bind(io.bind_input, name, t)
        for name, t in bufs.outputs[parity].items():
            self.den._bind(io.bind_output, name, t)
        return io

    def _run_options(self):
        if not self.cuda_graphs:
            return None
        import onnxruntime as ort

        ro = ort.RunOptions()
        ro.add_run_config_entry(GRAPH_ID_KEY, str(self._next_graph_id))
        ro.add_run_config_entry(NO_SYNC_KEY, "1")
        self._next_graph_id += 1
        return ro
