"""The I/O contract of the exported denoiser step, as data. Stdlib only.

The runtime binds buffers from it and the TensorRT builder makes optimization profiles from it, so
neither needs the exporter. One graph serves every pass (prefill, bidirectional refinement, causal
commit / verify) through its inputs; the KV cache is a static max-length layout with per-row lengths.

  input_ids      [batch, block]                                int64
  cache_lengths  [batch]                                       int64   valid cache positions per row
  num_valid      [batch]                                       int64   real tokens per row (right padding)
  causal         []                                            bool    causal inside the block, else bidirectional
  temperature    []                                            float32 0 = argmax
  gumbel_noise   [batch, block, vocab]                         float32 Gumbel noise (zeros at temperature 0)
  past_keys      [layers, batch, kv_heads, cache_len, head_dim] model dtype
  past_values    same
  draft_lora     []                                            bool    draft LoRA on (only in graphs of models with one)
  -> token       [batch, block]                                int64   argmax(logits + temperature * noise)
  -> confidence  [batch, block]                                float32 softmax(logits)[token]
  -> new_keys    [layers, batch, kv_heads, block, head_dim]    the block's post-RoPE K (the caller writes
  -> new_values  same                                          them at cache_lengths on causal passes)
  -> logits      [batch, block, vocab]                         validation builds only

Graphs exported with the remask stage (`remask="onnx"` standard ops, or `remask="plugin"` the
`nemodiff::Remask` custom node, kernels/remask/spec.py) run one refinement pass of a diffusion block
(decoding/refine.py) and also take and give, after the above (stage I/O version `REMASK_IO`):
  canvas         [batch, block]                                int64   the block (mask_id where masked);
                                                                       refinement passes bind input_ids to it
  active         [batch]                                       bool    rows that may refine in this block
  quota          [batch, block]                                int64   per pass s at [:, s]: >= 0 commit that
                                                                       many (fixed-steps schedule), -1 the
                                                                       threshold rule
  row_nfe        [batch]                                       int64   passes each row has refined in so far
  -> canvas_out  [batch, block]                                int64   canvas with this pass's commits
  -> commit      [batch, block]                                bool    positions committed by this pass
  -> row_nfe_out [batch]                                       int64   row_nfe + (row refined in this pass)
  -> done        []                                            bool    no row of canvas_out refines any more
Graphs of vision-language models also take, last, the prefill's input embeddings (decoding/embeds.py):
  embed_mask     [batch, block]                                bool    positions whose embedding is `embeds`
  embeds         [batch, block, hidden]                        model dtype  image features (zeros elsewhere)
and the engine directory holds a second graph, the vision encoder + projector (`vision_spec`, in
`extra["vision"]`): pixels [3, height, width] float32 (preprocessed, height and width multiples of
`merge_patch`, at most `max_side`) -> features [tokens, hidden] float32, tokens = (height/28)*(width/28).

A row refines in a pass when it is active, its block has a mask, and no EOS precedes its first mask
(refine.py's rule); its pass index is its row_nfe (rows stop for good), so quota[b, row_nfe[b]] is its
quota. Passes that are not refinement passes bind active all False (nothing commits). The threshold
(or "topk": none), mask_id and the EOS ids are fixed at export, in `extra["remask"]`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..config import ModelConfig

OPSET = 21
REMASK_VARIANTS = ("none", "onnx", "plugin")
REMASK_IO = 2          # version of the remask stage's I/O above (extra["remask"]["io"]; 1: no pass-loop I/O)
DYNAMIC_DIMS = ("batch", "block", "cache_len")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                      # numpy-style name: int64, float32, bfloat16, bool, ...
    shape: tuple[str | int, ...]    # named dims are dynamic, ints are static


@dataclass(frozen=True)
class IOSpec:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int = OPSET
    dynamic_dims: tuple[str, ...] = DYNAMIC_DIMS
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "IOSpec":
        def specs(items):
            return tuple(TensorSpec(i["name"], i["dtype"], tuple(i["shape"])) for i in items)

        return cls(specs(d["inputs"]), specs(d["outputs"]), d.get("opset", OPSET),
                   tuple(d.get("dynamic_dims", DYNAMIC_DIMS)), d.get("extra", {}))

    def has_input(self, name: str) -> bool:
        return any(t.name == name for t in self.inputs)

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def causal_per_row(self) -> bool:
        """The step graph takes `causal` per row ([batch]); graphs exported before per-row causal take one flag."""
        return tuple(self.input("causal").shape) == ("batch",)


# the step graph's inputs in the order of StepGraph.forward's parameters (absent ones are None slots)
STEP_SLOTS = ("input_ids", "cache_lengths", "num_valid", "causal", "temperature", "gumbel_noise", "past_keys",
              "past_values", "draft_lora", "canvas", "active", "quota", "row_nfe", "embed_mask", "embeds")
VISION_ONNX = "vision.onnx"


def vision_spec(hidden: int, merge_patch: int, max_side: int) -> dict[str, Any]:
    """The vision graph's I/O (what `extra["vision"]` records)."""
    return {"file": VISION_ONNX, "inputs": [{"name": "pixels", "dtype": "float32", "shape": [3, "height", "width"]}],
            "outputs": [{"name": "features", "dtype": "float32", "shape": ["tokens", hidden]}],
            "merge_patch": merge_patch, "max_side": max_side}


