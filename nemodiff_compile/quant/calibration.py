"""The calibration data of a quantized build and the forward loop ModelOpt calibrates with.

The denoiser sees masked canvases in bidirectional refinement passes that an AR forward would never
show it, so calibration runs the decode loops themselves over the torch reference: `dlm` (prefill,
bidirectional denoise passes on partly masked blocks, causal commit passes), `linear-spec`
(bidirectional draft of a whole masked block, causal verify) and `ar`, through the same
`TorchDenoiser` and `decoding.loops` that every backend is checked against.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable


def read_items(calib: str | Path | None) -> list[dict]:
    """The --calib file's prompts (or the built-in set), read and checked before any work is done."""
    from .calib import read_prompts

    return read_prompts(calib)


def token_prompts(items: list[dict], folder: Path | None, cfg, calib) -> list[list[int]]:
    """Token ids to calibrate on: the items through the checkpoint's tokenizer; random ids for the
    built-in set on a model without one (random-weight presets)."""
    from .calib import encode_prompts, random_prompts

    tok = None
    if folder is not None and (folder / "tokenizer.json").is_file():
        from ..model.tokenizer import load_tokenizer

        tok = load_tokenizer(folder)
    if tok is None and calib is None:
        return random_prompts(cfg)
    return encode_prompts(items, tok, cfg, source=f"--calib {calib}" if calib else "built-in prompts")


def record(prompts: list[list[int]], calib) -> dict[str, Any]:
    """What the manifest says about the calibration data."""
    from .calib import prompts_hash

    return {"source": str(calib) if calib else "builtin", "prompts": len(prompts), "sha256": prompts_hash(prompts)}


def decoding_loop(prompts: list[list[int]], modes: tuple[str, ...], max_new_tokens: int, block_length: int,
                  batch: int = 8) -> Callable[[Any], None]:
    """The ModelOpt forward loop: `loop(model)` decodes every prompt in every mode (greedy, threshold
    policy) so the quantizers see prefill, denoise, commit, draft and verify passes."""

    def loop(model) -> None:
        import torch

        from ..backends.eager import TorchDenoiser
        from ..decoding import loops

        from .. import progress

        longest = max(map(len, prompts))
        den = TorchDenoiser(model, longest + max_new_tokens + 2 * block_length)
        step = den.step
        with torch.no_grad(), progress.bar("calibration", unit="pass") as tick:
            def counted(*args, **kw):          # one tick per forward pass
                out = step(*args, **kw)
                tick()
                return out

            den.step = counted
            for mode in modes:
                for i in range(0, len(prompts), batch):
                    loops.generate(den, prompts[i:i + batch], mode, max_new_tokens=max_new_tokens,
                                   block_length=block_length)

    return loop
