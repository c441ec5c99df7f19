"""`nemodiff-compile inspect DIR`: manifest, I/O spec and sizes of an engine directory."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ._common import user_errors


@click.command()
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option("--verify", is_flag=True,
              help="Re-hash every file against the manifest (sha256; seconds per GB) instead of checking sizes.")
@user_errors
def inspect(engine_dir, as_json, verify):
    """Show an engine directory's manifest, I/O and sizes (checks it first)."""
    import time

    from ..artifact.manifest import read_manifest

    start = time.perf_counter()
    m = read_manifest(engine_dir, deep=verify)
    seconds = time.perf_counter() - start
    if as_json:
        click.echo(json.dumps(m.to_json()))
        return
    cfg = m.model_config
    click.echo(f"engine      {engine_dir}")
    click.echo(f"backend     {m.backend}, precision {m.precision}, built {m.created_at} from {m.source}")
    click.echo(f"model       hidden {cfg['hidden_size']}, layers {cfg['num_hidden_layers']}, vocab {cfg['vocab_size']}"
               f", weights sha256 {m.weights_sha256[:16]}")
    if m.backend_choice:
        click.echo(f"backend     asked {m.backend_choice['asked']}, chose {m.backend_choice['chosen']}: "
                   f"{m.backend_choice['reason']}")
    click.echo(f"buckets     {m.buckets}")
    click.echo("tools       " + ", ".join(f"{k} {v}" for k, v in m.tool_versions.items()))
    click.echo("inputs")
    for t in m.io_spec["inputs"]:
        click.echo(f"  {t['name']:<14} {t['dtype']:<9} {list(t['shape'])}")
    click.echo("outputs")
    for t in m.io_spec["outputs"]:
        click.echo(f"  {t['name']:<14} {t['dtype']:<9} {list(t['shape'])}")
    for e in m.engines:
        check = e.get("precision_check", {})
        click.echo(f"engine      {e['target']:<6} {e['file']}  {e['trt_module']} {e['trt_version']}, "
                   f"{e.get('gpu_name') or e.get('built_on', '')}, compat {e.get('hardware_compatibility')}, "
                   f"plugins {', '.join(e.get('plugins') or []) or 'none'}, precision check "
                   f"{'passed' if check.get('passed') else 'FAILED'} ({check.get('source')})")
    total = sum(a["bytes"] for a in m.artifacts.values())
    click.echo("files       " + (f"sha256 of all {total:,} bytes verified in {seconds:.2f} s" if verify
                                 else "sizes checked (inspect --verify re-hashes them)"))
    for name, a in m.artifacts.items():
        click.echo(f"  {name:<24} {a['bytes']:>12,} bytes")
    q = m.quantization
    if q:
        r, c = q["recipe"], q["calibration"]
        acts = f"{r['activations']} activations per tensor" if r["activations"] else "weight-only"
        grain = "per channel" if r["weight_block"] is None else f"blocks of {r['weight_block']}"
        click.echo(f"recipe      {r['name']}: {r['weights']} weights {grain}, {acts}, {r['algorithm']} calibration, "
                   f"KV cache {r['kv_cache_dtype']}, float parts {r['float_dtype']}")
        click.echo(f"calibration {c['prompts']} prompts from {c['source']} (sha256 {c['sha256'][:16]}), "
                   f"modes {', '.join(c['modes'])}, {c['max_new_tokens']} new tokens")
        kv = q.get("kv_cache")
        if kv:
            fmt = lambda xs: ", ".join(f"{x:.3g}" for x in xs)     # noqa: E731
            click.echo(f"kv cache    {kv['dtype']} (1 byte per element), static scales {kv['granularity']} from "
                       f"{kv['positions']} calibrated positions: K [{fmt(kv['k_scale'])}], V [{fmt(kv['v_scale'])}]")
        click.echo(f"quantized   {q['quantized_layers']} Linear layers; Q/DQ nodes {q['graph']['qdq_nodes']}")
        click.echo(f"excluded    {', '.join(q['excluded_layers'])}")
        click.echo("thresholds  " + ", ".join(f"{k}={v}" for k, v in q["thresholds"].items() if v is not None))
    v = m.validation
    click.echo("validation  " + ("never run" if not v else
                                 f"passed={v.get('passed')} token_agreement={v.get('token_agreement')}"))
