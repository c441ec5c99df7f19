"""Bounds on what a generation is asked for: one policy for the CLI, the Python API (Session and the
loops) and the server, with the same messages. Stdlib only.

Each message names the argument the way its caller spells it: `API` (keywords: max_new_tokens) for
Python callers, `CLI` (flags: --max-new-tokens) for the command line; the bounds and the rest of the
sentence are the same.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Mapping, Sequence

from ..errors import InvalidArgument

API = {"max_new_tokens": "max_new_tokens", "block_length": "block_length", "steps": "steps",
       "threshold": "threshold", "temperature": "temperature", "seed": "seed", "prompt": "prompt",
       "max_len": "raise the backend's max_len (Session.open(max_len=N) up to the engine's --max-context)"}
CLI = {"max_new_tokens": "--max-new-tokens", "block_length": "--block-length", "steps": "--steps",
       "threshold": "--threshold", "temperature": "--temperature", "seed": "--seed", "prompt": "--prompt-ids",
       "max_len": "rebuild the engine with a larger --max-context"}


def check_generation(*, max_new_tokens, block_length=None, steps=None, threshold=None, temperature=0.0,
                     seed=0, names: Mapping[str, str] = API) -> None:
    """InvalidArgument (one line) for a value out of bounds: max_new_tokens >= 1, block_length >= 2,
    steps >= 1, threshold in [0, 1], temperature >= 0 (finite), seed an integer."""
    _int(names["max_new_tokens"], max_new_tokens, 1)
    if block_length is not None:
        _int(names["block_length"], block_length, 2)
    if steps is not None:
        _int(names["steps"], steps, 1)
    if threshold is not None and not (_real(threshold) and 0.0 <= threshold <= 1.0):
        raise InvalidArgument(f"{names['threshold']} {threshold!r}: expected a number in [0, 1]")
    if not (_real(temperature) and 0.0 <= temperature < math.inf):
        raise InvalidArgument(f"{names['temperature']} {temperature!r}: expected a number >= 0")
    if not _integer(seed):
        raise InvalidArgument(f"{names['seed']} {seed!r}: expected an integer")


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


def _int(name: str, value, minimum: int) -> None:
    if not _integer(value) or value < minimum:
        raise InvalidArgument(f"{name} {value!r}: expected an integer >= {minimum}")


def _integer(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isnan(v)
