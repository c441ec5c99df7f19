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
                  modes: tuple[str, ...] = ("ar", "dlm", "linear-spec"), max_len: int = 256):
    import torch

    from .. import checkpoint_folder, load_reference
    from ..errors import InvalidArgument
    from ..backends.fast import FastDenoiser
    from ..backends.eager import TorchDenoiser
    from . import tolerances_for, validate
    from .engine import builtin_prompts

    if precision not in FAST_PRECISIONS:
        raise InvalidArgument(f"--precision {precision}: the fast engine validates {', '.join(FAST_PRECISIONS)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype, fp8, tol_name = FAST_PRECISIONS[precision]
    if fp8 and device == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        raise InvalidArgument(f"--precision {precision}: FP8 matmuls need compute capability 8.9 or newer")
    model = load_reference(source, dtype=dtype, device=device)
    tok = None
    folder = checkpoint_folder(source)
    if folder is not None and (folder / "tokenizer.json").is_file():
        from ..model.tokenizer import load_tokenizer
        tok = load_tokenizer(folder)
    prompts = builtin_prompts(tok, model.config, 2 if quick else 4)
    engine = FastDenoiser(model, max_len, fp8=fp8)
    if fp8 == "static":
        calib = [p for p in (_encode(tok, t) for t in CALIBRATION_TEXTS) if p] if tok is not None else \
            builtin_prompts(None, model.config, 6)[4:]
        engine.calibrate(calib)
    reference = TorchDenoiser(model, max_len, return_logits=True)
    return validate(reference, engine, prompts, modes=modes, max_new_tokens=max_new_tokens or (16 if quick else 32),
                    tolerances=tolerances_for(tol_name))


def _encode(tok, text: str) -> list[int]:
    from ..model.tokenizer import encode_prompt

    return encode_prompt(tok, text, chat=False)
