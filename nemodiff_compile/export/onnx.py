"""Export the denoiser step to ONNX with the dynamo exporter: one graph, one copy of the weights.

`trace_step` traces it from a weightless meta-device twin of the model (any float dtype);
`save_step` binds every initializer to the live model's tensor, read lazily and written tensor by
tensor (export/weights.py), after an optional rewrite such as the quantizer's Q/DQ pass.

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
from typing import Callable

import torch

from ..errors import InvalidArgument, NemodiffError
from ..model.model import NemotronLabsDiffusion, block_mask, explicit_attention
from ..artifact.spec import DYNAMIC_DIMS, OPSET, REMASK_IO, REMASK_VARIANTS, STEP_SLOTS, IOSpec, step_spec

ONNX_NAME = "model.onnx"
WEIGHTS_NAME = "model.onnx.data"


class StepGraph(torch.nn.Module):
    """The exported function: inputs and outputs as in `spec.step_spec`.

    remask None: token/confidence only (the host applies the commit rule). remask {"variant": "onnx"
    | "plugin", "policy", "threshold", "mask_id", "eos_ids"}: the pass is also one refinement pass of a
    block (export/remask_graph.py): the stop rule, the commit rule on `canvas` (standard ops, or one
    `nemodiff::Remask` node), the row counters and the done flag.
    """

    def __init__(self, model: NemotronLabsDiffusion, with_logits: bool, remask: dict | None = None):
        super().__init__()
        self.model, self.with_logits, self.remask = model, with_logits, remask

    def forward(self, input_ids, cache_lengths, num_valid, causal, temperature, gumbel_noise,
                past_keys, past_values, draft_lora=None, canvas=None, active=None, quota=None, row_nfe=None,
                embed_mask=None, embeds=None):
        B, L = input_ids.shape
        S = past_keys.shape[3]
        lora = False if draft_lora is None else draft_lora
        positions = cache_lengths[:, None] + torch.arange(L, device=input_ids.device)      # [B, L]
        mask = block_mask(causal, cache_lengths, S, L, num_valid)                          # [B, 1, L, S+L]
        logits, new_k, new_v = self.model.step(input_ids, positions, mask, past_keys, past_values, lora,
                                               embed_mask, embeds)
        if self.remask is None:
            scores = logits.float() + temperature * gumbel_noise                           # [B, L, V]
            token = scores.argmax(-1)                                                      # [B, L]
            conf = torch.softmax(logits, dim=-1).gather(-1, token[..., None])[..., 0].float()  # [B, L]
            outs = (token, conf, new_k, new_v)
        else:
            from .remask_graph import remask_stage

            token, conf, *stage = remask_stage(logits, temperature * gumbel_noise, canvas, active, quota, row_nfe,
                                               self.remask)
            outs = (token, conf, new_k, new_v, *stage)       # + canvas_out, commit, row_nfe_out, done
        return outs + (logits,) if self.with_logits else outs


def example_inputs(model: NemotronLabsDiffusion, batch: int = 2, block: int = 4, cache_len: int = 16,
                   remask: bool = False):
    cfg = model.config
    dev, dt = model.diffusion_head.weight.device, model.dtype
    kv = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, cache_len, cfg.head_dim)
    lora = (torch.tensor(True, device=dev),) if model.has_draft_lora else ()
    if remask:
        canvas = torch.full((batch, block), cfg.mask_token_id, dtype=torch.long, device=dev)
        lora = (lora or (None,)) + (canvas, torch.ones(batch, dtype=torch.bool, device=dev),
                                    torch.ones(batch, block, dtype=torch.long, device=dev),
                                    torch.zeros(batch, dtype=torch.long, device=dev))
    embeds = ()
    if cfg.is_vlm:                              # the trailing prefill-embedding slots
        embeds = (None,) * (13 - 8 - len(lora)) + (torch.zeros(batch, block, dtype=torch.bool, device=dev),
                                                   torch.zeros(batch, block, cfg.hidden_size, dtype=dt, device=dev))
    return (
        torch.zeros(batch, block, dtype=torch.long, device=dev),
        torch.tensor([3] * batch, dtype=torch.long, device=dev),
        torch.full((batch,), block, dtype=torch.long, device=dev),
        torch.ones(batch, dtype=torch.bool, device=dev),
        torch.tensor(0.0, device=dev),
        torch.zeros(batch, block, cfg.vocab_size, device=dev),
        torch.zeros(kv, dtype=dt, device=dev),
        torch.zeros(kv, dtype=dt, device=dev),
    ) + lora + embeds


def remask_options(variant: str | None, *, mask_id: int, threshold: float | None = 0.9) -> dict | None:
    """The `remask` dict export_step takes: variant none/onnx/plugin, policy from threshold (None: top-k)."""
    if variant in (None, "none"):
        return None
    if variant not in REMASK_VARIANTS:
        raise InvalidArgument(f"--remask {variant}: expected one of {', '.join(REMASK_VARIANTS)}")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise InvalidArgument(f"--remask-threshold {threshold}: expected a value in [0, 1]")
    return {"variant": variant, "policy": "topk" if threshold is None else "threshold",
            "threshold": threshold, "mask_id": int(mask_id)}


def export_step(model: NemotronLabsDiffusion, out_dir: str | Path, *, with_logits: bool = False,
                remask: dict | None = None, dtype: torch.dtype | None = None) -> IOSpec:
    """Write out_dir/model.onnx + model.onnx.data (external weights) atomically; return the I/O spec.
    remask: see `remask_options` (None: no remask stage, the ONNX Runtime path). dtype: the graph's
    float dtype (default the model's; the weights are cast tensor by tensor while written)."""
    graph, spec = trace_step(model, with_logits=with_logits, remask=remask, dtype=dtype)
    save_step(graph, spec, model, out_dir)
    return spec


def trace_step(model: NemotronLabsDiffusion, *, with_logits: bool = False, remask: dict | None = None,
               dtype: torch.dtype | None = None):
    """The step graph (onnx_ir Model, weights not bound yet) and its I/O spec, traced by the dynamo
    exporter from a meta-device twin of `model` in `dtype`: no weight is touched or copied."""
    from .weights import meta_twin

    twin = explicit_attention(meta_twin(model.eval(), dtype or model.dtype))
    if remask is not None:                  # the stage's stop rule needs the EOS ids; its I/O version
        remask = {**remask, "eos_ids": [int(e) for e in twin.config.eos_ids], "io": REMASK_IO}
    spec = step_spec(twin.config, _dtype_name(twin.dtype), with_logits, with_lora=twin.has_draft_lora,
                     remask=remask, with_embeds=twin.config.is_vlm)
    names = [t.name for t in spec.inputs]
    batch, block, cache = (torch.export.Dim(n, min=1) for n in DYNAMIC_DIMS)
    dims = {"input_ids": {0: batch, 1: block}, "cache_lengths": {0: batch}, "num_valid": {0: batch},
            "causal": {0: batch}, "temperature": None, "gumbel_noise": {0: batch, 1: block},
            "past_keys": {1: batch, 3: cache}, "past_values": {1: batch, 3: cache}, "draft_lora": None,
            "canvas": {0: batch, 1: block}, "active": {0: batch}, "quota": {0: batch, 1: block},
            "row_nfe": {0: batch}, "embed_mask": {0: batch, 1: block}, "embeds": {0: batch, 1: block}}
    args = example_inputs(twin, remask=remask is not None)
    shapes = tuple(dims[n] if n in names else None for n in STEP_SLOTS[: len(args)])   # None: an absent slot
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")                     # the exporter's deprecation chatter
        # optimize=False: the optimizer would fold constants it cannot read on the meta device;
        # save_step runs it once the weights are bound.
        prog = torch.onnx.export(
            StepGraph(twin, with_logits, remask), args, dynamo=True, opset_version=OPSET,
            input_names=names, output_names=spec.output_names(),
            dynamic_shapes=shapes, optimize=False, verbose=False)
    if prog is None:  # pragma: no cover
        raise NemodiffError("torch.onnx.export returned no program")
    _name_dynamic_dims(prog.model, spec)
    return prog.model, spec


def save_step(graph, spec: IOSpec, weights: torch.nn.Module, out_dir: str | Path, *,
              rewrite: Callable[[object], None] | None = None) -> None:
    """Bind `graph`'s initializers to `weights` (the live model, read lazily), optimize, apply
    `rewrite(graph)` (e.g. the Q/DQ pass) and write out_dir/model.onnx + model.onnx.data atomically."""
    import onnx_ir as ir
    import onnxscript.optimizer

    from .checks import check_graph
    from .weights import bind, fold_transposes

    bind(graph, weights)
    fold_transposes(graph)
    onnxscript.optimizer.optimize_ir(graph)
    if rewrite is not None:
        rewrite(graph)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export.", dir=out_dir))
    try:
        # Written tensor by tensor: each lazy initializer is read, converted, written and dropped.
        from .. import progress
        from . import weights as weights_mod

        total = sum(v.const_value.nbytes for v in graph.graph.initializers.values() if v.const_value is not None)
        with progress.bar("writing weights", total=total, unit="GiB", scale=1 / 2**30) as tick:
            weights_mod.on_write = tick
            try:
                ir.save(graph, tmp / ONNX_NAME, external_data=WEIGHTS_NAME, alignment=64)
            finally:
                weights_mod.on_write = None
        check_graph(tmp / ONNX_NAME, spec)
        for name in (ONNX_NAME, WEIGHTS_NAME):
            os.chmod(tmp / name, 0o644)
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
