"""Calibration prompts (built-in or --calib FILE) and their hash. The forward loop that decodes them
(the real decoding modes over the torch reference) is quant/calibration.py's.

--calib FILE: a .jsonl file, one JSON object per line with "text" (or "prompt") or "ids" (a list
of token ids), or a plain text file, one prompt per line (blank lines ignored).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..prompts import encode_prompts, read_prompt_file

__all__ = ["BUILTIN_PROMPTS", "CORPUS_PROMPTS_FILE", "builtin_texts", "read_prompts", "encode_prompts",
           "random_prompts", "prompts_hash"]

# Built-in calibration prompts: BUILTIN_PROMPTS, general text of the kinds the tiny model was trained
# on (stories, arithmetic, counting, questions), short and long, then the 64 of CORPUS_PROMPTS_FILE,
# drawn in the tiny corpus's style by `python -m tinylm.heldout 64 OUT --seed 777 --exclude
# docs/prompts/tiny-heldout-200.txt` (none is a held-out or a built-in validation prompt). 12 prompts
# were too few for per-tensor INT8 activation scales: prompts outside them produced activations past
# the calibrated range (clipped), and on 200 held-out prompts int8's prefill KL fell from 1.2e-3 to
# 2.1e-4 with the larger set (README, "Quantization"); the even-numbered prompts go through the chat
# template (prompts.encode_prompts), which the generator's order expects.
CORPUS_PROMPTS_FILE = Path(__file__).resolve().parents[1] / "assets" / "prompts" / "calibration.txt"
BUILTIN_PROMPTS = (
    "Once upon a time, a little fox lived in a forest near a river.",
    "What is 12 + 7?",
    "Count from 1:",
    "Tell me a story about a dog who lost his ball.",
    "The sun was warm and the children played in the park all day.",
    "What is 9 - 4?",
    "Write a short poem about the sea.",
    "Lily had a red kite. One day the wind took it away, and she",
    "Explain why the sky is blue in one sentence.",
    "Count from 10:",
    "Tom and Sam wanted to build a big castle out of sand.",
    "What is 5 + 8?",
)


def builtin_texts() -> tuple[str, ...]:
    """The built-in calibration set: BUILTIN_PROMPTS, then CORPUS_PROMPTS_FILE's lines."""
    lines = CORPUS_PROMPTS_FILE.read_text(encoding="utf-8").splitlines()
    return BUILTIN_PROMPTS + tuple(line.strip() for line in lines if line.strip())


def read_prompts(path: str | Path | None) -> list[dict[str, Any]]:
    """[{"text": str} or {"ids": [int]}] from --calib FILE, or the built-in set for None."""
    if path is None:
        return [{"text": t} for t in builtin_texts()]
    return read_prompt_file(path, "--calib")


def random_prompts(cfg, count: int = 8) -> list[list[int]]:
    """Seeded random token prompts for models without a tokenizer (random-weight presets)."""
    import random

    rng = random.Random(0)
    return [[cfg.bos_token_id or 1] + [rng.randrange(128, cfg.vocab_size) for _ in range(4 + 3 * i)]
            for i in range(count)]


def prompts_hash(prompts: list[list[int]]) -> str:
    """sha256 of the token ids actually calibrated on (what the manifest records)."""
    return hashlib.sha256(json.dumps(prompts, separators=(",", ":")).encode()).hexdigest()
