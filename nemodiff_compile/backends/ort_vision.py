"""The engine directory's vision graph (export/vision.py) under ONNX Runtime: pixels in, image features out.

One image per run: pixels [3, H, W] float32 (preprocessed: H and W multiples of the spec's merge_patch, at most
its max_side) -> features [(H/28)*(W/28), hidden] float32. `open_engine` attaches it to the step backend as
`encode_image` (what Session's image prompts call), for ONNX Runtime and TensorRT directories alike.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InvalidArgument, NemodiffError


class OrtVision:
    def __init__(self, engine_dir: Path, spec: dict, *, providers: list | None = None, threads: int | None = None):
        import onnxruntime as ort

        self.spec = spec
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        path = Path(engine_dir) / spec["file"]
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
        except Exception as e:     # onnxruntime's pybind errors have no common base
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise NemodiffError(f"{path}: ONNX Runtime cannot load the vision graph: {first}") from None

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [3, H, W] -> features [tokens, hidden] float32 (host)."""
        m, top = self.spec["merge_patch"], self.spec["max_side"]
        _, H, W = pixels.shape
        if H % m or W % m or not 0 < H <= top or not 0 < W <= top:
            raise InvalidArgument(f"image of {H}x{W} pixels: the engine's vision graph takes multiples of {m} "
                                  f"up to {top} per side (preprocess it with model/images.py)")
        x = pixels.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(["features"], {"pixels": x})[0])
