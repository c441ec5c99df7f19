"""`build`: checkpoint -> engine directory (ONNX + external weights, tokenizer, manifest), atomically.

    engines/<name>/
      manifest.json            what was built, from what, with which tools; last validation result
      model.onnx, model.onnx.data   the denoiser step graph and its weights (one copy)
      config.json, tokenizer.json, tokenizer_config.json, ...   copied from the checkpoint
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import InvalidArgument
from ..fsutil import atomic_dir
from .manifest import Manifest, file_digest, write_manifest

if TYPE_CHECKING:  # pragma: no cover
    from ..quant.recipe import Recipe

# precision -> torch dtype name of the exported graph; quantized precisions (quant.RECIPES) keep the
# layers they do not quantize in their recipe's float_dtype
PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
BACKENDS = ("onnxruntime", "tensorrt", "auto")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


@dataclass(frozen=True)
class Buckets:
    """The shapes the runtime will bind: TensorRT profiles are made from these."""

    batch_sizes: tuple[int, ...] = (1, 4)
    max_context: int = 1024          # KV cache positions per row (prompt + generation)
    block_length: int | None = None  # default: the config's block_size

    def to_json(self, block_default: int) -> dict:
        return {"batch_sizes": list(self.batch_sizes), "max_context": self.max_context,
                "block_length": self.block_length or block_default}


def default_output(source: str | Path, precision: str, backend: str) -> Path:
    name = Path(source).name if isinstance(source, Path) else str(source)
    return Path("engines") / f"{name}-{precision}-{backend}"


def build_engine(source: str | Path, *, output: Path | None = None, precision: str = "fp32",
                 backend: str = "onnxruntime", buckets: Buckets = Buckets(), with_logits: bool = False,
                 validate: bool = True, calib: str | Path | None = None, recipe: "Recipe | None" = None,
                 progress: Callable[[str], None] = lambda msg: None) -> Path:
    """Export `source` (checkpoint folder or preset) into an engine directory and return its path.

    Quantized precisions (fp8, int8, int4-awq; nvfp4 where it can be calibrated) follow their recipe
    (`quant.recipe_for(precision)` unless `recipe` is given) and calibrate on `calib` (a --calib
    file) or the built-in prompts."""
    from .. import checkpoint_folder, load_reference
    from ..export.onnx import export_step
    from ..model.checkpoint import CONFIG_NAME
    from ..quant import is_quantized, recipe_for

    if recipe is None and is_quantized(precision):
        recipe = recipe_for(precision)
    if recipe is None and precision not in PRECISION_DTYPES:
        raise InvalidArgument(f"--precision {precision}: expected one of {', '.join(PRECISION_DTYPES)}, "
                              "fp8, int8, int4-awq or nvfp4")
    if recipe is not None:
        recipe.check()
        calib_items = _calib_items(calib)
        from ..quant.ptq import check_available

        check_available(recipe)
    elif calib is not None:
        raise InvalidArgument(f"--calib {calib}: calibration applies to fp8, int8 and int4-awq builds only")
    if backend not in BACKENDS:
        raise InvalidArgument(f"--backend {backend}: expected one of {', '.join(BACKENDS)}")
    if backend == "tensorrt":
        raise InvalidArgument("--backend tensorrt: the TensorRT builder is not available yet; use onnxruntime")
    backend = "onnxruntime"
    output = Path(output or default_output(source, precision, backend))

    progress(f"loading {source} ({precision})")
    model = load_reference(source, dtype=recipe.float_dtype if recipe else PRECISION_DTYPES[precision])
    cfg = model.config
    if buckets.max_context > cfg.max_position_embeddings:
        raise InvalidArgument(f"--max-context {buckets.max_context} exceeds the model's "
                              f"max_position_embeddings {cfg.max_position_embeddings}")
    folder = checkpoint_folder(source)
    quantization = None
    with atomic_dir(output) as tmp:
        if recipe is None:
            progress("exporting the denoiser step to ONNX (dynamo)")
            spec = export_step(model, tmp, with_logits=with_logits)
        else:
            from ..quant.export import quantize_step

            prompts = _calib_prompts(calib_items, folder, cfg, calib)
            spec, quantization = quantize_step(model, recipe, prompts, tmp, with_logits=with_logits,
                                               calib_source=str(calib) if calib else "builtin",
                                               progress=progress)
        (tmp / CONFIG_NAME).write_text(_json(cfg.to_hf()))
        for name in TOKENIZER_FILES:
            if folder is not None and (folder / name).is_file():
                shutil.copyfile(folder / name, tmp / name)
        progress("hashing artifacts")
        artifacts = {p.name: file_digest(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = Manifest(
            backend=backend, precision=precision, source=str(source), model_config=cfg.to_hf(),
            weights_sha256=_weights_hash(folder, source), io_spec=spec.to_json(),
            buckets=buckets.to_json(cfg.block_size), artifacts=artifacts, tool_versions=_tool_versions(),
            quantization=quantization,
        )
        write_manifest(tmp, manifest)
    if validate:
        progress("validating against the PyTorch reference")
        from ..validate.engine import validate_engine

        # a quantized build calibrated `model` in place: the reference is a fresh float copy
        validate_engine(output, reference=None if recipe else model, quick=True)
    return output


def _calib_items(calib: str | Path | None) -> list[dict]:
    from ..quant.calib import read_prompts

    return read_prompts(calib)


def _calib_prompts(items: list[dict], folder: Path | None, cfg, calib) -> list[list[int]]:
    """Token ids to calibrate on: the items through the checkpoint's tokenizer; random ids for the
    built-in set on a model without one (random-weight presets)."""
    from ..quant.calib import encode_prompts, random_prompts

    tok = None
    if folder is not None and (folder / "tokenizer.json").is_file():
        from ..model.tokenizer import load_tokenizer

        tok = load_tokenizer(folder)
    if tok is None and calib is None:
        return random_prompts(cfg)
    return encode_prompts(items, tok, cfg, source=f"--calib {calib}" if calib else "built-in prompts")


def _weights_hash(folder: Path | None, source: str | Path) -> str:
    """sha256 over the checkpoint's weight files (names and bytes), or the preset's seed."""
    if folder is None:
        return f"random-weights:{source}:seed0"
    h = hashlib.sha256()
    for f in sorted(folder.glob("model*.safetensors")):
        h.update(f.name.encode())
        h.update(file_digest(f)["sha256"].encode())
    return h.hexdigest()


def _tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("nemodiff-compile", "torch", "onnx", "onnxscript", "onnxruntime", "transformers", "nvidia-modelopt"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _json(d: dict) -> str:
    import json

    return json.dumps(d, indent=2) + "\n"
