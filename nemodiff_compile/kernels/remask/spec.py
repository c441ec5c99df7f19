"""The one table that names the remask op for the ONNX exporter, the TensorRT builder and the runtime.

Semantics (the same as `decoding.loops.diffusion_generate` applies per pass):
  inputs   logits [B, L, V] float, canvas [B, L] int64 (mask_id where still masked),
           active [B] int32 (nonzero: rows still refining), quota [B] int64 (>= 0: commits this pass,
           the top-k rule; < 0: the threshold rule), noise [B, L, V] float (Gumbel noise, temperature > 0)
  outputs  canvas_out [B, L] int64, token [B, L] int64, confidence [B, L] float32, commit [B, L] int32
           (no BOOL at a TensorRT plugin's boundary: documented unsupported; the graph casts around it)
  attrs    mask_id (int), policy ("threshold" | "topk"), threshold (float), temperature (float)
  token      argmax over V of logits + temperature * noise (plain argmax at temperature 0)
  confidence softmax(logits)[token], rounded to the logits' dtype as the reference's softmax is
  commit     masked & active & (quota >= 0 or policy topk: rank < quota | else top-1 or conf >= threshold),
             ties to the lower position (kernels/remask/reference.py: remask_node, stage_commit)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PluginId:
    name: str
    version: str
    namespace: str

    @property
    def qualified(self) -> str:
        """'nemodiff::Remask' as TensorRT and `doctor` print it."""
        return f"{self.namespace}::{self.name}"


REMASK = PluginId(name="Remask", version="1", namespace="nemodiff")
POLICIES = ("threshold", "topk")
