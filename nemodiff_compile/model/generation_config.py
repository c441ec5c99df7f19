"""The instruct checkpoints' chat features: the chat template's thinking switch (`enable_thinking`)
and the thinking budget (`max_thinking_tokens`), with defaults from `generation_config.json` where the
checkpoint has them.

    defaults = GenerationDefaults.read(folder)                      # missing file or keys: None
    kwargs, budget = thinking_setup(tok, defaults, enable_thinking=True, max_thinking_tokens=256)
    ids = encode_prompt(tok, text, **kwargs)                        # the template renders <think>
    loops.generate(den, [ids], "dlm", thinking=budget, ...)         # </think> forced after 256 tokens

The same two names are what the Session API and a serving request body take.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, InvalidArgument
from ..decoding.thinking import ThinkingBudget

GENERATION_CONFIG = "generation_config.json"
END_THINK = "</think>"


@dataclass(frozen=True)
class GenerationDefaults:
    enable_thinking: bool | None = None
    max_thinking_tokens: int | None = None

    @classmethod
    def read(cls, folder: str | Path | None) -> "GenerationDefaults":
        """The thinking defaults in folder/generation_config.json (none when it has no such keys)."""
        path = Path(folder) / GENERATION_CONFIG if folder is not None else None
        if path is None or not path.is_file():
            return cls()
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        think, budget = raw.get("enable_thinking"), raw.get("max_thinking_tokens")
        if think is not None and not isinstance(think, bool):
            raise CheckpointError(f"{path}: enable_thinking must be true or false, got {think!r}")
        if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 0):
            raise CheckpointError(f"{path}: max_thinking_tokens must be a non-negative integer, got {budget!r}")
        return cls(think, budget)


def thinking_setup(tok: Any, defaults: GenerationDefaults, enable_thinking: bool | None = None,
                   max_thinking_tokens: int | None = None) -> tuple[dict[str, Any], ThinkingBudget | None]:
    """(chat-template kwargs, the loops' thinking budget or None) for one request.

    enable_thinking / max_thinking_tokens: the request's values, None for the checkpoint's defaults
    (thinking off when it has none). A budget applies only with thinking on; asking for one with
    thinking off is an error, as is thinking on with a chat template that has no switch for it."""
    think = enable_thinking if enable_thinking is not None else bool(defaults.enable_thinking)
    budget = max_thinking_tokens if max_thinking_tokens is not None else defaults.max_thinking_tokens
    if max_thinking_tokens is not None and not think:
        raise InvalidArgument(f"max_thinking_tokens {max_thinking_tokens}: thinking is off; turn it on "
                              "(enable_thinking=True, --thinking) or drop the budget")
    template = getattr(tok, "chat_template", None) if tok is not None else None
    if enable_thinking and template is not None and "enable_thinking" not in str(template):
        raise InvalidArgument("enable_thinking: this checkpoint's chat template has no thinking switch")
    if not think or budget is None:
        return {"enable_thinking": think}, None
    return {"enable_thinking": think}, ThinkingBudget(int(budget), end_think_id(tok))


def end_think_id(tok: Any) -> int:
    """The closing tag's id: its own token where the vocabulary has one, else (as upstream) the last
    id of its encoding."""
    if tok is None:
        raise InvalidArgument("max_thinking_tokens: the thinking budget needs the checkpoint's tokenizer "
                              f"(to find {END_THINK})")
    tid = tok.convert_tokens_to_ids(END_THINK)
    if isinstance(tid, int) and tid != tok.unk_token_id:
        return tid
    ids = tok.encode(END_THINK, add_special_tokens=False)
    if not ids:
        raise InvalidArgument(f"max_thinking_tokens: the tokenizer cannot encode {END_THINK}")
    return int(ids[-1])
