"""Validate the fast torch engine (backends/fast.py) against the eager reference with the same
per-pass shadow comparison as engine directories. On a GPU the engine replays its captured passes
(no logits leave the graph, so token, confidence and commit decisions are compared); on the CPU it
runs the same arithmetic eagerly."""

from __future__ import annotations

from pathlib import Path

# precision -> (reference dtype, FastModel fp8 mode, tolerance set)
FAST_PRECISIONS = {"fp32": ("float32", None, "fp32"), "bf16": ("bfloat16", None, "bf16"),
                   "fp8": ("bfloat16", "row", "fp8"), "fp8-tensor": ("bfloat16", "tensor", "fp8"),
                   "fp8-static": ("bfloat16", "static", "fp8")}
# static FP8 calibrates on these, never on the prompts it is validated on
CALIBRATION_TEXTS = ("The weather today is", "Write a list of three fruits:", "Why is the sky blue?",
                     "Anna and Ben went to the market and bought")


def validate_fast(source: str | Path, *, precision: str = "bf16", device: str | None = None,
                  quick: bool = False, max_new_tokens: int | None = None,
                  modes: tuple[str, ...] = ("ar", "dlm", "linear-spec"), max_len: int = 256, gemv: bool = False):
    """gemv: the engine's projections through the split-K small-M kernel (kernels/gemv.py)."""
    from ..backends.eager import TorchDenoiser
    from . import tolerances_for, validate
    from ..prompts import builtin_prompts

    model, engine, tok = open_fast(source, precision=precision, device=device, max_len=max_len, gemv=gemv)
    prompts = builtin_prompts(tok, model.config, 2 if quick else 4)
    reference = TorchDenoiser(model, max_len, return_logits=True)
    return validate(reference, engine, prompts, modes=modes, max_new_tokens=max_new_tokens or (16 if quick else 32),
                    tolerances=tolerances_for(FAST_PRECISIONS[precision][2]))


def open_fast(source: str | Path, *, precision: str = "bf16", device: str | None = None, max_len: int = 256,
              batch_sizes: tuple[int, ...] | None = None, gemv: bool = False):
    """(reference model, FastDenoiser at `precision`, tokenizer or None); static FP8 calibrated."""
    import torch

    from .. import checkpoint_folder, load_reference
    from ..errors import InvalidArgument
    from ..artifact.buckets import BatchBuckets
    from ..backends.fast import FastDenoiser
    from ..prompts import builtin_prompts

    if precision not in FAST_PRECISIONS:
        raise InvalidArgument(f"--precision {precision}: the fast engine runs {', '.join(FAST_PRECISIONS)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype, fp8, _ = FAST_PRECISIONS[precision]
    if fp8 and device == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        raise InvalidArgument(f"--precision {precision}: FP8 matmuls need compute capability 8.9 or newer")
    model = load_reference(source, dtype=dtype, device=device)
    tok = None
    folder = checkpoint_folder(source)
    if folder is not None and (folder / "tokenizer.json").is_file():
        from ..model.tokenizer import load_tokenizer
        tok = load_tokenizer(folder)
    buckets = BatchBuckets(batch_sizes) if batch_sizes else BatchBuckets()
    engine = FastDenoiser(model, max_len, fp8=fp8, buckets=buckets, gemv=gemv)
    if fp8 == "static":
        calib = [p for p in (_encode(tok, t) for t in CALIBRATION_TEXTS) if p] if tok is not None else \
            builtin_prompts(None, model.config, 6)[4:]
        engine.calibrate(calib)
    return model, engine, tok


def sweep_fast(source: str | Path, specs: tuple[str, ...], *, precision: str = "bf16", device: str | None = None,
               mode: str = "dlm", max_new_tokens: int = 64, batch: int = 1, repeats: int = 3,
               tasks_file: str | Path | None = None, prompts_file: str | Path | None = None, log=None):
    """`bench-gpu --sweep ...`: the fast engine over a grid of decode settings (bench/sweep.py, the
    same code as `bench --sweep`), judged by the reference model it was made from."""
    from ..bench.sweep import SweepInputs, plan_sweep, room, run_sweep
    from ..prompts import MAX_PROMPT_TOKENS

    inputs = SweepInputs.read(specs, mode=mode, tasks_file=tasks_file, prompts_file=prompts_file)
    block_size = _block_size(source)
    settings = plan_sweep(inputs.axes, mode=mode, block_size=block_size)
    max_len = MAX_PROMPT_TOKENS + max(room(s, max_new_tokens, block_size) for s in settings)
    model, engine, tok = open_fast(source, precision=precision, device=device, max_len=max_len,
                                   batch_sizes=(batch,))
    prompts, where = inputs.prompts(tok, model.config)
    info = dict(engine=f"fast engine {precision} on {engine.device.type} ({source})", prompt_source=where,
                judge=f"the reference ({str(model.dtype).replace('torch.', '')}) causal pass")
    return run_sweep(engine, settings, prompts, judge=model, max_new_tokens=max_new_tokens, batch=batch,
                     repeats=repeats, tasks=inputs.tasks, tokenizer=tok, info=info, log=log)


def _block_size(source) -> int:
    """The model's block length, read before the model loads (its config.json, or the preset)."""
    from .. import checkpoint_folder
    from ..config import ModelConfig, preset

    folder = checkpoint_folder(source)
    return ModelConfig.from_file(folder / "config.json").block_size if folder else preset(str(source)).block_size


def _encode(tok, text: str) -> list[int]:
    from ..model.tokenizer import encode_prompt

    return encode_prompt(tok, text, chat=False)
