"""`build`: checkpoint -> engine directory (ONNX + external weights, tokenizer, manifest), atomically.

    engines/<name>/
      manifest.json            what was built, from what, with which tools; last validation result
      model.onnx, model.onnx.data   the denoiser step graph and its weights (one copy)
      config.json, tokenizer.json, tokenizer_config.json, ...   copied from the checkpoint
      engine.<sm>.<trt>-<ver>.plan  backend tensorrt: one serialized engine per GPU target, each with
                               its own entry in manifest["engines"] (artifact/targets.py picks one at load)

`--backend tensorrt --gpus sm89` on an existing TensorRT engine directory adds (or rebuilds) those
targets from the directory's own model.onnx, keeping the others; the directory is replaced atomically.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .build_config import BACKENDS, PRECISION_DTYPES
from .errors import InvalidArgument
from .fsutil import atomic_dir
from .artifact.manifest import Manifest, file_digest, write_manifest

if TYPE_CHECKING:  # pragma: no cover  (the builder and quant/ are imported late)
    from .quant.recipe import Recipe
    from .trt.builder import BuildOptions

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
                 progress: Callable[[str], None] = lambda msg: None,
                 gpus: tuple[str, ...] | None = None, remask: str = "none", remask_threshold: float | None = 0.9,
                 trt_options: "BuildOptions | None" = None, calib_device: str = "auto") -> Path:
    """Export `source` (checkpoint folder or preset) into an engine directory and return its path.

    Quantized precisions (fp8, int8, int4-awq; nvfp4 where it can be calibrated) follow their recipe
    (`quant.recipe_for(precision)` unless `recipe` is given) and calibrate on `calib` (a --calib
    file) or the built-in prompts, on `calib_device` (auto: cuda when available, else cpu).
    backend tensorrt: also one engine per GPU target in `gpus` (default: this machine's GPU);
    remask none | onnx | plugin: the remask stage in the graph (plugin: the nemodiff::Remask node,
    TensorRT only); remask_threshold None selects the top-k policy."""
    quant, backend = check_options(precision=precision, backend=backend, calib=calib, recipe=recipe, gpus=gpus,
                                   remask=remask, calib_device=calib_device)
    output = Path(output or default_output(source, precision, backend))
    if backend == "tensorrt":
        return _build_tensorrt(source, output=output, precision=precision, buckets=buckets,
                               with_logits=with_logits, progress=progress, gpus=gpus, remask=remask,
                               remask_threshold=remask_threshold, options=trt_options, quant=quant)

    with atomic_dir(output) as tmp:
        model = _export_into(tmp, source, precision=precision, backend=backend, buckets=buckets,
                             with_logits=with_logits, remask=remask, remask_threshold=remask_threshold,
                             progress=progress, quant=quant)
    if validate and remask != "none":
        progress("validation skipped: the decode loops drive graphs without the remask stage")
    elif validate:
        progress("validating against the PyTorch reference")
        from .validate.engine import validate_engine

        # a quantized build calibrated `model` in place: the reference is then a fresh float copy
        validate_engine(output, reference=None if quant else model, quick=True)
    return output


def check_options(*, precision: str, backend: str, calib=None, recipe: "Recipe | None" = None, gpus=None,
                  remask: str = "none", calib_device: str = "auto", load: bool = True) -> tuple["_Quant | None", str]:
    """The build options checked (one-line InvalidArgument) before anything is loaded: the
    quantization to run (None for float precisions) and the backend ("auto" resolved).
    load=False: look for ModelOpt without importing it (seconds saved before a plan is stated)."""
    from .quant import is_quantized, recipe_for

    if recipe is None and is_quantized(precision):
        recipe = recipe_for(precision)
    if recipe is None and precision not in PRECISION_DTYPES:
        raise InvalidArgument(f"--precision {precision}: expected one of {', '.join(PRECISION_DTYPES)}, "
                              "fp8, int8, int4-awq or nvfp4")
    quant = None
    if recipe is not None:
        recipe.check()
        from .quant.calibration import read_items
        from .quant.ptq import check_available

        quant = _Quant(recipe, calib, read_items(calib), _calib_device(calib_device))
        check_available(recipe, load=load)
    elif calib is not None or calib_device != "auto":
        flag = f"--calib {calib}" if calib is not None else f"--calib-device {calib_device}"
        raise InvalidArgument(f"{flag}: calibration applies to fp8, int8 and int4-awq builds only")
    if backend not in BACKENDS:
        raise InvalidArgument(f"--backend {backend}: expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "onnxruntime"
    if gpus and backend != "tensorrt":
        raise InvalidArgument("--gpus: only TensorRT engines are per GPU; add --backend tensorrt")
    if remask == "plugin" and backend != "tensorrt":
        raise InvalidArgument("--remask plugin: the nemodiff::Remask node runs only in TensorRT; add "
                              "--backend tensorrt, or use --remask onnx")
    return quant, backend


@dataclass(frozen=True)
class _Quant:
    recipe: "Recipe"
    calib: str | Path | None          # the --calib file, None for the built-in prompts
    items: list                       # its prompts, read and checked before anything is exported
    device: str                       # where the model is loaded and calibrated: cpu | cuda


def _calib_device(choice: str) -> str:
    if choice not in ("auto", "cpu", "cuda"):
        raise InvalidArgument(f"--calib-device {choice}: expected auto, cpu or cuda")
    if choice == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if choice == "cuda":
        raise InvalidArgument("--calib-device cuda: this machine has no CUDA GPU; use --calib-device cpu")
    return "cpu"


def _export_into(tmp: Path, source, *, precision: str, backend: str, buckets: Buckets, with_logits: bool,
                 remask: str, remask_threshold, progress: Callable[[str], None], quant: _Quant | None = None):
    """Fill `tmp` with the step graph (quantized when `quant` is given), config, tokenizer and
    manifest; return the loaded reference."""
    from . import checkpoint_folder, load_reference
    from .export.onnx import export_step, remask_options
    from .model.checkpoint import CONFIG_NAME

    progress(f"loading {source} ({precision}{', calibrating on ' + quant.device if quant else ''})")
    # a quantized build calibrates the model as stored (one copy in memory); the graph's float parts
    # are cast to the recipe's float_dtype tensor by tensor while written
    start = time.perf_counter()
    model = load_reference(source, dtype=None if quant else PRECISION_DTYPES[precision],
                           device=quant.device if quant else "cpu")
    progress(f"loaded in {time.perf_counter() - start:.1f} s")
    cfg = model.config
    if buckets.max_context > cfg.max_position_embeddings:
        raise InvalidArgument(f"--max-context {buckets.max_context} exceeds the model's "
                              f"max_position_embeddings {cfg.max_position_embeddings}")
    folder = checkpoint_folder(source)
    quantization = None
    remask_opts = remask_options(remask, mask_id=cfg.mask_token_id, threshold=remask_threshold)
    if quant is None:
        progress("exporting the denoiser step to ONNX (dynamo)")
        start = time.perf_counter()
        spec = export_step(model, tmp, with_logits=with_logits, remask=remask_opts)
        progress(f"exported in {time.perf_counter() - start:.1f} s")
    else:
        from .quant.export import quantize_step
        from .quant import calibration

        prompts = calibration.token_prompts(quant.items, folder, cfg, quant.calib)
        r = quant.recipe
        loop = calibration.decoding_loop(prompts, r.calib_modes, r.calib_max_new_tokens, cfg.block_size)
        spec, quantization = quantize_step(model, r, loop, tmp, with_logits=with_logits, remask=remask_opts,
                                           calibration=calibration.record(prompts, quant.calib), progress=progress)
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
    if backend == "tensorrt":
        manifest.requires = {}            # the plans are checked per GPU at load (artifact/targets.py)
    write_manifest(tmp, manifest)
    return model


def _build_tensorrt(source, *, output: Path, precision: str, buckets: Buckets, with_logits: bool,
                    progress: Callable[[str], None], gpus, remask: str, remask_threshold, options,
                    quant: _Quant | None = None) -> Path:
    """Export once (or reuse the directory's graph when adding targets), then one plan per target."""
    from .artifact.manifest import EngineError, MANIFEST_NAME, read_manifest
    from .artifact.targets import current_device, engine_file_name
    from .trt.builder import BuildOptions, build_plan, resolve_target
    from .backends.trt_shim import load

    trt = load()
    options = options or BuildOptions()
    existing = None
    if (output / MANIFEST_NAME).is_file():
        try:
            existing = read_manifest(output)
        except EngineError:
            existing = None
    reuse = (existing is not None and existing.backend == "tensorrt" and existing.precision == precision
             and existing.source == str(source) and gpus is not None
             and existing.io_spec.get("extra", {}).get("remask", {}).get("variant", "none") == remask)
    device = current_device()
    targets = [resolve_target(trt, t, device) for t in (gpus or [None])]     # refuse before exporting
    if remask == "plugin" and not trt.can_build_plugins:
        from .trt.builder import TrtBuildError

        raise TrtBuildError(f"--remask plugin: the graph would need nemodiff::Remask/1, and {trt.flavor} "
                            f"{trt.version} cannot build plugin layers (no INetworkDefinition.add_plugin_v3): "
                            "use --remask onnx, or build with the tensorrt module")
    with atomic_dir(output) as tmp:
        if reuse:
            progress(f"adding {', '.join(gpus)} to {output}")
            for f in output.iterdir():
                if f.is_file() and f.name != MANIFEST_NAME:
                    _link_or_copy(f, tmp / f.name)
            manifest = existing
        else:
            _export_into(tmp, source, precision=precision, backend="tensorrt", buckets=buckets,
                         with_logits=with_logits, remask=remask, remask_threshold=remask_threshold,
                         progress=progress, quant=quant)
            manifest = read_manifest(tmp)
        manifest.tool_versions[trt.flavor] = trt.version
        for target in targets:
            data, info = build_plan(tmp / "model.onnx", io_spec=manifest.io_spec, buckets=manifest.buckets,
                                    precision=precision, target=target, options=options, progress=progress,
                                    trt=trt, device=device)
            name = engine_file_name(info.target, info.trt_module, info.trt_version)
            (tmp / name).write_bytes(data)
            on_device = device is not None and device.target == info.target
            entry = {"target": info.target, "file": name, "trt_module": info.trt_module,
                     "trt_version": info.trt_version,
                     "gpu_name": device.name if on_device else None,
                     "driver": device.driver if on_device else None,
                     "built_on": "this GPU" if on_device else f"ahead of time without the GPU ({trt.flavor})",
                     "hardware_compatibility": options.hardware_compatibility,
                     "version_compatible": options.version_compatible,
                     "plugins": info.plugins, "profiles": info.profiles,
                     "precision_check": info.precision_check, "build_seconds": info.build_seconds,
                     "bytes": len(data), "timing_cache": info.timing_cache}
            manifest.engines = [e for e in manifest.engines if e["file"] != name] + [entry]
            progress(f"{name}: {len(data):,} bytes in {info.build_seconds:.1f} s")
        manifest.artifacts = {p.name: file_digest(p) for p in sorted(tmp.iterdir())
                              if p.is_file() and p.name != MANIFEST_NAME}
        write_manifest(tmp, manifest)
    progress("validation skipped: TensorRT engines run only on their GPU (run `nemodiff-compile validate` there)")
    return output


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


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
