"""Late-bound weights: the step is traced from a weightless meta twin and every initializer is read
from the live model only while the graph is written (export/weights.py)."""

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")


def _initializers(path):
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def test_bf16_model_written_as_fp32_equals_the_fp32_export(tmp_path, monkeypatch):
    """Exporting a bf16-held model with dtype=float32 writes exactly what exporting the same weights
    held in fp32 writes (bf16 -> fp32 is exact; transposes folded the same way), so a quantized
    build can calibrate the model as stored and still write fp32 float parts. The bf16 export is
    written in chunks of a few rows (as a large model's tensors are)."""
    from nemodiff_compile import load_reference
    from nemodiff_compile.export import weights
    from nemodiff_compile.export.onnx import export_step

    fp32 = load_reference("tiny").to(torch.bfloat16).to(torch.float32)       # bf16-representable
    bf16 = load_reference("tiny").to(torch.bfloat16)
    export_step(fp32, tmp_path / "a")
    monkeypatch.setattr(weights, "CHUNK_BYTES", 3000)                         # 192-float rows: 3 per chunk
    export_step(bf16, tmp_path / "b", dtype=torch.float32)
    a, b = _initializers(tmp_path / "a" / "model.onnx"), _initializers(tmp_path / "b" / "model.onnx")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
    head = a["model.diffusion_head.weight.T"]                                  # MatMul's W^T, folded
    assert np.array_equal(head, fp32.diffusion_head.weight.detach().numpy().T)


def test_nothing_is_read_before_the_graph_is_written(monkeypatch):
    """Tracing touches no weight, binding and folding read none: every model initializer is still a
    lazy read when the graph reaches the writer (the model is never copied whole)."""
    from nemodiff_compile import load_reference
    from nemodiff_compile.export import weights
    from nemodiff_compile.export.onnx import trace_step

    model = load_reference("tiny")
    graph, _ = trace_step(model)
    reads = []
    real = weights.to_ir
    monkeypatch.setattr(weights, "to_ir", lambda *a, **k: reads.append(a[2]) or real(*a, **k))
    assert weights.bind(graph, model) == len(graph.graph.initializers) - 1 > 50
    assert weights.fold_transposes(graph) == 6 * 7 + 1                         # every Linear's W^T
    assert reads == []
    eager = [n for n, v in graph.graph.initializers.items() if not isinstance(v.const_value, weights.Lazy)]
    assert eager == ["model.inv_freq"]                                         # 16 floats from the config
    q = graph.graph.initializers["model.encoder.layers.0.self_attn.q_proj.weight.T"].const_value
    assert np.array_equal(q.numpy(), model.encoder.layers[0].self_attn.q_proj.weight.detach().numpy().T)
    assert reads == ["model.encoder.layers.0.self_attn.q_proj.weight.T"]


def test_a_graph_tensor_missing_from_the_model_is_one_line(tmp_path):
    from nemodiff_compile import load_reference
    from nemodiff_compile.errors import NemodiffError
    from nemodiff_compile.export import weights
    from nemodiff_compile.export.onnx import trace_step

    model = load_reference("tiny")
    graph, _ = trace_step(model)
    other = load_reference("tiny")
    other.encoder.layers[1].mlp.up_proj.weight = torch.nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(NemodiffError, match=r"layers.1.mlp.up_proj.weight: model tensor is \[3, 3\]"):
        weights.bind(graph, other)


@pytest.mark.parametrize("shape, dtype, perm", [((), torch.float32, None), ((5, 7), torch.float32, (1, 0)),
                                                ((4, 3), torch.bfloat16, None), ((2, 3, 4), torch.float16, (2, 0, 1))])
def test_chunked_writes_equal_the_evaluated_tensor(shape, dtype, perm, monkeypatch):
    """What Lazy.tofile streams in chunks (2 rows here) is byte for byte what evaluating the tensor gives."""
    import io

    from nemodiff_compile.export import weights

    monkeypatch.setattr(weights, "CHUNK_BYTES", 2 * 7 * 4)
    t = torch.randn(shape, dtype=torch.bfloat16)
    lazy = weights.model_tensor(t, dtype, "w", perm)
    f = io.BytesIO()
    lazy.tofile(f)
    assert f.getvalue() == lazy.tobytes()
    want = (t if perm is None else t.permute(perm)).to(dtype).contiguous()
    assert f.getvalue() == want.reshape(-1).view(torch.uint8).numpy().tobytes()
