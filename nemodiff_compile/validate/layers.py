"""Where in the model a failing engine leaves the reference: the decoder layers' outputs (the
residual stream, [B, L, hidden]) of one pass, engine against fp32 reference, on identical inputs.

    with tap(reference) as r, tap(engine) as e:    # hooks (torch) / extra graph outputs (ONNX Runtime)
        ...run passes...; r.arm(); ...the pass...   # r.states / e.states: one [B, L, H] per layer
    layer_errors(r.states, e.states, valid)         # relative error per layer and the largest jump

A `TorchDenoiser` (the reference, or a fake-quantized torch model) is tapped with forward hooks on
its decoder layers. An `OrtDenoiser` is tapped by opening a second session on the same graph with
each decoder layer's last node (its residual Add, found by the exporter's name-scope metadata) added
as a graph output; the weights file is read in place (nothing is written next to the engine).
Other backends (TensorRT plans) cannot be tapped: `tap` raises `Untappable` with the reason.
"""

from __future__ import annotations

import ast
import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch


class Untappable(Exception):
    """This backend's per-layer activations cannot be read."""


class _Tap:
    def __init__(self, layers: int):
        self.layers = layers
        self.armed = False
        self.states: list[torch.Tensor] | None = None          # per layer [B, L, H], float32, host

    def arm(self) -> None:
        """Capture the next pass's layer outputs (and only that one)."""
        self.armed, self.states = True, None

    def _took(self, states: list[torch.Tensor]) -> None:
        self.states, self.armed = [s.detach().float().cpu() for s in states], False


@contextlib.contextmanager
def tap(denoiser: Any) -> Iterator[_Tap]:
    """Tap `denoiser`'s decoder-layer outputs for the duration (see the module docstring)."""
    model = getattr(denoiser, "model", None)
    if model is not None and hasattr(model, "encoder"):
        with _tap_torch(model) as t:
            yield t
        return
    if hasattr(denoiser, "session") and hasattr(denoiser, "io") and hasattr(denoiser, "onnx_path"):
        with _tap_ort(denoiser) as t:
            yield t
        return
    raise Untappable(f"{type(denoiser).__name__}: per-layer activations are read from torch models and "
                     "ONNX Runtime sessions only")


@contextlib.contextmanager
def _tap_torch(model) -> Iterator[_Tap]:
    layers = list(model.encoder.layers)
    t = _Tap(len(layers))
    got: list[torch.Tensor] = []

    def hook(_m, _args, out):
        if t.armed:
            got.append(out[0] if isinstance(out, tuple) else out)
            if len(got) == len(layers):
                t._took(got)
                got.clear()

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        yield t
    finally:
        for h in handles:
            h.remove()


def layer_output_names(onnx_path: str | Path) -> list[str]:
    """The graph value each decoder layer ends with (layer order): the output of the last node under
    its `...encoder.layers.<i>` name scope, which is the layer's residual Add."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    last: dict[int, tuple[str, str]] = {}
    for node in m.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        for s in scopes:
            head, _, idx = s.rpartition(".")
            if head.endswith("encoder.layers") and idx.isdigit():
                last[int(idx)] = (node.op_type, node.output[0])
                break
    if not last:
        raise Untappable(f"{onnx_path}: no node carries the exporter's decoder-layer name scopes")
    n = max(last) + 1
    if sorted(last) != list(range(n)) or any(op != "Add" for op, _ in last.values()):
        raise Untappable(f"{onnx_path}: the decoder layers' last nodes are not their residual Adds")
    return [last[i][1] for i in range(n)]


@contextlib.contextmanager
def _tap_ort(den) -> Iterator[_Tap]:
    import onnx
    import onnxruntime as ort

    path = Path(den.onnx_path)
    names = layer_output_names(path)
    m = onnx.load(str(path), load_external_data=False)
    outs = {o.name: o.type.tensor_type.elem_type for o in m.graph.output}
    ftype = outs.get("logits", onnx.TensorProto.FLOAT)      # the graph's float dtype (the hidden states')
    for name in names:
        m.graph.output.append(onnx.helper.make_tensor_value_info(name, ftype, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = den.session.get_session_options().graph_optimization_level
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    try:
        session = ort.InferenceSession(m.SerializeToString(), opts, providers=den.session.get_providers())
    except Exception as e:          # ORT's pybind errors have no common base
        raise Untappable(f"{path}: ONNX Runtime cannot open the graph with its layer outputs exposed "
                         f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None
    t = _Tap(len(names))
    saved_session, saved_io, saved_step = den.session, den.io, den.step
    den.session, den.io = session, session.io_binding()

    def step(*args, **kwargs):
        den.io.clear_binding_outputs()
        if t.armed:                                   # bound first: the first len(names) outputs
            for name in names:
                den.io.bind_output(name, "cpu")
        out = saved_step(*args, **kwargs)
        if t.armed:
            vals = den.io.get_outputs()[: len(names)]
            t._took([torch.from_numpy(v.numpy()) for v in vals])
        return out

    den.step = step
    try:
        yield t
    finally:
        den.session, den.io = saved_session, saved_io
        del den.step                                  # the class's method again


def layer_errors(ref: list[torch.Tensor], eng: list[torch.Tensor], valid: torch.Tensor) -> dict[str, Any]:
    """ref, eng: per layer [B, L, H]; valid [B, L] bool -> {"relative": per-layer ||e - r|| / ||r||
    over the valid positions, "furthest": the layer with the largest, "jump": the layer whose
    relative error rose the most over the previous layer's (layer 0: over 0)}."""
    rel = []
    for r, e in zip(ref, eng, strict=True):
        r, e = r[valid].double(), e[valid].double()                 # [N, H]
        rel.append(float((e - r).norm() / r.norm().clamp_min(1e-30)))
    rises = [rel[0]] + [b - a for a, b in zip(rel, rel[1:])]
    return dict(relative=rel, furthest=max(range(len(rel)), key=rel.__getitem__),
                jump=max(range(len(rises)), key=rises.__getitem__), rise=max(rises))
