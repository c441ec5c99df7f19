"""`nemodiff-compile build`: checkpoint -> engine directory, then a short validation."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import model_ref, model_source, user_errors


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated integers") from None
    if not vals or min(vals) < 1:
        raise click.BadParameter(f"{text!r}: expected positive integers")
    return vals


@click.command()
@model_source
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16", "fp8", "int8", "int4-awq", "nvfp4"]),
              default="fp32", show_default=True)
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt", "auto"]), default="auto", show_default=True)
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="Engine directory (default engines/<model>-<precision>-<backend>).")
@click.option("--batch-sizes", default="1,4", show_default=True, help="Batch buckets the runtime binds.")
@click.option("--max-context", default=1024, show_default=True, type=click.IntRange(min=2),
              help="KV-cache positions per row (prompt + generation).")
@click.option("--block-length", type=click.IntRange(min=2), default=None, help="Default: the config's block_size.")
@click.option("--with-logits", is_flag=True, help="Also output logits (validation builds).")
@click.option("--no-validate", is_flag=True, help="Skip the short validation at the end.")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="fp8/int8/int4-awq: calibration prompts, a .jsonl file ({\"text\": ...} or {\"ids\": [...]} "
                   "per line) or a text file (one prompt per line). Default: the built-in set.")
@click.option("--keep-first-layers", type=click.IntRange(min=0), default=None,
              help="Quantized builds: decoder layers at the start kept in float (default: the recipe's).")
@click.option("--keep-last-layers", type=click.IntRange(min=0), default=None,
              help="Quantized builds: decoder layers at the end kept in float (default: the recipe's).")
@click.option("--kv-cache", default=None, metavar="fp8|model",
              help="Quantized builds: KV-cache dtype, fp8 (FLOAT8E4M3FN, per-layer scales calibrated with the "
                   "weights) or model (the graph's float dtype). Default: the recipe's (model).")
@click.option("--calib-device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Quantized builds: where the model is calibrated (auto: the GPU when there is one). The "
                   "graph is written from it tensor by tensor either way.")
@click.option("--gpus", default=None, metavar="SM,...",
              help="TensorRT targets, e.g. sm90,sm89 (default: this GPU). On an existing TensorRT engine "
                   "directory, adds these targets.")
@click.option("--remask", type=click.Choice(["none", "onnx", "plugin"]), default="none", show_default=True,
              help="Remask stage in the graph: none (host-side commit rule), onnx (standard ops), "
                   "plugin (the nemodiff::Remask TensorRT plugin node).")
@click.option("--remask-threshold", default="0.9", show_default=True, metavar="T|topk",
              help="Commit threshold of the remask stage, or 'topk' for the fixed-steps policy.")
@click.option("--workspace-mb", type=click.IntRange(min=1), default=None, help="TensorRT workspace limit.")
@click.option("--tactic-mb", type=click.IntRange(min=1), default=None, help="TensorRT tactic memory limit.")
@click.option("--hardware-compatibility", type=click.Choice(["NONE", "AMPERE_PLUS", "SAME_COMPUTE_CAPABILITY"]),
              default="NONE", show_default=True, help="TensorRT hardware compatibility level.")
@click.option("--version-compatible", is_flag=True, help="TensorRT version-compatible engines.")
@click.option("--no-resource-check", is_flag=True,
              help="Build even when the resource plan says this machine cannot hold the build.")
@user_errors
def build(model, size, random_weights, precision, backend, output, batch_sizes, max_context, block_length, with_logits,
          no_validate, calib, keep_first_layers, keep_last_layers, kv_cache, calib_device, gpus, remask, remask_threshold,
          workspace_mb, tactic_mb, hardware_compatibility, version_compatible, no_resource_check):
    """Build an engine directory from a checkpoint (default: the embedded tiny model)."""
    from ..pipeline import Buckets, build_engine
    from ..errors import InvalidArgument
    from ..quant import is_quantized, recipe_for
    from ..quant.recipe import KV_CACHE_DTYPES

    if kv_cache is not None and kv_cache not in KV_CACHE_DTYPES:
        raise InvalidArgument(f"--kv-cache {kv_cache}: expected one of {', '.join(KV_CACHE_DTYPES)}")
    ref = model_ref(model, size, random_weights)
    buckets = Buckets(_ints(batch_sizes), max_context, block_length)
    recipe = None
    if is_quantized(precision):
        recipe = recipe_for(precision, keep_first_layers=keep_first_layers, keep_last_layers=keep_last_layers,
                            kv_cache=kv_cache)
    elif keep_first_layers is not None or keep_last_layers is not None:
        raise InvalidArgument(f"--keep-first-layers/--keep-last-layers apply to quantized builds, not {precision}")
    elif kv_cache not in (None, "model"):
        raise InvalidArgument(f"--kv-cache {kv_cache}: an fp8 KV cache is calibrated with the weights, so it "
                              f"applies to quantized builds (fp8, int8, int4-awq), not {precision}")
    trt_options = None
    if backend == "tensorrt":
        from ..trt.builder import BuildOptions

        mb = 1 << 20
        trt_options = BuildOptions(workspace_bytes=workspace_mb and workspace_mb * mb,
                                   tactic_bytes=tactic_mb and tactic_mb * mb,
                                   hardware_compatibility=hardware_compatibility,
                                   version_compatible=version_compatible)
    targets = None
    if gpus is not None:
        from ..artifact.targets import parse_targets

        targets = parse_targets(gpus)
    from ..pipeline import check_options, default_output

    # bad flags are one line before anything else is said (build_engine checks them again)
    quant, resolved = check_options(precision=precision, backend=backend, calib=calib, recipe=recipe, gpus=targets,
                                    remask=remask, calib_device=calib_device, load=False)
    output = output or default_output(ref.name, precision, resolved)
    _check_resources(ref, precision=precision, backend=resolved, buckets=buckets, validate=not no_validate,
                     recipe=recipe, calib_device=quant.device if quant else "cpu",
                     output=output, targets=len(targets or ()) or 1, enforce=not no_resource_check)
    source = ref.fetch(echo=_say)
    out = build_engine(source, output=output, precision=precision, backend=backend, buckets=buckets,
                       with_logits=with_logits, validate=not no_validate, calib=calib, recipe=recipe,
                       gpus=targets, remask=remask, remask_threshold=_threshold(remask_threshold),
                       trt_options=trt_options, calib_device=calib_device,
                       progress=_say)
    click.echo(str(out))


def _say(msg: str) -> None:
    click.echo(f"[build] {msg}", err=True)


def _check_resources(ref, *, precision, backend, buckets, validate, recipe, calib_device, output, targets,
                     enforce) -> None:
    """State the resource plan, then refuse (one line, exit 2) when this machine cannot hold it."""
    from ..errors import NemodiffError
    from ..hub import cache_dir
    from ..resources import plan_build, probe, refusal

    cfg, real = ref.config()
    cached = ref.cached()
    cache = cache_dir() if ref.kind == "hub" else None
    machine = probe(output, cache)
    plan = plan_build(cfg, precision=precision, backend=backend, calib_device=calib_device,
                      batch_sizes=buckets.batch_sizes, max_context=buckets.max_context, validate=validate,
                      random_weights=ref.kind == "random", download=not cached, output=output, cache=cache,
                      recipe=recipe, gpu_targets=targets, tensorrt_on_gpu=machine.gpu_name is not None)
    _say(f"model {ref.repo_id or ref.folder or ref.flag}"
         + ("" if real else f" (not downloaded: planned from the published {ref.size} geometry)"))
    for line in plan.lines():
        _say(line)
    _say(f"machine: {machine.describe()}")
    why = refusal(plan, machine, cfg=cfg, batch_sizes=buckets.batch_sizes, max_context=buckets.max_context,
                  validate=validate, quantized=recipe is not None)
    _say(f"plan: {'does not fit: ' + why.removeprefix('resource plan: ') if why else 'fits this machine'}")
    if not cached and not real:            # neither cached nor reachable: the download command
        raise ref.missing()
    if why and enforce:
        raise NemodiffError(why + " (or --no-resource-check to try anyway)")


def _threshold(text: str) -> float | None:
    if text.strip().lower() == "topk":
        return None
    try:
        return float(text)
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected a number in [0, 1] or 'topk'",
                                 param_hint="--remask-threshold") from None
