"""Prompt files (`--calib FILE`, `validate --prompts FILE`) and their token ids. Stdlib only.

A .jsonl (or .json) file: one JSON object per line with "text" (or "prompt") or "ids" (a list of
token ids). Any other file: one prompt per line. Blank lines are ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import InvalidArgument

MAX_PROMPT_TOKENS = 96


# Built-in prompts (package data, one per line; encode_prompts wraps the even-numbered ones in the chat
# template): the four first are the original set, chat and raw text of different lengths; the 60 after
# them were drawn by `python -m tinylm.heldout 60 OUT --seed 72026 --exclude docs/prompts/tiny-heldout-200.txt
# --exclude nemodiff_compile/assets/prompts/calibration.txt` (the tiny corpus's style; none is a
# calibration or held-out prompt).
PROMPTS_FILE = Path(__file__).resolve().parent / "assets" / "prompts" / "validation.txt"
TEXT_PROMPTS = ("What is 3 + 4?", "Once upon a time, Mia", "Count from 5:",
                "Tell me a story about a cat who found a red ball in the garden.")


def prompt_texts() -> tuple[str, ...]:
    """The built-in prompts' texts, in order (TEXT_PROMPTS first)."""
    return tuple(line.strip() for line in PROMPTS_FILE.read_text(encoding="utf-8").splitlines() if line.strip())


def builtin_prompts(tok: Any, cfg, count: int) -> list[list[int]]:
    """The first `count` built-in prompts, of different lengths: encoded text when there is a tokenizer,
    else seeded ids."""
    if tok is not None:
        return encode_prompts([{"text": t} for t in prompt_texts()[:count]], tok, cfg, "built-in prompts")
    import random

    rng = random.Random(0)
    return [[cfg.bos_token_id or 1] + [rng.randrange(128, cfg.vocab_size) for _ in range(3 + 5 * (i % 8))]
            for i in range(count)]


def read_lines(path: str | Path, flag: str, what: str = "prompts") -> list[tuple[str, str]]:
    """The non-blank lines of the file given to `flag`, each with its "FLAG FILE:LINE" for errors."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArgument(f"{flag} {path}: file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"{flag} {path}: cannot read it as UTF-8 text ({e})") from None
    out = [(f"{flag} {path}:{n}", line) for n, line in enumerate(lines, 1) if line.strip()]
    if not out:
        raise InvalidArgument(f"{flag} {path}: no {what} in it")
    return out


def read_prompt_file(path: str | Path, flag: str) -> list[dict[str, Any]]:
    """[{"text": str} or {"ids": [int]}] from the file given to `flag` (named in every error)."""
    jsonl = Path(path).suffix.lower() in (".jsonl", ".json")
    return [_jsonl_item(where, line) if jsonl else {"text": line.strip()}
            for where, line in read_lines(path, flag)]


def _jsonl_item(where: str, line: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"{where}: not JSON ({e.msg})") from None
    if isinstance(obj, dict) and isinstance(obj.get("text", obj.get("prompt")), str):
        return {"text": obj.get("text", obj.get("prompt"))}
    ids = obj.get("ids") if isinstance(obj, dict) else None
    if isinstance(ids, list) and ids and all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return {"ids": ids}
    raise InvalidArgument(f"{where}: expected an object with \"text\" (or \"prompt\") "
                          "or \"ids\" (a list of token ids)")


def encode_prompts(items: list[dict[str, Any]], tokenizer: Any, cfg, source: str) -> list[list[int]]:
    """Token ids per prompt, cut to the last MAX_PROMPT_TOKENS: ids as given; text through the
    tokenizer, alternately with and without the chat template (as the built-in prompts)."""
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
            from .model.tokenizer import encode_prompt

            ids = encode_prompt(tokenizer, item["text"], chat=i % 2 == 0)
        out.append(ids[-MAX_PROMPT_TOKENS:])
    return out
