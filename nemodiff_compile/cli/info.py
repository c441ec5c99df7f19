"""`nemodiff-compile info`: config, parameter count, memory per precision. No torch needed."""

from __future__ import annotations

import json

import click

from .. import checkpoint_folder
from ._common import model_source, resolve_source, user_errors

# bytes per weight of each precision (int4 AWQ: 4 bits + a fp16 scale per group of 128)
PRECISION_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4-awq": 0.5 + 2 / 128}


@click.command()
@model_source
@click.option("--context", default=4096, show_default=True, type=int,
              help="Tokens per sequence for the KV-cache estimate (at least 1).")
@click.option("--batch", default=1, show_default=True, type=int, help="Sequences for the KV-cache estimate (at least 1).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@user_errors
def info(checkpoint, size, context, batch, as_json):
    """Show a model's config, parameter count and memory estimate per precision."""
    from ..config import ModelConfig, preset
    from ..errors import InvalidArgument

    for flag, value in (("--context", context), ("--batch", batch)):
        if value < 1:
            raise InvalidArgument(f"{flag} {value}: expected an integer >= 1")
    source = resolve_source(checkpoint, size)
    folder = checkpoint_folder(source)
    cfg = ModelConfig.from_file(folder / "config.json") if folder else preset(source)
    n = cfg.num_parameters()
    weights = {p: int(n * b) for p, b in PRECISION_BYTES.items()}
    kv = {"bf16": cfg.kv_cache_bytes(batch, context, 2), "fp8": cfg.kv_cache_bytes(batch, context, 1)}
    report = {
        "source": str(source), "parameters": n, "config": cfg.to_hf(),
        "weight_bytes": weights, "kv_cache_bytes": kv, "kv_cache_for": {"batch": batch, "context": context},
    }
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(f"model       {source}")
    click.echo(f"geometry    hidden {cfg.hidden_size}, layers {cfg.num_hidden_layers}, "
               f"heads {cfg.num_attention_heads}q/{cfg.num_key_value_heads}kv x {cfg.head_dim}, "
               f"MLP {cfg.intermediate_size}, vocab {cfg.vocab_size}")
    click.echo(f"tokens      mask {cfg.mask_token_id}, eos {cfg.eos_token_id}, bos {cfg.bos_token_id}, "
               f"block {cfg.block_size}")
    click.echo(f"rope        {cfg.rope.rope_type}, theta {cfg.rope.rope_theta:g}, factor {cfg.rope.factor:g}, "
               f"original max {cfg.rope.original_max_position_embeddings}, "
               f"llama-4 beta {cfg.rope.llama_4_scaling_beta:g}")
    click.echo(f"parameters {n:,} ({n / 1e9:.2f} B)")
    click.echo("weights     " + ", ".join(f"{p} {_gib(b)}" for p, b in weights.items()))
    click.echo(f"KV cache    batch {batch} x {context} tokens: bf16 {_gib(kv['bf16'])}, fp8 {_gib(kv['fp8'])}")


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"