def step_spec(cfg: ModelConfig, kv_dtype: str, with_logits: bool, with_lora: bool = False,
              remask: dict[str, Any] | None = None, with_embeds: bool = False) -> IOSpec:
    kv_static = (cfg.num_hidden_layers, "batch", cfg.num_key_value_heads, "cache_len", cfg.head_dim)
    new_kv = (cfg.num_hidden_layers, "batch", cfg.num_key_value_heads, "block", cfg.head_dim)
    inputs = (
        TensorSpec("input_ids", "int64", ("batch", "block")),
        TensorSpec("cache_lengths", "int64", ("batch",)),
        TensorSpec("num_valid", "int64", ("batch",)),
        TensorSpec("causal", "bool", ("batch",)),
        TensorSpec("temperature", "float32", ()),
        TensorSpec("gumbel_noise", "float32", ("batch", "block", cfg.vocab_size)),
        TensorSpec("past_keys", kv_dtype, kv_static),
        TensorSpec("past_values", kv_dtype, kv_static),
    ) + ((TensorSpec("draft_lora", "bool", ()),) if with_lora else ())
    if remask is not None:
        inputs += (TensorSpec("canvas", "int64", ("batch", "block")), TensorSpec("active", "bool", ("batch",)),
                   TensorSpec("quota", "int64", ("batch", "block")), TensorSpec("row_nfe", "int64", ("batch",)))
    if with_embeds:
        inputs += (TensorSpec("embed_mask", "bool", ("batch", "block")),
                   TensorSpec("embeds", kv_dtype, ("batch", "block", cfg.hidden_size)))
    outputs = [
        TensorSpec("token", "int64", ("batch", "block")),
        TensorSpec("confidence", "float32", ("batch", "block")),
        TensorSpec("new_keys", kv_dtype, new_kv),
        TensorSpec("new_values", kv_dtype, new_kv),
    ]
    if remask is not None:
        outputs += [TensorSpec("canvas_out", "int64", ("batch", "block")),
                    TensorSpec("commit", "bool", ("batch", "block")),
                    TensorSpec("row_nfe_out", "int64", ("batch",)), TensorSpec("done", "bool", ())]
    if with_logits:
        outputs.append(TensorSpec("logits", kv_dtype, ("batch", "block", cfg.vocab_size)))
    return IOSpec(inputs, tuple(outputs), extra={"remask": dict(remask)} if remask is not None else {})


def remask_stage(spec: "IOSpec | dict[str, Any]", where: str = "this engine") -> dict[str, Any] | None:
    """The graph's remask stage options (variant, policy, threshold, mask_id, eos_ids, io), None without one;
    a stage of an older I/O version is refused with the command that rebuilds it."""
    extra = spec.extra if isinstance(spec, IOSpec) else spec.get("extra", {})
    stage = extra.get("remask")
    if stage is None:
        return None
    if stage.get("io") != REMASK_IO:
        from ..errors import NemodiffError

        raise NemodiffError(f"{where}: its remask stage was exported by an older nemodiff-compile (stage I/O "
                            f"{stage.get('io', 1)}, this runtime drives version {REMASK_IO}): rebuild it with "
                            f"`nemodiff-compile build --remask {stage.get('variant', 'onnx')} ...`")
    return stage
