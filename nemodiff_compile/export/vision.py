"""Export the VLM's vision encoder + projector (model/vision.py) as the engine directory's second graph.

    vision.onnx + vision.onnx.data: pixels [3, height, width] float32 -> features [tokens, hidden] float32

height and width are dynamic multiples of patch * merge (28), each at most `max_side` (the config's
max_image_size rounded up to 28); one image per run (the runtime runs it once per image). The graph is
float whatever the build's precision: fp8 / int8 recipes quantize the step graph only (the vision tower
stays in its float dtype, fp32 by default: not measured otherwise). Traced from a weightless meta twin
and bound to the live weights while written, as the step graph is (export/weights.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from ..artifact.spec import OPSET, VISION_ONNX, vision_spec
from ..errors import NemodiffError

VISION_WEIGHTS = "vision.onnx.data"


class _VisionGraph(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, pixels):
        return self.encoder(pixels).float()


def export_vision(model, out_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> dict:
    """Write out_dir/vision.onnx (+ .data) atomically; returns its spec (artifact/spec.vision_spec)."""
    import onnx_ir as ir
    import onnxscript.optimizer

    from ..model.vision import VisionEncoder
    from .weights import bind, fold_transposes, meta_twin

    vc = model.vision_config
    m = vc.merge_patch
    max_tokens = -(-vc.image_size // m)                      # per side
    twin = meta_twin(model, dtype)
    graph_module = _VisionGraph(twin.vision_encoder)
    h = torch.export.Dim("h_tokens", min=1, max=max_tokens)
    w = torch.export.Dim("w_tokens", min=1, max=max_tokens)
    example = torch.zeros(3, 2 * m, 3 * m, device="meta")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(graph_module, (example,), dynamo=True, opset_version=OPSET,
                                 input_names=["pixels"], output_names=["features"],
                                 dynamic_shapes=({1: m * h, 2: m * w},), optimize=False, verbose=False)
    if prog is None:  # pragma: no cover
        raise NemodiffError("torch.onnx.export returned no vision program")
    graph = prog.model
    live = _VisionGraph(VisionEncoder(model.encoder.vision_tower, model.encoder.multi_modal_projector))
    bind(graph, live, prefix="")
    fold_transposes(graph)
    onnxscript.optimizer.optimize_ir(graph)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-vision.", dir=out_dir))
    try:
        ir.save(graph, tmp / VISION_ONNX, external_data=VISION_WEIGHTS, alignment=64)
        import onnx

        onnx.checker.check_model(str(tmp / VISION_ONNX), full_check=False)
        for name in (VISION_ONNX, VISION_WEIGHTS):
            os.chmod(tmp / name, 0o644)
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return vision_spec(model.config.hidden_size, m, max_tokens * m)
