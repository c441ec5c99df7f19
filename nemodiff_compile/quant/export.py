"""Float model -> quantized ONNX step graph, holding one copy of the model plus a layer's working set.

    trace_step    the step graph, traced from a weightless meta twin in the recipe's float dtype
    calibrate     ModelOpt, in place on the model as loaded (prefill / denoise / commit / draft /
                  verify passes of the caller's forward loop)
    save_step     initializers bound lazily to the calibrated model; insert_qdq: native Q/DQ with
                  weights stored quantized; written tensor by tensor (one layer's codes at a time)
    kv_cache      kv_cache_dtype "fp8": the cache tensors become FLOAT8E4M3FN (kv_cache.py; per-layer
                  scales observed in the same calibration loops)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .recipe import ALWAYS_HIGH, Recipe


def quantize_step(model, recipe: Recipe, forward_loop: Callable[[Any], None], out_dir: Path, *,
                  with_logits: bool, remask: dict | None = None, calibration: dict[str, Any],
                  progress: Callable[[str], None] = lambda msg: None):
    """Write out_dir/model.onnx(+.data) quantized per `recipe`, calibrating `model` in place with
    `forward_loop(model)` (ModelOpt's contract: run the model over the calibration data).
    calibration: what the manifest records about the data. Returns (IOSpec, manifest record)."""
    import torch

    from ..export.checks import check_graph
    from ..export.onnx import save_step, trace_step
    from . import kv_cache, ptq, qdq

    ptq.check_available(recipe)
    progress(f"tracing the denoiser step ({recipe.float_dtype} float parts)")
    graph, spec = trace_step(model, with_logits=with_logits, remask=remask, dtype=getattr(torch, recipe.float_dtype))
    progress(f"calibrating with ModelOpt ({recipe.algorithm}), modes {', '.join(recipe.calib_modes)}")
    kv = kv_cache.calibration_for(recipe, model.config)   # fp8 cache: K/V amax observed in the same loops
    names = ptq.calibrate(model, recipe, kv.wrap(forward_loop) if kv is not None else forward_loop)
    progress(f"writing Q/DQ for {len(names)} Linear layers ({recipe.weights} weights"
             f"{', ' + recipe.activations + ' activations' if recipe.activations else ', weight-only'})")
    quantized: list[str] = []

    def rewrite(g) -> None:
        quantized.extend(qdq.insert_qdq(g, ptq.quantized_layers(model, recipe, names), float_dtype=recipe.float_dtype))

    save_step(graph, spec, model, out_dir, rewrite=rewrite)
    summary = qdq.summarize(out_dir / "model.onnx", quantized)       # the Linear layers' Q/DQ
    if kv is not None:
        progress("FP8 KV cache: per-layer DQ on past_keys/past_values, Q on new_keys/new_values")
        spec = kv.apply(out_dir / "model.onnx", spec)
        check_graph(out_dir / "model.onnx", spec)
    kept = [n for n in ptq.linear_names(model) if n not in set(names)]
    record: dict[str, Any] = {
        "recipe": recipe.to_json(),
        "calibration": dict(calibration, modes=list(recipe.calib_modes), max_new_tokens=recipe.calib_max_new_tokens),
        "excluded_layers": kept + [p for p in ALWAYS_HIGH],
        "quantized_layers": len(names),
        "graph": summary,
        "thresholds": dict(recipe.thresholds),
    }
    if kv is not None:
        record["kv_cache"] = kv.record()
    return spec, record
