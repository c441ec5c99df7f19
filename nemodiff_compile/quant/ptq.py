"""Post-training calibration with NVIDIA ModelOpt (base package, imported late), then the quantized
weights and scales of each Linear, one layer at a time.

ModelOpt does the calibration (max / SmoothQuant / AWQ-lite, on CPU through its fake-quant
fallbacks): `mtq.quantize(model, config, forward_loop)` replaces the Linear layers in place (no
second copy of the weights) with QuantLinear modules that carry the calibrated amax of their weight
and input quantizers and, for SmoothQuant / AWQ, a per-input-channel `pre_quant_scale` (the weight
is rescaled in place by its inverse). We do not use ModelOpt's ONNX export: its legacy path emits
`trt::` custom Q/DQ that ONNX Runtime rejects and traces with the TorchScript exporter. Instead
`quantized_linear` reads the calibrated state back and `qdq.py` writes native Q/DQ into the graph
that `export/onnx.py` produced (see qdq.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from ..errors import InvalidArgument, NemodiffError
from .recipe import ALWAYS_HIGH, FORMATS, Recipe


@dataclass
class QuantizedLinear:
    """One Linear as the graph stores it: y = DQ(Q(x * pre_scale)) @ DQ(weight)."""

    name: str                          # module name, e.g. encoder.layers.0.self_attn.q_proj
    codes: Callable[[], np.ndarray]    # -> [in, out] (transposed, as MatMul takes it) quantized codes:
                                       #   uint8 bit patterns for fp8, int8, or int8 in [-7, 7] for int4;
                                       #   computed when the graph is written, one layer at a time
    shape: tuple[int, int]             # [in, out]
    weight_type: str                   # ONNX element type: FLOAT8E4M3FN | INT8 | INT4
    weight_scale: np.ndarray           # float32 [out] (per channel, axis 1) or [in/block, out] (axis 0)
    block: int | None                  # block size along the input axis, None: per channel
    act_type: str | None               # ONNX element type of the activation Q/DQ, None: weight-only
    act_scale: float | None            # per-tensor activation scale
    pre_scale: np.ndarray | None       # float32 [in]: SmoothQuant / AWQ input multiplier


def check_available(recipe: Recipe, *, load: bool = True) -> None:
    """One-line errors for what this machine cannot calibrate, before any work is done.
    load=False: only look for ModelOpt (a quick check before a plan is stated), do not import it."""
    if recipe.needs_cuda:
        import torch

        if not torch.cuda.is_available():
            raise InvalidArgument(f"--precision {recipe.name}: calibration needs a CUDA GPU (NVFP4 runs on "
                                  "Blackwell, SM100+) and this machine has none; use fp8, int8 or int4-awq")
        raise InvalidArgument(f"--precision {recipe.name}: the FLOAT4E2M1 Q/DQ writer is not implemented; "
                              "use fp8, int8 or int4-awq")
    import warnings

    if not load:
        from importlib.util import find_spec

        if find_spec("modelopt") is None:
            raise InvalidArgument(f"--precision {recipe.name}: needs nvidia-modelopt "
                                  "(pip install 'nemodiff-compile[quant]')")
        return
    try:
        with warnings.catch_warnings():       # "transformers X is not tested with modelopt": we use no HF path
            warnings.simplefilter("ignore")
            import modelopt.torch.quantization  # noqa: F401
    except ImportError:
        raise InvalidArgument(f"--precision {recipe.name}: needs nvidia-modelopt "
                              "(pip install 'nemodiff-compile[quant]')") from None


def modelopt_config(recipe: Recipe, linear_names: list[str], num_layers: int) -> dict[str, Any]:
    """The ModelOpt quant config (0.47 list form) for a recipe: what is quantized, how, and which
    Linear layers are left alone."""
    w = _quantizer_cfg(recipe.weights, block=recipe.weight_block, axis=0)
    cfg: list[dict[str, Any]] = [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "cfg": w},
        ({"quantizer_name": "*input_quantizer", "cfg": _quantizer_cfg(recipe.activations, block=None, axis=None)}
         if recipe.activations else {"quantizer_name": "*input_quantizer", "enable": False}),
    ]
    for pattern in ALWAYS_HIGH:                        # ModelOpt also wraps nn.Embedding
        cfg.append({"quantizer_name": f"{pattern}*", "enable": False})
    for name in linear_names:
        if recipe.high_precision(name, num_layers):
            cfg.append({"quantizer_name": f"{name}.*", "enable": False})
    algorithm: Any = {"max": "max", "smoothquant": "smoothquant",
                      "awq_lite": {"method": "awq_lite", "alpha_step": 0.1}}[recipe.algorithm]
    return {"quant_cfg": cfg, "algorithm": algorithm}


def _quantizer_cfg(fmt: str, block: int | None, axis: int | None) -> dict[str, Any]:
    """axis 0 of a weight [out, in]: one amax per output channel; None: one per tensor."""
    bits = {"fp8": (4, 3), "int8": 8, "int4": 4, "nvfp4": (2, 1)}[fmt]
    if block is None:
        return {"num_bits": bits, "axis": axis}
    return {"num_bits": bits, "block_sizes": {-1: block, "type": "static"}}


def linear_names(model) -> list[str]:
    import torch

    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def calibrate(model, recipe: Recipe, forward_loop: Callable[[Any], None]) -> list[str]:
    """Calibrate `model` in place; return the names of the Linear layers that got quantized."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import modelopt.torch.quantization as mtq

        names = linear_names(model)
        n = model.config.num_hidden_layers
        mtq.quantize(model, modelopt_config(recipe, names, n), forward_loop)
    enabled = sorted({qn.rsplit(".", 1)[0] for qn, q in model.named_modules()
                      if qn.endswith("_quantizer") and _enabled(q)})
    expect = [nm for nm in names if not recipe.high_precision(nm, n)]
    if enabled != sorted(expect):                      # the graph must be what was calibrated
        extra = sorted(set(enabled) - set(expect)) or sorted(set(expect) - set(enabled))
        raise NemodiffError(f"ModelOpt quantized {len(enabled)} layers, the recipe asks for {len(expect)} "
                            f"(differs at {extra[0]})")
    return expect


