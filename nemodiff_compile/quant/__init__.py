"""Quantization: precision recipes (data), ModelOpt calibration over the real decoding modes, and
native ONNX Q/DQ graphs with weights stored quantized.

    from nemodiff_compile.quant import RECIPES, recipe_for
    recipe_for("fp8")            # -> Recipe (stdlib only; torch / modelopt load in quant.ptq)

Modules: recipe (the recipes), calib (prompts, hash, decoding forward loop), ptq (ModelOpt
calibration, per-layer codes and scales), qdq (the Q/DQ graph writer, trt:: -> native), export
(the whole float -> quantized ONNX step).
"""

from .recipe import RECIPES, Recipe, is_quantized, recipe_for

__all__ = ["RECIPES", "Recipe", "recipe_for", "is_quantized"]
