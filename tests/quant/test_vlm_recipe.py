"""Quantization recipes leave a VLM's vision tower and projector in float (they are their own float graph): the
recipe's rule, and the ModelOpt config that rule writes (a measured fp8 build of the tiny VLM: README)."""

import pytest

from nemodiff_compile.quant import recipe_for
from nemodiff_compile.quant.ptq import modelopt_config

VISION = ["encoder.vision_tower.transformer.layers.0.attention.q_proj", "encoder.vision_tower.patch_conv",
          "encoder.multi_modal_projector.patch_merger.merging_layer", "encoder.multi_modal_projector.linear_2"]


@pytest.mark.parametrize("precision", ["fp8", "int8", "int4-awq"])
def test_vision_modules_stay_float(precision):
    r = recipe_for(precision)
    assert all(r.high_precision(name, 10) for name in VISION)
    assert not r.high_precision("encoder.layers.5.mlp.up_proj", 10)
    off = {c["quantizer_name"] for c in modelopt_config(r, VISION, 10)["quant_cfg"] if c.get("enable") is False}
    assert {"encoder.vision_tower*", "encoder.multi_modal_projector*"} <= off
