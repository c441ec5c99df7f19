"""CUDA-graph bookkeeping: capture a pass once per shape key, replay it after that.

A captured function reads only engine-owned static buffers and writes its results into them (the
graphs share one memory pool, so nothing a graph allocates may outlive its replay). Warm-up runs
(Triton compiles, cuBLAS workspaces) execute the function for real, so the buffers it updates in
place (`state`) are saved before and restored after them: capturing never advances the decode.
"""

from __future__ import annotations

from typing import Callable, Hashable, Sequence

import torch


class GraphPool:
    def __init__(self, *, enabled: bool = True, warmup: int = 2):
        self.enabled = enabled
        self.warmup = warmup
        self.graphs: dict[Hashable, object] = {}
        self.captures = 0                   # how many times a key was captured (tests, bench)
        self.replays = 0
        self._pool = None

    def run(self, key: Hashable, fn: Callable[[], None], state: Sequence[torch.Tensor] = ()) -> None:
        """Replay the graph captured for `key` (capturing `fn` first if new); eager when disabled."""
        if not self.enabled:
            fn()
            return
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._capture(fn, state)
            self.captures += 1
        graph.replay()
        self.replays += 1

    def clear(self) -> None:
        """Drop every graph and their memory pool (a pool outliving all its graphs cannot be reused)."""
        self.graphs.clear()
        self._pool = None

    def _capture(self, fn, state):
        saved = [t.clone() for t in state]
        with self._side_stream():
            for _ in range(self.warmup):
                fn()
        for t, s in zip(state, saved):
            t.copy_(s)
        return self._record(fn)

    # ---- the CUDA specifics (a test subclass replaces these two) ---------------------------------

    def _side_stream(self):
        return _WarmStream()

    def _record(self, fn):
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            fn()
        return graph


class _WarmStream:
    """Warm up on a side stream, as capture requires, and join the current stream afterwards."""

    def __enter__(self):
        self.main = torch.cuda.current_stream()
        self.side = torch.cuda.Stream()
        self.side.wait_stream(self.main)
        self.ctx = torch.cuda.stream(self.side)
        self.ctx.__enter__()

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)
        self.main.wait_stream(self.side)
        return False
