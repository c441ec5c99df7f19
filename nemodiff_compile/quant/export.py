"""Float model -> quantized ONNX step graph: export, calibrate with the real decoding modes, write Q/DQ.

    export_step (float graph, external weights, in a scratch folder)
      -> ModelOpt calibration in place (prefill / denoise / commit / draft / verify passes)
      -> write_qdq: native Q/DQ, weights stored quantized, one layer at a time
      -> kv_cache_dtype "fp8": the cache tensors become FLOAT8E4M3FN (kv_cache.py; scales from the same loops)
      -> graph checks; the scratch float graph is deleted
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

from .recipe import ALWAYS_HIGH, Recipe


def quantize_step(model, recipe: Recipe, prompts: list[list[int]], out_dir: Path, *, with_logits: bool,
                  calib_source: str, progress: Callable[[str], None] = lambda msg: None):
    """Write out_dir/model.onnx(+.data) quantized per `recipe`; return (IOSpec, manifest record)."""
    from ..export.checks import check_graph
    from ..export.onnx import export_step
    from . import calib, kv_cache, ptq, qdq

    ptq.check_available(recipe)
    scratch = out_dir / ".float"
    try:
        progress("exporting the float denoiser step to ONNX (dynamo)")
        spec = export_step(model, scratch, with_logits=with_logits)
        cfg = model.config
        modes = recipe.calib_modes
        progress(f"calibrating with ModelOpt ({recipe.algorithm}) on {len(prompts)} prompts, modes {', '.join(modes)}")
        loop = calib.decoding_loop(prompts, modes, recipe.calib_max_new_tokens, cfg.block_size)
        kv = kv_cache.calibration_for(recipe, cfg)   # fp8 KV cache: K/V amax observed in the same loops
        loop = kv.wrap(loop) if kv is not None else loop
        names = ptq.calibrate(model, recipe, loop)
        progress(f"writing Q/DQ for {len(names)} Linear layers ({recipe.weights} weights"
                 f"{', ' + recipe.activations + ' activations' if recipe.activations else ', weight-only'})")
        summary = qdq.write_qdq(scratch, out_dir, ptq.quantized_layers(model, recipe, names),
                                float_dtype=recipe.float_dtype)
        if kv is not None:
            progress("FP8 KV cache: per-layer DQ on past_keys/past_values, Q on new_keys/new_values")
            spec = kv.apply(out_dir / "model.onnx", spec)
        check_graph(out_dir / "model.onnx", spec)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    kept = [n for n in ptq.linear_names(model) if n not in set(names)]
    record: dict[str, Any] = {
        "recipe": recipe.to_json(),
        "calibration": {"source": calib_source, "prompts": len(prompts), "sha256": calib.prompts_hash(prompts),
                        "modes": list(modes), "max_new_tokens": recipe.calib_max_new_tokens},
        "excluded_layers": kept + [p for p in ALWAYS_HIGH],
        "quantized_layers": len(names),
        "graph": summary,
        "thresholds": dict(recipe.thresholds),
    }
    if kv is not None:
        record["kv_cache"] = kv.record()
    return spec, record
