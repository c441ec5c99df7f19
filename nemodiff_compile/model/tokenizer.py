"""The checkpoint's tokenizer (a transformers fast tokenizer) and prompt encode / decode helpers.

Loads from local files only, never runs remote code. transformers is imported inside the functions.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import CheckpointError

# One of these must be in the folder for a tokenizer to load (tokenizer.json is what NLD ships).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def load_tokenizer(folder: str | Path) -> Any:
    """`AutoTokenizer.from_pretrained(folder)` from local files: a `PreTrainedTokenizerFast`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: tokenizer folder not found")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{folder}: no tokenizer files (expected {' or '.join(TOKENIZER_FILES)})")
    from transformers import AutoTokenizer

    with _quiet_transformers():
        try:
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        except Exception as e:  # transformers raises OSError, ValueError, JSONDecodeError, Exception...
            first = (str(e).strip().splitlines() or [""])[0]
            raise CheckpointError(f"{folder}: cannot load the tokenizer ({type(e).__name__}: {first})") from None


def encode_prompt(tok: Any, text: str, chat: bool = True, **template_kwargs: Any) -> list[int]:
    """Token ids of a prompt. chat=True and a chat template: a one-turn user conversation with the
    assistant generation prompt (template_kwargs, e.g. enable_thinking, go to the template); else
    plain `tok.encode(text)` with the tokenizer's own special tokens (BOS)."""
    if chat and getattr(tok, "chat_template", None):
        rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True, **template_kwargs)
        return list(tok.encode(rendered, add_special_tokens=False))   # the template writes BOS itself
    return list(tok.encode(text, add_special_tokens=True))


def decode(tok: Any, ids: Sequence[int] | Any, *, skip_special_tokens: bool = True) -> str:
    """ids (list, or a 1-D tensor / array) -> text."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers warns that config.json's model_type is unknown to it; that is expected here."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
