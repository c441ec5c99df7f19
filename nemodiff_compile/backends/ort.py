"""ONNX Runtime backend: the exported step graph (`export/spec.py`) as a `Denoiser`.

Every buffer is a torch tensor bound to the session by pointer (IOBinding), in host memory on the CPU
execution provider and in device memory on the CUDA one, so nothing is copied to feed a pass: the
KV cache [layers, B, kv_heads, W, head_dim] goes in whole, the block's new K/V come back
into preallocated buffers and causal passes scatter them into the cache at each row's length (the
same writes as `StaticKVCache`). Only token and confidence [B, L] are copied to the host.

The cache is a window W of positions, not max_len: the graph's cache_len dimension is dynamic and a pass
costs in proportion to it (attention, its mask and the grouped-query repeat of K/V all span it), so W is
the rows' longest length plus the block, rounded up to `window` positions; the buffer grows (copying what
is cached) when a pass needs more and shrinks when under half used (window=0: always max_len). The cache
dtype is the spec's: the graph's float dtype, or float8_e4m3fn (1 byte per element) for builds with
an FP8 cache, whose graph dequantizes the cache and quantizes the block's K/V itself. (ORT 1.32's
`session.run` rejects ml_dtypes float8 numpy arrays; binding by pointer with element type 17, as here,
or `OrtValue.ortvalue_from_numpy_with_onnx_type(uint8 view, 17)` both work.)

Graphs exported since per-row causal take `causal` as [batch] (`row_causal`): a scheduler's pass may then hold
commit rows (causal, written) beside denoise rows (bidirectional, their scratch K/V not kept); older graphs take
one flag per pass and run as before.

Graphs of models with a draft LoRA take a `draft_lora` flag; without one, `draft_lora=True` drafts
with the base weights (linear-spec stays lossless; it may accept fewer drafts than with the LoRA).

Graphs built with a remask stage (`--remask onnx|plugin`) also run the compiled refinement loop: greedy
dlm blocks whose policy the stage serves go to `block_refiner` (refine_stage.py, bindings in
ort_stage.py); `step` feeds the stage an idle canvas. A `--remask plugin` graph runs its
`nemodiff::Remask` node as a Python custom op (kernels/remask/ort_op.py, onnxruntime-extensions).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import ModelConfig
from ..errors import NemodiffError
from ..artifact.spec import remask_stage
from ..decoding.denoiser import StepOut
from .base import TORCH_DTYPES, BackendDenoiser, scatter_block
from .refine_stage import StageRefiner, idle_stage_feeds, stage_serves

if TYPE_CHECKING:  # pragma: no cover
    from ..artifact.spec import IOSpec

# torch dtype -> ONNX TensorProto element type (what IOBinding takes); float8_e4m3fn: the KV cache of
# fp8-cache builds (quant/kv_cache.py), bound by pointer like the rest
_ONNX = {torch.float32: 1, torch.int64: 7, torch.bool: 9, torch.float16: 10, torch.bfloat16: 16,
         torch.float8_e4m3fn: 17}
_MAX_SHAPES = 16  # (batch, block) output buffer sets kept: decode, block, verify, a few prompt lengths
_MAX_GATHERED = 4  # (rows, window) K/V buffers of subset passes kept on the CPU: the kinds of pass in turn


class OrtDenoiser(BackendDenoiser):
    def __init__(self, onnx_path: str | Path, spec: "IOSpec", config: ModelConfig, max_len: int, *,
                 providers: list | None = None, threads: int | None = None, return_logits: bool = False,
                 fuse: bool = True, window: int = 64, cuda_graphs: bool = True):
        """fuse=False stops at ORT's basic graph optimizations: Q/DQ graphs then compute exactly what
        they say (with fuse=True the CPU provider may fold int8 Q/DQ + MatMul into integer kernels
        that round differently). cuda_graphs: on the CUDA provider, graphs with a remask stage replay
        their refinement passes as CUDA graphs (ort_stage.py)."""
        import onnxruntime as ort

        self.stage = remask_stage(spec, where=str(onnx_path))       # refuses an older stage's I/O

        opts = ort.SessionOptions()
        opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if fuse
                                         else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
        if threads:
            opts.intra_op_num_threads = threads
        # int4 weight-only graphs: ORT fuses DQ + MatMul into MatMulNBits, which by default (level 4)
        # quantizes the activations to int8 on the CPU; the graph says float activations, so compute them so
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        providers = providers or ["CPUExecutionProvider"]
        cuda_graphs = cuda_graphs and self.stage is not None and providers[0] == "CUDAExecutionProvider"
        if cuda_graphs:
            from .ort_stage import cuda_provider

            providers = [cuda_provider()] + list(providers[1:])
        try:
            if self.stage is not None and self.stage["variant"] == "plugin":
                from ..kernels.remask.ort_op import plugin_session

                self.session = plugin_session(onnx_path, opts, providers)
            else:
                self.session = ort.InferenceSession(str(onnx_path), opts, providers=providers)
        except Exception as e:       # onnxruntime's pybind errors (NotImplemented, Fail, ...) have no common base
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            hint = (" (ONNX Runtime's CPU provider has no bfloat16 kernels for most ops: run bf16 engines on a "
                    "GPU provider or build --backend tensorrt)" if spec.input("past_keys").dtype == "bfloat16" else "")
            raise NemodiffError(f"{onnx_path}: ONNX Runtime ({', '.join(map(str, providers))}) cannot load this "
                                f"graph: {first}{hint}") from None
        self.spec, self.config = spec, config
        self.onnx_path = Path(onnx_path)
        self.row_causal = spec.causal_per_row                                # older graphs: one flag per pass
        self._check(onnx_path, return_logits)
        device = torch.device("cpu")
        if self.session.get_providers()[0] == "CUDAExecutionProvider":
            dev_id = self.session.get_provider_options()["CUDAExecutionProvider"].get("device_id", 0)
            device = torch.device("cuda", int(dev_id))
        super().__init__(config, max_len, device, return_logits=return_logits)
        self.kv_dtype = TORCH_DTYPES[spec.input("past_keys").dtype]
        self.io = self.session.io_binding()
        self.window = window
        self.k = self.v = None                                   # [layers, B, kv_heads, W, D]
        self._bufs: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._gathered: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}   # (rows, window) -> K/V
        self._flags = {c: torch.tensor(c, device=self.device) for c in (False, True)}   # 0-d bool inputs
        self._temperature = torch.zeros((), device=self.device)
        self._stage = None
        if self.stage is not None:
            from .ort_stage import OrtStage

            self._stage = OrtStage(self, cuda_graphs=cuda_graphs)
            self._refiner = StageRefiner(self, self.stage)

    def _check(self, path, return_logits: bool) -> None:
        got = [sorted(t.name for t in ts) for ts in (self.session.get_inputs(), self.session.get_outputs())]
        want = [sorted(t.name for t in ts) for ts in (self.spec.inputs, self.spec.outputs)]
        if got != want:
            raise NemodiffError(f"{path}: graph I/O {got} differs from its I/O spec {want}: re-export it")
        c = self.config
        kv = (c.num_hidden_layers, "batch", c.num_key_value_heads, "cache_len", c.head_dim)
        vocab = self.spec.input("gumbel_noise").shape[2]
        if tuple(self.spec.input("past_keys").shape) != kv or vocab != c.vocab_size:
            raise NemodiffError(f"{path}: the graph's KV cache / vocab shapes do not match the model config: "
                                "re-export it from this checkpoint")
        if return_logits and "logits" not in self.spec.output_names():
            raise NemodiffError(f"{path} was exported without logits: export it with with_logits=True "
                                "to return them")

    def _allocate(self, rows: int) -> None:
        cap = self.max_len if not self.window else min(self.max_len, self.window if self.k is None else self.k.shape[3])
        self.k, self.v = self.kv_cache(rows, self.kv_dtype, cap)
        self._bufs.clear()
        self._gathered.clear()
        if self._stage is not None:
            self._stage.clear()

    # ---- the compiled refinement loop (refine_stage.py) -------------------------------------------------

    def block_refiner(self, policy) -> "StageRefiner | None":
        """The graph's remask stage drives greedy dlm blocks whose policy it was exported for."""
        return self._refiner if self._stage is not None and stage_serves(self.stage, policy) else None

    def stage_buffers(self, block: int):
        self._fit(int(self._lengths.max()) + block)       # the window the block's passes read (as `_pass`)
        return self._stage.buffers(block)

    def stage_pass(self, bufs, parity: int) -> None:
        self._stage.run(bufs, parity)

    def _kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k, self.v

    def _target(self, need: int) -> int:
        """The window for `need` positions: rounded up to `window` (window 0: max_len)."""
        return self.max_len if not self.window else min(self.max_len, -(-max(need, 1) // self.window) * self.window)

    def _fit(self, need: int) -> None:
        """A cache window of at least `need` positions: grow (or shrink, when under half used) to `need`
        rounded up to `window`, carrying the cached prefix over."""
        cap = self.k.shape[3]
        target = self._target(need)
        if target > cap or 2 * target < cap:
            k, v = self.kv_cache(self.k.shape[1], self.kv_dtype, target)
            s = min(cap, target)
            k[:, :, :, :s].copy_(self.k[:, :, :, :s])
            v[:, :, :, :s].copy_(self.v[:, :, :, :s])
            self.k, self.v = k, v

    # a pass over some rows: the cache is bound per call, so the rows' K/V can be gathered into a smaller batch
    subset_passes = True

    def step(self, tokens, *, rows: list[int] | None = None, **kw) -> StepOut:
        """rows: run the pass over these rows of the batch only (tokens [len(rows), L], results for them); their
        K/V are gathered into a batch of their own and what a causal pass writes is copied back. A scheduler
        whose rows are in different phases computes only the rows that take part."""
        if rows is None or list(rows) == list(range(self.batch)):
            return super().step(tokens, **kw)
        idx = torch.tensor(rows, dtype=torch.long)
        need = int(self._lengths[idx].max()) + tokens.shape[1]
        self._fit(need)
        full = (self.k, self.v, self._lengths, self.batch)
        self.k, self.v = self._gather(idx.to(self.device), self._target(need))   # the rows' own window
        self._lengths, self.batch = full[2][idx], len(rows)
        try:
            out = super().step(tokens, **kw)
            if kw.get("write"):
                w = self.k.shape[3]         # the subset's window never outgrows the batch's (fitted above)
                full[0][:, :, :, :w].index_copy_(1, idx.to(self.device), self.k)
                full[1][:, :, :, :w].index_copy_(1, idx.to(self.device), self.v)
                full[2][idx] = self._lengths
        finally:
            self.k, self.v, self.batch = full[0], full[1], full[3]
            self._lengths = full[2]
        return out

    def _gather(self, idx: torch.Tensor, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first w positions of rows idx [R], K and V each [layers, R, kv_heads, w, D] (a pass costs in
        proportion to its window, and these rows may be shorter than the batch's longest), in buffers kept per
        (R, w) on the CPU, the last few only: a fresh megabyte-sized tensor per pass costs more in page faults
        than the copy itself (on a GPU, torch's caching allocator already reuses its blocks)."""
        key, shape = (len(idx), w), (self.k.shape[0], len(idx), self.k.shape[2], w, self.k.shape[4])
        bufs = self._gathered.pop(key, None)
        if bufs is None:
            bufs = (torch.empty(shape, dtype=self.k.dtype, device=self.device),
                    torch.empty(shape, dtype=self.v.dtype, device=self.device))
        if self.device.type == "cpu":
            self._gathered[key] = bufs                       # most recent last
            if len(self._gathered) > _MAX_GATHERED:
                self._gathered.pop(next(iter(self._gathered)))
        torch.index_select(self.k[:, :, :, :w], 1, idx, out=bufs[0])
        torch.index_select(self.v[:, :, :, :w], 1, idx, out=bufs[1])
        return bufs

    @property
    def accepts_embeds(self) -> bool:
        """Graphs of vision-language models take the prefill's input embeddings (embed_mask, embeds)."""
        return self.spec.has_input("embeds")

    def _pass(self, tokens, *, causal, write, num_valid, draft_lora, temperature, noise, embeds=None) -> StepOut:
        B, L = tokens.shape
        self._fit(int(self._lengths.max()) + L)
        dev, out = self.device, self._buffers(B, L)
        # the host draw fed as float32; zeros at temperature 0
        noise = out["zeros"] if noise is None else noise.to(dev, torch.float32)                     # [B, L, V]
        self._temperature.fill_(float(temperature))
        feeds = {"input_ids": tokens.to(dev, torch.long).contiguous(),                 # [B, L]
                 "cache_lengths": self._lengths.to(dev), "num_valid": num_valid.to(dev),  # [B]
                 "causal": self._causal(B, causal), "temperature": self._temperature,  # [] or [B]
                 "gumbel_noise": noise, "past_keys": self.k, "past_values": self.v}
        if self.spec.has_input("draft_lora"):
            feeds["draft_lora"] = self._flags[bool(draft_lora)]                       # [] bool
        if self.accepts_embeds:                        # image features on the prefill, none elsewhere
            dt = TORCH_DTYPES[self.spec.input("embeds").dtype]
            feeds["embed_mask"] = out["no_embed_mask"] if embeds is None else embeds.mask.to(dev).contiguous()
            feeds["embeds"] = out["no_embeds"] if embeds is None else embeds.values.to(dev, dt).contiguous()
        if self.stage is not None:                     # not a refinement pass: the stage commits nothing
            feeds.update(idle_stage_feeds(feeds["input_ids"]))
        for name, t in feeds.items():
            self._bind(self.io.bind_input, name, t)
        for name in self.spec.output_names():
            self._bind(self.io.bind_output, name, out[name])
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)     # torch's writes land before ORT reads; ORT syncs at the end of Run
        self.session.run_with_iobinding(self.io, self._stage.step_options() if self._stage else None)
        if write:   # the block's K/V at positions lengths[b] + 0..L-1
            scatter_block(self.k, self.v, feeds["cache_lengths"], out["new_keys"], out["new_values"])
        logits = out["logits"].clone() if self.return_logits else None
        return StepOut(out["token"].to("cpu", copy=True), out["confidence"].to("cpu", copy=True), logits)

    def _causal(self, B: int, causal: "bool | torch.Tensor") -> torch.Tensor:
        """The `causal` feed: a 0-d flag, or [B] for graphs that take one per row."""
        if isinstance(causal, torch.Tensor):                  # a mixed pass (`row_causal` graphs only)
            return causal.to(self.device).contiguous()
        flag = self._flags[bool(causal)]
        return flag.expand(B).contiguous() if self.row_causal else flag

    def _buffers(self, B: int, L: int) -> dict[str, torch.Tensor]:
        """Output buffers (shapes from the spec) and the zero noise, allocated once per (batch, block)."""
        if (B, L) not in self._bufs:
            if len(self._bufs) >= _MAX_SHAPES:
                self._bufs.pop(next(iter(self._bufs)))
            dims = {"batch": B, "block": L}
            bufs = {t.name: torch.empty([dims.get(d, d) for d in t.shape], dtype=TORCH_DTYPES[t.dtype],
                                        device=self.device) for t in self.spec.outputs}
            bufs["zeros"] = torch.zeros(B, L, self.config.vocab_size, device=self.device)
            if self.accepts_embeds:
                bufs["no_embed_mask"] = torch.zeros(B, L, dtype=torch.bool, device=self.device)
                bufs["no_embeds"] = torch.zeros(B, L, self.config.hidden_size, device=self.device,
                                                dtype=TORCH_DTYPES[self.spec.input("embeds").dtype])
            self._bufs[(B, L)] = bufs
        return self._bufs[(B, L)]

    def _bind(self, bind, name: str, t: torch.Tensor) -> None:
        bind(name, self.device.type, self.device.index or 0, _ONNX[t.dtype], list(t.shape), t.data_ptr())
