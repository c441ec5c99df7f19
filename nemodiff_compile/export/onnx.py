"""Export the denoiser step to ONNX with the dynamo exporter: one graph, one copy of the weights.

The graph wraps `NemotronLabsDiffusion.step` with the mask built from its inputs and the token pick
(argmax / Gumbel-max and max-softmax confidence) fused behind it, so only [batch, block] results and
the block's K/V leave the step; logits are an extra output in validation builds.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from ..errors import NemodiffError
from ..model.model import NemotronLabsDiffusion, block_mask
from .spec import DYNAMIC_DIMS, OPSET, IOSpec, step_spec

ONNX_NAME = "model.onnx"
WEIGHTS_NAME = "model.onnx.data"


class StepGraph(torch.nn.Module):
    """The exported function: inputs and outputs as in `spec.step_spec`."""

    def __init__(self, model: NemotronLabsDiffusion, with_logits: bool):
        super().__init__()
        self.model, self.with_logits = model, with_logits

    def forward(self, input_ids, cache_lengths, num_valid, causal, temperature, gumbel_noise,
                past_keys, past_values, draft_lora=False):
        B, L = input_ids.shape
        S = past_keys.shape[3]
        positions = cache_lengths[:, None] + torch.arange(L, device=input_ids.device)      # [B, L]
        mask = block_mask(causal, cache_lengths, S, L, num_valid)                          # [B, 1, L, S+L]
        logits, new_k, new_v = self.model.step(input_ids, positions, mask, past_keys, past_values, draft_lora)
        scores = logits.float() + temperature * gumbel_noise                               # [B, L, V]
        token = scores.argmax(-1)                                                          # [B, L]
        conf = torch.softmax(logits, dim=-1).gather(-1, token[..., None])[..., 0].float()  # [B, L]
        outs = (token, conf, new_k, new_v)
        return outs + (logits,) if self.with_logits else outs


def example_inputs(model: NemotronLabsDiffusion, batch: int = 2, block: int = 4, cache_len: int = 16):
    cfg = model.config
    dev, dt = model.diffusion_head.weight.device, model.dtype
    kv = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, cache_len, cfg.head_dim)
    lora = (torch.tensor(True, device=dev),) if model.has_draft_lora else ()
    return (
        torch.zeros(batch, block, dtype=torch.long, device=dev),
        torch.tensor([3] * batch, dtype=torch.long, device=dev),
        torch.full((batch,), block, dtype=torch.long, device=dev),
        torch.tensor(True, device=dev),
        torch.tensor(0.0, device=dev),
        torch.zeros(batch, block, cfg.vocab_size, device=dev),
        torch.zeros(kv, dtype=dt, device=dev),
        torch.zeros(kv, dtype=dt, device=dev),
    ) + lora


def export_step(model: NemotronLabsDiffusion, out_dir: str | Path, *, with_logits: bool = False) -> IOSpec:
    """Write out_dir/model.onnx + model.onnx.data (external weights) atomically; return the I/O spec."""
    from .checks import check_graph

    model = model.eval()
    spec = step_spec(model.config, _dtype_name(model.dtype), with_logits, with_lora=model.has_draft_lora)
    names = [t.name for t in spec.inputs]
    batch, block, cache = (torch.export.Dim(n, min=1) for n in DYNAMIC_DIMS)
    dims = {"input_ids": {0: batch, 1: block}, "cache_lengths": {0: batch}, "num_valid": {0: batch},
            "causal": None, "temperature": None, "gumbel_noise": {0: batch, 1: block},
            "past_keys": {1: batch, 3: cache}, "past_values": {1: batch, 3: cache}, "draft_lora": None}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export.", dir=out_dir))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")            # the exporter's deprecation chatter
            prog = torch.onnx.export(
                StepGraph(model, with_logits), example_inputs(model), dynamo=True, opset_version=OPSET,
                input_names=names, output_names=spec.output_names(),
                dynamic_shapes=tuple(dims[n] for n in names), optimize=True, verbose=False)
        if prog is None:  # pragma: no cover
            raise NemodiffError("torch.onnx.export returned no program")
        _name_dynamic_dims(prog.model, spec)
        # Saved straight from the exporter's IR, tensor by tensor into model.onnx.data: serializing
        # `prog.model_proto` first would hold a second full copy of the weights in memory.
        prog.save(str(tmp / ONNX_NAME), external_data=True)
        check_graph(tmp / ONNX_NAME, spec)
        for name in (ONNX_NAME, WEIGHTS_NAME):
            os.chmod(tmp / name, 0o644)
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return spec


def _name_dynamic_dims(model, spec: IOSpec) -> None:
    """Give the graph's symbolic dims the spec's names (the exporter invents its own); model: onnx_ir."""
    import onnx_ir as ir

    by_name = {t.name: t for t in (*spec.inputs, *spec.outputs)}
    for v in (*model.graph.inputs, *model.graph.outputs):
        want = by_name[v.name].shape
        dims = [ir.SymbolicDim(w) if isinstance(w, str) else d for d, w in zip(v.shape, want)]
        v.shape = ir.Shape(dims)


def _dtype_name(dt: torch.dtype) -> str:
    return {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dt]
