"""`nemodiff-compile info`: config, parameter count, memory per precision, and the resource plan of
a build on this machine. No torch, and no weights downloaded (a checkpoint not yet in the cache is
described from its config.json, fetched alone, or offline from its published geometry, with the
command that downloads it)."""

from __future__ import annotations

import json

import click

from pathlib import Path

from ._common import model_ref, model_source, user_errors

# bytes per weight of each precision (int4 AWQ: 4 bits + a fp16 scale per group of 128)
PRECISION_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4-awq": 0.5 + 2 / 128}


@click.command()
@model_source
@click.option("--context", default=4096, show_default=True, type=int,
              help="Tokens per sequence for the KV-cache estimate (at least 1).")
@click.option("--batch", default=1, show_default=True, type=int, help="Sequences for the KV-cache estimate (at least 1).")
@click.option("--calib-device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where a quantized build would calibrate (for the build plan).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@user_errors
def info(model, size, random_weights, context, batch, calib_device, as_json):
    """Show a model's config, parameter count, memory per precision and what a build needs here."""
    from ..errors import InvalidArgument

    for flag, value in (("--context", context), ("--batch", batch)):
        if value < 1:
            raise InvalidArgument(f"{flag} {value}: expected an integer >= 1")
    ref = model_ref(model, size, random_weights)
    cfg, real = ref.config()
    cached = ref.cached()
    source = ref.repo_id or ref.folder or ref.flag.removeprefix("--size ")
    n = cfg.num_parameters()
    weights = {p: int(n * b) for p, b in PRECISION_BYTES.items()}
    kv = {"bf16": cfg.kv_cache_bytes(batch, context, 2), "fp8": cfg.kv_cache_bytes(batch, context, 1)}
    machine, plans = _plans(ref, cfg, cached, calib_device)
    download = None if cached else ref.download_command()
    report = {
        "source": str(source), "parameters": n, "config": cfg.to_hf(), "config_from_checkpoint": real,
        "cached": cached, "download_command": download,
        "weight_bytes": weights, "kv_cache_bytes": kv, "kv_cache_for": {"batch": batch, "context": context},
        "machine": vars(machine), "build_plans": {p: plan.to_json() | {"fits": why is None, "refusal": why}
                                                  for p, (plan, why) in plans.items()},
    }
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(f"model       {source}" + ("" if real else " (not downloaded: the published geometry)"))
    if download:
        click.echo(f"download    {download}")
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
    click.echo(f"machine     {machine.describe()}")
    click.echo("build plan  (default buckets, validation on; host RAM build / validate, disk, GPU)")
    for p, (plan, why) in plans.items():
        click.echo(f"  {p:9} RAM {_gib(plan.host_build)} / {_gib(plan.host_validate)}, disk {_gib(plan.engine_disk)}"
                   + (f" + {_gib(plan.download)} download" if plan.download else "")
                   + f", GPU {_gib(plan.gpu) if plan.gpu else 'none'}: "
                   + ("fits" if why is None else why.removeprefix("resource plan: ")))


def _plans(ref, cfg, cached, calib_device):
    """The build plan of each precision (default buckets) and whether this machine holds it."""
    from ..pipeline import default_output
    from ..hub import cache_dir
    from ..quant import is_quantized, recipe_for
    from ..resources import plan_build, probe, refusal

    cache = cache_dir() if ref.kind == "hub" else None
    machine = probe(Path("engines"), cache)
    device = calib_device if calib_device != "auto" else ("cuda" if machine.gpu_free else "cpu")
    out = {}
    for p in ("fp32", "bf16", "fp8", "int8", "int4-awq"):
        recipe = recipe_for(p) if is_quantized(p) else None
        plan = plan_build(cfg, precision=p, calib_device=device, random_weights=ref.kind == "random",
                          download=not cached, output=default_output(ref.name, p, "onnxruntime"),
                          cache=cache, recipe=recipe)
        out[p] = (plan, refusal(plan, machine, cfg=cfg, quantized=recipe is not None))
    return machine, out


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"
