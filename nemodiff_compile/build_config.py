"""What a build is asked for, as data (stdlib only): read by the build pipeline, the CLI and the validator.

PRECISION_DTYPES: precision -> torch dtype name of the exported graph. Quantized precisions
(quant.RECIPES) keep the layers they do not quantize in their recipe's float_dtype.
"""

from __future__ import annotations

PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
BACKENDS = ("onnxruntime", "tensorrt", "auto")
