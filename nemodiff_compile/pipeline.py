"""`build`: checkpoint -> engine directory (ONNX + external weights, tokenizer, manifest), atomically.

    engines/<name>/
      manifest.json            what was built, from what, with which tools; last validation result
      model.onnx, model.onnx.data   the denoiser step graph and its weights (one copy)
      config.json, tokenizer.json, tokenizer_config.json, ...   copied from the checkpoint
      engine.<sm>.<trt>-<ver>.plan  backend tensorrt: one serialized engine per GPU target, each with
                               its own entry in manifest["engines"] (artifact/targets.py picks one at load)

`--backend tensorrt --gpus sm89` on an existing TensorRT engine directory adds (or rebuilds) those
targets from the directory's own model.onnx, keeping the others, when every other field of the
build configuration equals the one in its manifest; otherwise the whole directory is rebuilt with the
new configuration (the progress line says what changed).

The output is checked before anything is loaded (artifact/output.py: only a path that does not exist,
an empty folder or an engine directory this tool wrote is ever replaced). The engine is written and
validated in a partial folder beside it and swapped in atomically (fsutil.atomic_dir: one build of an
output at a time, partial folders of killed builds swept, SIGTERM handled like Ctrl-C).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .build_config import PRECISION_DTYPES, BuildConfig, check_context
from .errors import InvalidArgument
from .fsutil import atomic_dir
from .artifact.manifest import Manifest, file_digest, write_manifest

if TYPE_CHECKING:  # pragma: no cover  (the builder and quant/ are imported late)
    from .artifact.targets import DeviceInfo
    from .quant.recipe import Recipe
    from .trt.builder import BuildOptions

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


def default_output(source: str, precision: str, backend: str) -> Path:
    from .config import PRESETS

    name = source.lower() if source.lower() in PRESETS else Path(source).name
    return Path("engines") / f"{name}-{precision}-{backend}"


def build_engine(config: BuildConfig, *, recipe: "Recipe | None" = None,
                 progress: Callable[[str], None] = lambda msg: None) -> Path:
    """Build `config` (build_config.BuildConfig) into an engine directory and return its path.

    Quantized precisions (fp8, int8, int4-awq; nvfp4 where it can be calibrated) follow their recipe
    (`quant.recipe_for(precision)`, or `recipe` when given, with the config's layer and KV-cache
    overrides) and calibrate on the config's --calib file or the built-in prompts.
    backend auto: TensorRT where a usable `tensorrt` module and a CUDA GPU are present, else ONNX
    Runtime (choose_backend; the manifest's backend_choice says which and why). backend tensorrt:
    also one engine per GPU target (default: this machine's GPU)."""
    choice, quant = prepare(config, recipe=recipe)
    backend = choice["chosen"]
    output = check_output_path(config, backend)          # before anything is loaded or written
    check_shapes(config)
    check = _output_check(config.source)
    if backend == "tensorrt":
        return _build_tensorrt(config, choice, output=output, progress=progress, quant=quant, check=check)

    with atomic_dir(output, label="--output", check=check, on_wait=progress) as tmp:
        model = _export_into(tmp, config, choice, progress=progress, quant=quant)
        if config.validate:                  # before the swap: an engine is published with its result
            # (remask-stage graphs too: validate also drives their compiled refinement loop)
            progress("validating against the PyTorch reference")
            from .validate.engine import validate_engine

            # a quantized build calibrated `model` in place: the reference is then a fresh float copy
            report = validate_engine(tmp, reference=None if quant else model, quick=True)
            s = report.settings
            progress(f"validation {'PASSED' if report.passed else 'FAILED'} ({s['prompts']} prompts x "
                     f"{s['max_new_tokens']} tokens; recorded in the manifest)")
            if report.explanation:
                progress(f"why: {report.explanation['text']}")
    return output


def check_output_path(config: BuildConfig, backend: str) -> Path:
    """The engine directory's path (--output, or the default for this source/precision/backend), refused
    in one line when a build must not replace what is there (artifact/output.py)."""
    output = Path(config.output or default_output(config.source, config.precision, backend))
    _output_check(config.source)(output)
    return output


def prepare(config: BuildConfig, *, recipe: "Recipe | None" = None, load: bool = True,
            check_source: bool = True) -> tuple[dict[str, str], "_Quant | None"]:
    """Everything `build_engine` checks before it loads anything (one-line InvalidArgument): the
    backend choice (choose_backend) and the quantization to run (None for float precisions).
    load=False looks for ModelOpt without importing it (the CLI states its resource plan first);
    check_source=False skips the source (not fetched yet)."""
    from .quant import is_quantized, recipe_for

    choice = choose_backend(config.backend)
    backend = choice["chosen"]
    config.for_backend(backend)              # the rules that depend on the backend, once it is known
    if check_source:
        _check_source(config.source)
    quant = None
    if recipe is not None and not is_quantized(config.precision):
        raise InvalidArgument(f"recipe {recipe.name}: recipes apply to quantized precisions, not {config.precision}")
    if is_quantized(config.precision):
        q = config.quantization
        if recipe is None:
            recipe = recipe_for(config.precision, keep_first_layers=q.keep_first_layers,
                                keep_last_layers=q.keep_last_layers, kv_cache=q.kv_cache)
        else:                                # the config's overrides apply to a given recipe too
            overrides = {"keep_first_layers": q.keep_first_layers, "keep_last_layers": q.keep_last_layers,
                         "kv_cache_dtype": q.kv_cache}
            recipe = recipe.with_(**{k: v for k, v in overrides.items() if v is not None})
        recipe.check()
        from .quant.ptq import check_available
        from .quant.calibration import read_items

        quant = _Quant(recipe, q.calib, read_items(q.calib), _calib_device(q.calib_device))
        check_available(recipe, load=load)
    return choice, quant


def choose_backend(asked: str) -> dict[str, str]:
    """{"asked", "chosen", "reason"}: auto -> tensorrt where the datacenter `tensorrt` module imports
    and a CUDA GPU is visible (tensorrt_rtx does not count: it cannot run plans here), else onnxruntime."""
    if asked != "auto":
        return {"asked": asked, "chosen": asked, "reason": f"--backend {asked} was asked for"}
    version, why_not = _datacenter_tensorrt()
    if version is None:
        return {"asked": "auto", "chosen": "onnxruntime", "reason": why_not}
    device = _cuda_device()
    if device is None:
        return {"asked": "auto", "chosen": "onnxruntime",
                "reason": f"tensorrt {version} is installed but no CUDA GPU is visible"}
    return {"asked": "auto", "chosen": "tensorrt",
            "reason": f"tensorrt {version} and a CUDA GPU ({device.name}, {device.target}) are present"}


def _datacenter_tensorrt() -> tuple[str | None, str]:
    """(version, "") when the `tensorrt` module imports and has a Builder; else (None, why not)."""
    from .backends.trt_shim import TensorRTUnavailable, load

    try:
        trt = load(("tensorrt",))
    except TensorRTUnavailable:
        import importlib.util

        rtx = " (tensorrt_rtx is, but it builds ahead of time only: its plans need their GPU)" \
            if importlib.util.find_spec("tensorrt_rtx") else ""
        return None, f"no usable tensorrt module is installed{rtx}"
    if not trt.has("Builder"):
        return None, f"the tensorrt module ({trt.version}) has no Builder"
    return trt.version, ""


def _cuda_device() -> "DeviceInfo | None":
    from .artifact.targets import current_device

    return current_device()


def _output_check(source: str) -> Callable[[Path], None]:
    """check(output): refuses (one line) an output a build must not replace (artifact/output.py)."""
    from . import checkpoint_folder
    from .artifact.output import check_output

    folder = checkpoint_folder(source)
    return lambda out: check_output(out, source_folder=folder)


def check_shapes(config: BuildConfig, model_config=None) -> None:
    """The cache must hold a prompt and one block: --block-length when given (BuildConfig checks it),
    else the block_size of `model_config` (default: read from the source's config.json or preset)."""
    from . import checkpoint_folder
    from .config import ModelConfig, preset

    if config.shapes.block_length is not None:
        return
    if model_config is None:
        folder = checkpoint_folder(config.source)
        if folder is not None and not (folder / "config.json").is_file():
            return                           # not a checkpoint folder: the loader says so, with its name
        model_config = ModelConfig.from_file(folder / "config.json") if folder else preset(config.source)
    check_context(config.shapes.max_context, model_config.block_size, given=False)


def _check_source(source: str) -> None:
    from .config import PRESETS

    if source.lower() not in PRESETS and not Path(source).is_dir():
        raise InvalidArgument(f"--checkpoint {source}: not a folder (expected a Hugging Face checkpoint folder "
                              f"or a preset: {', '.join(PRESETS)})")


@dataclass(frozen=True)
class _Quant:
    recipe: "Recipe"
    calib: str | Path | None          # the --calib file, None for the built-in prompts
    items: list                       # its prompts, read and checked before anything is exported
    device: str                       # where the model is loaded and calibrated: cpu | cuda


def _calib_device(choice: str) -> str:
    """auto | cpu | cuda (checked by BuildConfig) -> where calibration runs on this machine."""
    if choice == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if choice == "cuda":
        raise InvalidArgument("--calib-device cuda: this machine has no CUDA GPU; use --calib-device cpu")
    return "cpu"


def _export_into(tmp: Path, config: BuildConfig, choice: dict[str, str], *, progress: Callable[[str], None],
                 quant: _Quant | None = None):
    """Fill `tmp` with the step graph (quantized when `quant` is given), config, tokenizer and
    manifest; return the loaded reference."""
    from . import checkpoint_folder, load_reference
    from .export.onnx import export_step, remask_options
    from .model.checkpoint import CONFIG_NAME

    source, precision, shapes = config.source, config.precision, config.shapes
    progress(f"loading {source} ({precision}{', calibrating on ' + quant.device if quant else ''})")
    # a quantized build calibrates the model as stored (one copy in memory); the graph's float parts
    # are cast to the recipe's float_dtype tensor by tensor while written
    start = time.perf_counter()
    model = load_reference(source, dtype=None if quant else PRECISION_DTYPES[precision],
                           device=quant.device if quant else "cpu")
    progress(f"loaded in {time.perf_counter() - start:.1f} s")
    cfg = model.config
    if shapes.max_context > cfg.max_position_embeddings:
        raise InvalidArgument(f"--max-context {shapes.max_context} exceeds the model's "
                              f"max_position_embeddings {cfg.max_position_embeddings}")
    folder = checkpoint_folder(source)
    quantization = None
    remask_opts = remask_options(config.remask.stage, mask_id=cfg.mask_token_id, threshold=config.remask.threshold)
    if cfg.is_vlm and remask_opts is not None:
        raise InvalidArgument(f"--remask {config.remask.stage}: not supported yet for vision-language checkpoints "
                              "(build with --remask none)")
    if quant is None:
        progress("exporting the denoiser step to ONNX (dynamo)")
        start = time.perf_counter()
        spec = export_step(model, tmp, with_logits=config.with_logits, remask=remask_opts)
        progress(f"exported in {time.perf_counter() - start:.1f} s")
    else:
        from .quant.export import quantize_step
        from .quant import calibration

        prompts = calibration.token_prompts(quant.items, folder, cfg, quant.calib)
        r = quant.recipe
        loop = calibration.decoding_loop(prompts, r.calib_modes, r.calib_max_new_tokens, cfg.block_size)
        spec, quantization = quantize_step(model, r, loop, tmp, with_logits=config.with_logits, remask=remask_opts,
                                           calibration=calibration.record(prompts, quant.calib), progress=progress)
    if cfg.is_vlm:                  # the second graph: vision encoder + projector, float (export/vision.py)
        from .export.vision import export_vision

        progress("exporting the vision encoder + projector to ONNX")
        spec.extra["vision"] = export_vision(model, tmp)
    (tmp / CONFIG_NAME).write_text(_json(cfg.to_hf()))
    for name in TOKENIZER_FILES:
        if folder is not None and (folder / name).is_file():
            shutil.copyfile(folder / name, tmp / name)
    progress("hashing artifacts")
    artifacts = {p.name: file_digest(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    backend = choice["chosen"]
    manifest = Manifest(
        backend=backend, precision=precision, source=source, model_config=cfg.to_hf(),
        weights_sha256=_weights_hash(folder, source), io_spec=spec.to_json(),
        buckets=shapes.to_manifest(cfg.block_size), artifacts=artifacts, tool_versions=_tool_versions(),
        quantization=quantization, build_config=config.to_json(), backend_choice=choice,
    )
    if backend == "tensorrt":
        manifest.requires = {}            # the plans are checked per GPU at load (artifact/targets.py)
    write_manifest(tmp, manifest)
    return model


def _build_tensorrt(config: BuildConfig, choice: dict[str, str], *, output: Path,
                    progress: Callable[[str], None], quant: _Quant | None = None,
                    check: Callable[[Path], None] | None = None) -> Path:
    """Export once (or reuse the directory's graph when only targets are added), then one plan per target."""
    from .artifact.manifest import MANIFEST_NAME, read_manifest
    from .artifact.targets import current_device, engine_file_name
    from .trt.builder import build_plan, resolve_target
    from .backends.trt_shim import load

    trt = load()
    options = _trt_options(config)
    gpus = config.tensorrt.gpus
    device = current_device()
    targets = [resolve_target(trt, t, device) for t in (gpus or [None])]     # refuse before exporting
    if config.remask.stage == "plugin" and not trt.can_build_plugins:
        from .trt.builder import TrtBuildError

        raise TrtBuildError(f"--remask plugin: the graph would need nemodiff::Remask/1, and {trt.flavor} "
                            f"{trt.version} cannot build plugin layers (no INetworkDefinition.add_plugin_v3): "
                            "use --remask onnx, or build with the tensorrt module")
    with atomic_dir(output, label="--output", check=check, on_wait=progress) as tmp:
        existing = _existing_manifest(output)            # read under the lock: no other build changes it
        reuse = False
        if existing is not None and gpus is not None:    # adding targets: only onto the same configuration
            changes = _changes(existing, config, choice, quant)
            reuse = not changes
            dropped = ", ".join(e["target"] for e in existing.engines if e["target"] not in targets)
            if changes:
                progress(f"rebuilding {output} with the new configuration ({'; '.join(changes)})"
                         + (f"; its other targets ({dropped}) are dropped" if dropped else ""))
        if reuse:
            progress(f"adding {', '.join(gpus)} to {output} (same configuration: its graph is reused)")
            for f in output.iterdir():
                if f.is_file() and f.name != MANIFEST_NAME:
                    _link_or_copy(f, tmp / f.name)
            manifest = existing
        else:
            _export_into(tmp, config, choice, progress=progress, quant=quant)
            manifest = read_manifest(tmp)
        manifest.tool_versions[trt.flavor] = trt.version
        for target in targets:
            data, info = build_plan(tmp / "model.onnx", io_spec=manifest.io_spec, buckets=manifest.buckets,
                                    precision=config.precision, target=target, options=options,
                                    progress=progress, trt=trt, device=device)
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
            if "vision" in manifest.io_spec.get("extra", {}):     # a VLM: the vision graph's plan beside it
                from .trt.vision_plan import build_vision_plan

                _, entry["vision"] = build_vision_plan(tmp, manifest.io_spec["extra"]["vision"], name, target=target,
                                                       options=options, progress=progress, trt=trt, device=device)
            manifest.engines = [e for e in manifest.engines if e["file"] != name] + [entry]
            progress(f"{name}: {len(data):,} bytes in {info.build_seconds:.1f} s")
        held = tuple(dict.fromkeys(e["target"] for e in manifest.engines))
        manifest.build_config = config.with_targets(held).to_json()
        manifest.backend_choice = choice
        manifest.artifacts = {p.name: file_digest(p) for p in sorted(tmp.iterdir())
                              if p.is_file() and p.name != MANIFEST_NAME}
        write_manifest(tmp, manifest)
    progress("validation skipped: TensorRT engines run only on their GPU (run `nemodiff-compile validate` there)")
    return output


def _trt_options(config: BuildConfig) -> "BuildOptions":
    from .trt.builder import BuildOptions

    t, mb = config.tensorrt, 1 << 20
    return BuildOptions(workspace_bytes=t.workspace_mb and t.workspace_mb * mb,
                        tactic_bytes=t.tactic_mb and t.tactic_mb * mb,
                        hardware_compatibility=t.hardware_compatibility, version_compatible=t.version_compatible)


def _existing_manifest(output: Path) -> Manifest | None:
    from .artifact.manifest import MANIFEST_NAME, EngineError, read_manifest

    if not (output / MANIFEST_NAME).is_file():
        return None
    try:
        return read_manifest(output)
    except EngineError:
        return None


def _changes(existing: Manifest, config: BuildConfig, choice: dict[str, str], quant: _Quant | None) -> list[str]:
    """What differs between the directory's build and `config`, targets, output and validate left out
    ([] when its graph can be reused). Backends compare as chosen (auto -> what it chose)."""
    if existing.build_config is None:
        return ["its manifest has no build_config (an older nemodiff-compile built it)"]
    try:
        old = BuildConfig.from_json(existing.build_config, where="its manifest's build_config")
    except InvalidArgument as e:
        return [f"its build_config is unreadable here ({e})"]
    changes = config.for_backend(choice["chosen"]).differences(old.for_backend(existing.backend))
    old_recipe = (existing.quantization or {}).get("recipe")
    if quant is not None and old_recipe != quant.recipe.to_json():
        changes.append("quantization recipe")
    return changes


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
