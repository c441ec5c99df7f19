"""Validate / bench a built engine directory against the PyTorch reference it was built from."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import NemodiffError
from ..prompts import builtin_prompts

# How many built-in prompts (prompts.py) a validation uses: float engines must match token for token,
# so a few prompts show a fault; a quantized engine is judged by distributions (validate/tolerances.py),
# which need enough prompts that the build's own check cannot pass where a large held-out set fails
# (README, "Quantization": measured against docs/prompts/tiny-heldout-200.txt).
PROMPT_COUNTS = {"float": {"quick": 2, "full": 4}, "quantized": {"quick": 32, "full": 64}}
VALIDATION_BATCH = 16               # prompts decoded together (a large set runs in chunks of this)


def open_pair(engine_dir: str | Path, *, reference: Any = None, reference_source: str | Path | None = None,
              max_len: int | None = None, threads: int | None = None):
    """(manifest, engine Denoiser, reference Denoiser, tokenizer or None) for an engine directory."""
    from .. import PRESETS, load_reference
    from ..build_config import PRECISION_DTYPES
    from ..backends.eager import TorchDenoiser
    from ..backends.open import open_engine

    e = open_engine(engine_dir, max_len=max_len, threads=threads, return_logits=None)
    manifest, cfg = e.manifest, e.config
    if reference is None:
        source = reference_source or manifest.source
        if not Path(str(source)).exists() and str(source).lower() not in PRESETS:
            raise NemodiffError(f"{engine_dir}: the reference checkpoint {source} is gone: pass --reference DIR")
        reference = load_reference(source, dtype=PRECISION_DTYPES.get(manifest.precision, "float32"))
    if reference.config.replace(dtype=cfg.dtype).to_hf() != cfg.to_hf():          # dtype aside
        raise NemodiffError(f"{engine_dir}: the reference model's config differs from the engine's: "
                            "rebuild the engine from this checkpoint")
    return manifest, e.denoiser, TorchDenoiser(reference, e.denoiser.max_len, return_logits=True), e.tokenizer


def validate_engine(engine_dir: str | Path, *, reference: Any = None, reference_source: str | Path | None = None,
                    quick: bool = False, max_new_tokens: int | None = None,
                    modes: tuple[str, ...] = ("ar", "dlm", "linear-spec"), write: bool = True,
                    prompts_file: str | Path | None = None, threshold: float | None = None,
                    steps: int | None = None):
    """Compare the engine with the reference per pass on the built-in prompts (or those of
    `prompts_file`, a --prompts file: prompts.py); record it in the manifest (only in the directory it
    ran on: not when a build has replaced the directory meanwhile). threshold / steps: the dlm policy
    (default: `stage_policy`)."""
    from ..artifact.manifest import write_manifest
    from ..fsutil import read_stable_at, update_if_same
    from . import tolerances_for, validate

    items = None
    if prompts_file is not None:                 # read and checked before any model is loaded
        from ..prompts import read_prompt_file

        items = read_prompt_file(prompts_file, "--prompts")
    (manifest, engine, ref, tok), opened = read_stable_at(      # never a mix of two builds swapped in meanwhile
        engine_dir, lambda: open_pair(engine_dir, reference=reference, reference_source=reference_source))
    q = manifest.quantization
    if items is None:
        prompts = builtin_prompts(tok, ref.config,
                                  PROMPT_COUNTS["quantized" if q else "float"]["quick" if quick else "full"])
    else:
        from ..prompts import encode_prompts

        prompts = encode_prompts(items, tok, ref.config, f"--prompts {prompts_file}")
    images, vision = None, None
    if getattr(engine, "encode_image", None) is not None:     # a vision-language engine: image prompts too
        from .images import image_prompts

        image_ids, image_feats, vision = image_prompts(ref, engine, tok)
        images = [None] * len(prompts) + image_feats
        prompts = prompts + image_ids
    max_new_tokens = max_new_tokens or (16 if quick else 32)
    if manifest.backend != "tensorrt":      # (TensorRT binds the cache at max_context exactly)
        # the cache these prompts need, not the engine's largest: attention runs over all of it
        need = max(map(len, prompts)) + max_new_tokens + 2 * manifest.buckets["block_length"]
        engine.max_len = ref.max_len = min(need, engine.max_len)         # before the first reset allocates
    tol = tolerances_for(manifest.precision, q.get("thresholds") if q else None)
    report = validate(ref, engine, prompts, modes=modes, max_new_tokens=max_new_tokens, tolerances=tol,
                      batch=VALIDATION_BATCH, images=images,
                      **({"threshold": threshold, "steps": steps} if threshold is not None or
                         steps is not None else stage_policy(manifest, ref.config)))
    report.vision = vision
    if not report.passed:
        from .explain import explain

        recipe = (q or {}).get("recipe") or {}
        kept = (int(recipe.get("keep_first_layers", 0)), int(recipe.get("keep_last_layers", 0)))
        report.explanation = explain(report, ref, engine, prompts, kept=kept)
    if write:
        summary = report.to_json()
        device = {k: v["device_loop"] for k, v in summary["per_mode"].items() if v.get("device_loop")}
        manifest.validation = {
            "passed": summary["passed"], "token_agreement": summary["token_agreement"],
            "passes_compared": summary["passes_compared"], "first_divergence": summary["first_divergence"],
            "tolerances": summary["tolerances"], "quick": quick, "prompts": len(prompts),
            "prompts_source": str(prompts_file) if prompts_file is not None else "builtin",
            "per_mode": {k: {"token_agreement": v["token_agreement"], "commit_agreement": v["commit_agreement"],
                             "forced_token_agreement": v["forced_token_agreement"],
                             "logits_cosine_min": v["worst"]["logits_cosine_min"], "kl_mean": v["kl_mean"],
                             "prompt_spread": v["prompt_spread"],
                             "phases": {ph: {"cosine": d.get("cosine"), "kl_mean": (d.get("kl") or {}).get("mean")}
                                        for ph, d in v["phases"].items()},
                             "tokens_per_forward": v["tokens_per_forward"], "tpf_drop": v["tpf_drop"]}
                         for k, v in summary["per_mode"].items()},
            "failures": summary["failures"],
            "explanation": (summary.get("explanation") or {}).get("text"),
            "device_loop": {k: {"token_agreement": d["token_agreement"], "same_as_host_passes": d["same_as_host_passes"],
                                "nfe": d["nfe"], "device_passes": d["device_passes"]} for k, d in device.items()},
            "dlm_policy": {"threshold": report.settings["threshold"], "steps": report.settings["steps"]},
            "vision": vision,
            "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        try:
            same = update_if_same(engine_dir, opened, lambda: write_manifest(Path(engine_dir), manifest))
            report.not_recorded = None if same else f"{engine_dir} was rebuilt while it was validated"
        except (NemodiffError, OSError) as e:               # a read-only engine directory: still report
            report.not_recorded = f"cannot write {engine_dir}/manifest.json ({getattr(e, 'strerror', None) or e})"
    return report


def stage_policy(manifest, config) -> dict[str, Any]:
    """The dlm policy validate uses by default: one the engine's remask stage serves (its threshold, or for
    a `--remask-threshold topk` stage a fixed schedule of block_length // 4 passes), so the compiled loop
    is validated too; engines without a stage: the default (threshold 0.9)."""
    stage = manifest.io_spec.get("extra", {}).get("remask")
    if stage is None:
        return {}
    if stage["policy"] == "topk":
        return {"steps": max(1, config.block_size // 4)}
    return {"threshold": float(stage["threshold"])}


def bench_engine(engine_dir: "str | Path | list[str | Path]", *, batch: int = 1, mode: str = "dlm",
                 max_new_tokens: int = 64, repeats: int = 3, warmup: int = 1, threads: int | None = None,
                 threshold: float | None = None, steps: int | None = None):
    """Engines (one directory, or several of the same model side by side: e.g. built with --remask none,
    onnx and plugin) and their reference, on the same prompts in the same run. A single engine is named
    "engine", several by their directory names. threshold / steps: the dlm policy (default: the one the
    first engine's remask stage serves, else threshold 0.9)."""
    from ..bench import bench

    dirs = [Path(d) for d in ([engine_dir] if isinstance(engine_dir, (str, Path)) else engine_dir)]
    if not dirs:
        raise NemodiffError("bench needs at least one engine directory")
    manifest, engine, ref, tok = open_pair(dirs[0], threads=threads)
    engines = {"engine" if len(dirs) == 1 else _name(dirs, 0): engine}
    for i, d in enumerate(dirs[1:], 1):
        m, e, _, _ = open_pair(d, reference=ref.model, threads=threads)
        engines[_name(dirs, i)] = e
    for e in (ref, *engines.values()):
        e.return_logits = False
    prompts = (builtin_prompts(tok, ref.config, 4) * batch)[:batch]
    policy = {"threshold": threshold, "steps": steps} if threshold is not None or steps is not None else \
        {"threshold": 0.9, **stage_policy(manifest, ref.config)}
    return bench({**engines, "reference": ref}, prompts, mode=mode, max_new_tokens=max_new_tokens,
                 repeats=repeats, warmup=warmup, **policy)


def _name(dirs: list[Path], i: int) -> str:
    names = [d.name for d in dirs]
    return names[i] if names.count(names[i]) == 1 else f"{names[i]}#{i}"


def sweep_engine(engine_dir: str | Path, specs: tuple[str, ...], *, mode: str = "dlm", max_new_tokens: int = 64,
                 batch: int = 1, repeats: int = 3, threads: int | None = None,
                 tasks_file: str | Path | None = None, prompts_file: str | Path | None = None, log=None):
    """`bench DIR --sweep ...`: the engine over a grid of decode settings (bench/sweep.py), judged by
    the reference it was built from. Prompts: --tasks (scored answers), --prompts, or the built-in ones."""
    from ..bench.sweep import SweepInputs, plan_sweep, run_sweep

    inputs = SweepInputs.read(specs, mode=mode, tasks_file=tasks_file, prompts_file=prompts_file)
    manifest, engine, ref, tok = open_pair(engine_dir, threads=threads)
    ref.return_logits = engine.return_logits = False
    settings = plan_sweep(inputs.axes, mode=mode, block_size=ref.config.block_size)
    prompts, source = inputs.prompts(tok, ref.config)
    info = dict(engine=f"{Path(engine_dir).name} ({manifest.backend}, {manifest.precision})", prompt_source=source,
                judge=f"the reference ({ref.model.dtype}) causal pass".replace("torch.", ""))
    return run_sweep(engine, settings, prompts, judge=ref.model, max_new_tokens=max_new_tokens, batch=batch,
                     repeats=repeats, tasks=inputs.tasks, tokenizer=tok, info=info, log=log)
