"""Quantization: precision recipes (data), ModelOpt calibration over the real decoding modes, and
native ONNX Q/DQ graphs with weights stored quantized.

    from nemodiff_compile.quant import RECIPES, recipe_for
    recipe_for("fp8")            # -> Recipe (stdlib only; torch / modelopt load in quant.ptq)

Modules: recipe (the recipes), calib (built-in prompts, hash), ptq (ModelOpt calibration, per-layer
codes and scales), qdq (Q/DQ into the traced graph, trt:: -> native), kv_cache (the FP8 KV-cache
option), export (the whole model -> quantized ONNX step). The calibration forward loop (the decode
loops over the torch reference) is the caller's: quant/calibration.py.
"""

from .recipe import RECIPES, Recipe, is_quantized, recipe_for

__all__ = ["RECIPES", "Recipe", "recipe_for", "is_quantized"]