def _enabled(q) -> bool:
    return bool(getattr(q, "is_enabled", False))


def quantized_layers(model, recipe: Recipe, names: list[str]) -> Iterator[QuantizedLinear]:
    """The graph's view of each calibrated layer, one at a time (one layer's codes in memory)."""
    for name in names:
        yield quantized_linear(model.get_submodule(name), name, recipe)


def quantized_linear(module, name: str, recipe: Recipe) -> QuantizedLinear:
    """The calibrated state of one QuantLinear: scales now, codes when asked for."""
    import torch

    wq, iq = module.weight_quantizer, module.input_quantizer
    amax = None if wq.amax is None else wq.amax.detach().float().cpu()          # [out, 1] or [out * nb, 1]
    if amax is None or not bool(torch.isfinite(amax).all()):
        raise NemodiffError(f"{name}: calibration left no finite weight amax (did the calibration prompts run?)")
    onnx_type, qmax = FORMATS[recipe.weights]
    out_f, in_f = module.weight.shape
    b = recipe.weight_block
    if b is None:
        scale = (amax.reshape(out_f) / qmax).clamp_min(1e-12)                    # [out]
        full = scale[:, None]                                                   # [out, 1]
        w_scale = scale.numpy()
    else:
        scale = (amax.reshape(out_f, math.ceil(in_f / b)) / qmax).clamp_min(1e-12)   # [out, nb]
        full = scale.repeat_interleave(b, dim=1)[:, :in_f]                      # [out, in]
        w_scale = np.ascontiguousarray(scale.numpy().T)                         # [nb, out]

    def codes() -> np.ndarray:                                                  # [in, out]
        w = module.weight.detach().to(torch.float32, copy=True)                 # [out, in], smoothed
        return _codes(w.div_(full.to(w.device)), recipe.weights, qmax)

    act_type = act_scale = None
    if recipe.activations is not None and _enabled(iq):
        a_type, a_max = FORMATS[recipe.activations]
        if iq.amax is None or iq.amax.numel() != 1:
            raise NemodiffError(f"{name}: expected one per-tensor activation amax")
        a_amax = float(iq.amax.detach().float())
        if not math.isfinite(a_amax) or a_amax <= 0:
            raise NemodiffError(f"{name}: calibration left activation amax {a_amax}")
        act_type, act_scale = a_type, a_amax / a_max
    pqs = getattr(iq, "pre_quant_scale", None)
    pre = None if pqs is None else pqs.detach().float().reshape(in_f).cpu().numpy().astype(np.float32)
    return QuantizedLinear(name, codes, (in_f, out_f), onnx_type, w_scale.astype(np.float32), b,
                           act_type, act_scale, pre)


def _codes(x, fmt: str, qmax: float) -> np.ndarray:
    """x: float32 [out, in] already divided by its scale (overwritten) -> codes [in, out] as numpy
    (fp8: uint8 bit patterns), the layout MatMul takes."""
    import torch

    x = x.clamp_(-qmax, qmax)
    if fmt == "fp8":
        c = x.to(torch.float8_e4m3fn).view(torch.uint8)                         # round to nearest even
    else:
        c = x.round_().to(torch.int8)                                           # int8 / int4 in [-qmax, qmax]
    return c.t().contiguous().cpu().numpy()
