"""Graph checks after export: onnx.checker, shape inference, dims symbolic where the spec says so."""

from __future__ import annotations

from pathlib import Path

from ..errors import NemodiffError
from ..artifact.spec import IOSpec


def check_graph(path: Path, spec: IOSpec) -> None:
    import onnx

    onnx.checker.check_model(str(path), full_check=False)
    model = onnx.load(str(path), load_external_data=False)
    onnx.shape_inference.infer_shapes(model, strict_mode=False)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < spec.opset:
        raise NemodiffError(f"{path}: opset {opset}, expected at least {spec.opset}")
    by_name = {t.name: t for t in (*spec.inputs, *spec.outputs)}
    io = list(model.graph.input) + list(model.graph.output)
    if sorted(v.name for v in io) != sorted(by_name):
        raise NemodiffError(f"{path}: graph I/O {sorted(v.name for v in io)} differs from the spec {sorted(by_name)}")
    for vi in io:
        dims = vi.type.tensor_type.shape.dim
        want = by_name[vi.name].shape
        if len(dims) != len(want):
            raise NemodiffError(f"{path}: {vi.name} has rank {len(dims)}, expected {len(want)}")
        for d, w in zip(dims, want):
            if isinstance(w, str) and d.HasField("dim_value"):
                raise NemodiffError(f"{path}: dim {w!r} of {vi.name} became static ({d.dim_value}) at export")
            if isinstance(w, int) and d.HasField("dim_value") and d.dim_value != w:
                raise NemodiffError(f"{path}: {vi.name} has size {d.dim_value}, expected {w}")
