"""Calibration prompts (built-in or --calib FILE) and their hash. The forward loop that decodes them
(the real decoding modes over the torch reference) is build/calibration.py's.

--calib FILE: a .jsonl file, one JSON object per line with "text" (or "prompt") or "ids" (a list
of token ids), or a plain text file, one prompt per line (blank lines ignored).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import InvalidArgument

# Built-in calibration prompts: the kinds of text the tiny model was trained on (stories, arithmetic,
# counting, questions) and a few general ones, short and long.
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
MAX_PROMPT_TOKENS = 96


def read_prompts(path: str | Path | None) -> list[dict[str, Any]]:
    """[{"text": str} or {"ids": [int]}] from --calib FILE, or the built-in set for None."""
    if path is None:
        return [{"text": t} for t in BUILTIN_PROMPTS]
    path = Path(path)
    if not path.is_file():
        raise InvalidArgument(f"--calib {path}: file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"--calib {path}: cannot read it as UTF-8 text ({e})") from None
    items = []
    jsonl = path.suffix.lower() in (".jsonl", ".json")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        items.append(_jsonl_item(path, n, line) if jsonl else {"text": line.strip()})
    if not items:
        raise InvalidArgument(f"--calib {path}: no prompts in it")
    return items


def _jsonl_item(path: Path, n: int, line: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"--calib {path}:{n}: not JSON ({e.msg})") from None
    if isinstance(obj, dict) and isinstance(obj.get("text", obj.get("prompt")), str):
        return {"text": obj.get("text", obj.get("prompt"))}
    ids = obj.get("ids") if isinstance(obj, dict) else None
    if isinstance(ids, list) and ids and all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return {"ids": ids}
    raise InvalidArgument(f"--calib {path}:{n}: expected an object with \"text\" (or \"prompt\") "
                          "or \"ids\" (a list of token ids)")


def encode_prompts(items: list[dict[str, Any]], tokenizer: Any, cfg, source: str = "--calib") -> list[list[int]]:
    """Token ids per prompt (text through the tokenizer, raw, no chat template), cut to MAX_PROMPT_TOKENS."""
    out = []
    for i, item in enumerate(items):
        if "ids" in item:
            bad = [t for t in item["ids"] if not 0 <= t < cfg.vocab_size]
            if bad:
                raise InvalidArgument(f"{source}: prompt {i + 1} has token id {bad[0]} outside the vocabulary "
                                      f"(0..{cfg.vocab_size - 1})")
            ids = list(item["ids"])
        else:
            if tokenizer is None:
                raise InvalidArgument(f"{source}: this model has no tokenizer; give prompts as {{\"ids\": [...]}} "
                                      "lines in a .jsonl file")
            from ..model.tokenizer import encode_prompt

            ids = encode_prompt(tokenizer, item["text"], chat=i % 2 == 0)
        out.append(ids[-MAX_PROMPT_TOKENS:])
    return out


def random_prompts(cfg, count: int = 8) -> list[list[int]]:
    """Seeded random token prompts for models without a tokenizer (random-weight presets)."""
    import random

    rng = random.Random(0)
    return [[cfg.bos_token_id or 1] + [rng.randrange(128, cfg.vocab_size) for _ in range(4 + 3 * i)]
            for i in range(count)]


def prompts_hash(prompts: list[list[int]]) -> str:
    """sha256 of the token ids actually calibrated on (what the manifest records)."""
    return hashlib.sha256(json.dumps(prompts, separators=(",", ":")).encode()).hexdigest()
