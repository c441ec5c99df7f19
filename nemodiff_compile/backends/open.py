"""`open_engine(dir)`: a built engine directory as a running `Denoiser`, its manifest read and checked once.

Session.open, validate and bench all open engine directories through here: the manifest (files, sizes,
runtime version: `artifact/manifest.py`), the model config and I/O spec it records, the backend it names
(ONNX Runtime, or the TensorRT plan for this GPU: `trt.select_plan`) and the tokenizer files beside it.
A directory that a build swaps while it is opened is opened again (fsutil.read_stable), so an Engine never
mixes the files of two builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..artifact.manifest import Manifest, read_manifest
from ..artifact.spec import IOSpec
from ..config import ModelConfig
from ..decoding.denoiser import Denoiser
from ..errors import InvalidArgument
from ..fsutil import read_stable


@dataclass
class Engine:
    path: Path
    manifest: Manifest
    config: ModelConfig
    spec: IOSpec
    denoiser: Denoiser
    tokenizer: Any = None             # tokenizers.Tokenizer, or None when the directory has none


def open_engine(engine_dir: str | Path, *, max_len: int | None = None, providers: list[str] | None = None,
                threads: int | None = None, return_logits: bool | None = False, verify: str = "size") -> Engine:
    """max_len: KV cache positions (default: the build's max_context); providers / threads: ONNX Runtime's;
    return_logits: None returns them wherever the graph has them (validation builds), else as asked;
    verify: "size" (each artifact's size) or "sha256" (every byte re-hashed against the manifest)."""
    if verify not in ("size", "sha256"):
        raise InvalidArgument(f"verify {verify!r}: expected 'size' or 'sha256'")
    return read_stable(engine_dir, lambda: _open(Path(engine_dir), max_len, providers, threads, return_logits,
                                                 verify == "sha256"))


def _open(engine_dir: Path, max_len, providers, threads, return_logits, deep: bool) -> Engine:
    manifest = read_manifest(engine_dir, deep=deep)
    config = ModelConfig.from_hf(manifest.model_config, source=f"{engine_dir}/manifest.json")
    spec = IOSpec.from_json(manifest.io_spec)
    max_len = max_len or int(manifest.buckets["max_context"])
    if manifest.backend == "tensorrt":      # the plan for this GPU, or a refusal naming what to build
        from .trt import TrtDenoiser

        den = TrtDenoiser(engine_dir, manifest, config, max_len)
    else:
        from .ort import OrtDenoiser

        logits = "logits" in spec.output_names() if return_logits is None else return_logits
        den = OrtDenoiser(engine_dir / "model.onnx", spec, config, max_len, providers=providers, threads=threads,
                          return_logits=logits)
    vision = spec.extra.get("vision")
    if vision is not None:              # a vision-language engine: its second graph encodes the images
        den.encode_image = _vision(engine_dir, manifest, den, vision, providers, threads)
    tok = None
    if (engine_dir / "tokenizer.json").is_file():
        from ..model.tokenizer import load_tokenizer

        tok = load_tokenizer(engine_dir)
    return Engine(engine_dir, manifest, config, spec, den, tok)


def _vision(engine_dir: Path, manifest: Manifest, den, vision: dict, providers, threads):
    """The vision plan of the chosen TensorRT plan (trt_vision.py); ONNX Runtime's session of vision.onnx for
    ONNX Runtime directories and for TensorRT directories built before vision plans existed (with a warning)."""
    if manifest.backend == "tensorrt":
        if "vision" in den.entry:
            from .trt_vision import TrtVision

            return TrtVision(engine_dir, den.entry["vision"], vision, trt=den.trt, runtime=den.runtime,
                             device=den.device)
        import warnings

        warnings.warn(f"{engine_dir}: {den.entry['file']} has no vision plan (an older build): the vision graph "
                      "runs under ONNX Runtime; rebuild the directory for a TensorRT vision plan", stacklevel=3)
    from .ort_vision import OrtVision

    return OrtVision(engine_dir, vision, providers=providers, threads=threads)
