"""What a generation's prompts must satisfy: token ids inside the vocabulary, prompt + generation inside
the cache. Checked where ids enter (the CLI's --prompt-ids, Session prompts, the loops' prefill), with
the same sentences; names as in policy.py (`API` keywords or `CLI` flags). Stdlib only.
"""

from __future__ import annotations

import math
import operator
from typing import Mapping, Sequence

from ..errors import InvalidArgument
from .policy import API


def check_token_ids(ids: Sequence, vocab_size: int, what: str) -> list[int]:
    """The prompt `ids` as ints, each in [0, vocab_size); `what` names the prompt in the message
    ("prompt 2", "--prompt-ids 1,5,99999")."""
    if len(ids) == 0:
        raise InvalidArgument(f"{what}: empty prompt (expected at least one token id)")
    out = []
    for t in ids:
        try:
            if isinstance(t, bool):
                raise TypeError
            t = operator.index(t)                  # ints, numpy and 0-d torch integers; not 1.0 or True
        except TypeError:
            raise InvalidArgument(f"{what}: token id {t!r} is not an integer") from None
        if not 0 <= t < vocab_size:
            raise InvalidArgument(f"{what}: token id {t} is outside the vocabulary (0..{vocab_size - 1})")
        out.append(t)
    return out


def check_room(prompt_len: int, *, mode: str, max_new_tokens: int, block_length: int, max_len: int,
               names: Mapping[str, str] = API, backend: str = "the backend") -> None:
    """The prompt and the generation fit the cache of `max_len` positions per row; else one line that
    blames the argument at fault (the prompt, the block length, or max_new_tokens)."""
    blocked = mode != "ar"
    if prompt_len + (block_length if blocked else 1) > max_len:
        if prompt_len + 2 > max_len or not blocked:      # not even the smallest block would fit
            raise InvalidArgument(f"{names['prompt']}: a prompt of {prompt_len} tokens leaves no room in "
                                  f"{backend}'s {max_len} cache positions; expected a shorter prompt, "
                                  f"or {names['max_len']}")
        raise InvalidArgument(f"{names['block_length']} {block_length}: one block after the prompt "
                              f"({prompt_len} tokens) needs {prompt_len + block_length} cache positions, "
                              f"{backend} has {max_len}; expected {names['block_length']} <= "
                              f"{max_len - prompt_len}")
    room = max_len - prompt_len
    if mode == "ar":
        need, fit = max_new_tokens, room
    elif mode == "dlm":
        need, fit = math.ceil(max_new_tokens / block_length) * block_length, room // block_length * block_length
    else:                                                   # linear-spec: one block of drafts past the end
        need, fit = max_new_tokens + block_length, room - block_length
    if need > room:
        raise InvalidArgument(f"{names['max_new_tokens']} {max_new_tokens}: the prompt ({prompt_len}) and the "
                              f"generation ({need}) need {prompt_len + need} cache positions, {backend} has "
                              f"{max_len}; expected {names['max_new_tokens']} <= {fit}, or {names['max_len']}")
