"""The graph's weights, bound late: trace on the meta device, read each tensor from the live model
only while it is written.

`torch.onnx.export` of the real model holds the model plus a transposed copy of every Linear weight
(the optimizer folds `Transpose(W)` into a new constant), and a quantized build would hold a float
copy next to the calibrated one. Instead the step is traced from a weightless meta-device twin, and
every initializer of the traced graph becomes a lazy tensor that reads the live model's tensor (by
its module path), casts it to the graph's dtype and transposes it where the graph wants W^T.
`onnx_ir.save` writes them one at a time into the external data file, each in chunks of 16 MiB, so
exporting holds next to the model only a chunk (or, for a quantized layer, that layer's codes).
"""

from __future__ import annotations

import operator
from functools import partial
from typing import Callable

import numpy as np
import onnx_ir as ir
import torch

from ..errors import NemodiffError


CHUNK_BYTES = 16 << 20                 # a model tensor is converted and written this much at a time
# called with the bytes of every chunk `Lazy.tofile` writes (save_step's progress bar); None: silent
on_write: Callable[[int], None] | None = None


class Lazy(ir.LazyTensor):
    """onnx_ir's LazyTensor, written without a whole second copy: a model tensor (`source`: tensor,
    dtype, perm) is converted and written in row chunks of about CHUNK_BYTES; anything else is
    written straight from its array (the base class copies it to bytes first)."""

    source: tuple[torch.Tensor, torch.dtype, tuple[int, ...] | None] | None = None

    def tofile(self, file) -> None:
        if self.source is None:
            array = self._evaluate()
            array.tofile(file)
            if on_write is not None:
                on_write(array.nbytes)
            return
        tensor, dtype, perm = self.source
        t = tensor.detach() if perm is None else tensor.detach().permute(perm)
        row_bytes = (t[0].numel() if t.dim() else 1) * dtype.itemsize
        for chunk in (t.split(max(1, CHUNK_BYTES // row_bytes)) if t.dim() else (t,)):
            data = numpy(chunk.to("cpu", dtype).contiguous()).reshape(-1).view(np.uint8)
            file.write(data.data)  # no copy
            if on_write is not None:
                on_write(data.nbytes)


def model_tensor(tensor: torch.Tensor, dtype: torch.dtype, name: str, perm: tuple[int, ...] | None = None) -> Lazy:
    """A lazy initializer reading `tensor` as `dtype`, permuted by `perm` (None: as is)."""
    shape = tensor.shape if perm is None else tuple(tensor.shape[i] for i in perm)
    lazy = Lazy(partial(to_ir, tensor, dtype, name, perm), dtype=ir.DataType.from_numpy(np_dtype(dtype)),
                shape=ir.Shape(shape), name=name)
    lazy.source = (tensor, dtype, perm)
    return lazy


def meta_twin(model, dtype: torch.dtype):
    """The model `load_reference(dtype=...)` would give, on the meta device: same config and draft
    LoRA, no storage (a ModelOpt-calibrated model gives its float twin)."""
    from ..model.checkpoint import meta_model

    twin = meta_model(model.config).to(dtype)
    if model.has_draft_lora:
        attns = [layer.self_attn for layer in model.encoder.layers]
        twin.set_draft_lora([torch.empty_like(a.lora_a, device="meta") for a in attns],
                            [torch.empty_like(a.lora_b, device="meta") for a in attns], attns[0].lora_scale)
    return twin.eval()


def bind(graph_model, source: torch.nn.Module, prefix: str = "model.") -> int:
    """Make every meta initializer of `graph_model` (onnx_ir) a lazy read of `source`'s tensor of the
    same path (initializer "model.encoder.layers.0.mlp.up_proj.weight" -> source.encoder...), cast to
    the initializer's dtype. Returns how many were bound."""
    n = 0
    for name, value in graph_model.graph.initializers.items():
        raw = getattr(value.const_value, "raw", None)
        if not (isinstance(raw, torch.Tensor) and raw.is_meta):
            continue
        try:
            tensor = operator.attrgetter(name.removeprefix(prefix))(source)
        except AttributeError:
            raise NemodiffError(f"graph initializer {name} has no tensor in the model") from None
        if tuple(tensor.shape) != tuple(raw.shape):
            raise NemodiffError(f"graph initializer {name}: model tensor is {list(tensor.shape)}, "
                                f"the graph expects {list(raw.shape)}")
        value.const_value = model_tensor(tensor, raw.dtype, name)
        n += 1
    return n


def fold_transposes(graph_model) -> int:
    """Replace each `Transpose(initializer)` by a lazily transposed initializer (what the exporter's
    optimizer does eagerly, holding both copies). Returns how many were folded."""
    graph = graph_model.graph
    n = 0
    for node in list(graph):
        src = node.inputs[0] if node.op_type == "Transpose" and node.domain == "" else None
        source = getattr(src.const_value, "source", None) if src is not None and src.is_initializer() else None
        if source is None:
            continue
        tensor, dtype, before = source
        if before is not None:
            continue
        perm = node.attributes["perm"].as_ints() if "perm" in node.attributes else None
        perm = tuple(perm) if perm else tuple(reversed(range(tensor.dim())))
        name = f"{src.name}.T"
        lazy = model_tensor(tensor, dtype, name, perm)
        out = ir.Value(name=name, shape=lazy.shape, type=ir.TensorType(lazy.dtype), const_value=lazy)
        graph.register_initializer(out)
        node.outputs[0].replace_all_uses_with(out)
        graph.remove(node, safe=True)
        if not src.uses():
            graph.initializers.pop(src.name)
        n += 1
    return n


def lazy_initializer(graph_model, name: str, fn: Callable[[], np.ndarray], dtype, shape):
    """Register a new initializer `name` whose data is `fn()` (numpy, read as ONNX `dtype`), computed
    only when the graph is written; returns its value."""
    lazy = Lazy(lambda: ir.Tensor(fn(), dtype=dtype), dtype=dtype, shape=ir.Shape(shape), name=name)
    out = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype), const_value=lazy)
    graph_model.graph.register_initializer(out)
    return out


def to_ir(tensor: torch.Tensor, dtype: torch.dtype, name: str, perm: tuple[int, ...] | None = None):
    """One tensor of the live model as an onnx_ir tensor in `dtype`, permuted by `perm` (for the
    optimizer's constant folding and tests; writing goes through `Lazy.tofile`)."""
    t = tensor.detach() if perm is None else tensor.detach().permute(perm)
    out = torch.empty(t.shape, dtype=dtype)
    out.copy_(t)
    return ir.Tensor(numpy(out), name=name)


def numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as numpy, bfloat16 / float8 through ml_dtypes (numpy has neither)."""
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype == torch.float8_e4m3fn:
        import ml_dtypes

        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    return t.numpy()


def np_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype `numpy()` gives for a torch dtype (ml_dtypes for bfloat16 / float8)."""
    return numpy(torch.empty(0, dtype=dtype)).dtype
