"""The OpenAI wire format the server speaks: request bodies (pydantic) and the response / chunk / error
objects (plain dicts). No I/O here.

Supported: POST /v1/completions (prompt: text, a list of texts, token ids or a list of them; one choice
per prompt; streaming for one prompt) and POST /v1/chat/completions (messages through the checkpoint's
chat template). `max_tokens` (chat: also `max_completion_tokens`), `temperature` (0 = greedy, the
default, as in Session.generate), `seed`, `stream`, `stream_options.include_usage`, and this runtime's
decoding knobs in the body: `mode` (ar | dlm | linear-spec, default dlm), `block_length`, `threshold`,
`steps`, and the instruct models' `enable_thinking` / `max_thinking_tokens` (Session.generate's names). OpenAI fields this runtime does not implement (`stop`, `logprobs`, `n` > 1, `top_p` < 1,
penalties, tools...) are refused with a 400 naming the field rather than ignored; `user` is accepted.
`usage` adds `nfe` (engine passes the request took part in) and `tokens_per_forward`. Vision-language
engines: chat content parts `{"type": "image_url", "image_url": {"url": ...}}` (serve/images.py).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..decoding.policy import DecodePolicy

DEFAULT_MAX_TOKENS = 64            # Session.generate's max_new_tokens


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: Literal[1] | None = None
    top_p: Literal[1] | None = None
    frequency_penalty: Literal[0] | None = None
    presence_penalty: Literal[0] | None = None
    stop: None = None
    user: str | None = None
    # this runtime's decoding knobs (Session.generate's defaults when absent)
    mode: Literal["ar", "dlm", "linear-spec"] = "dlm"
    block_length: int | None = None
    threshold: float | None = None
    steps: int | None = None
    # instruct checkpoints (None: generation_config.json's defaults): the chat template's thinking switch, and
    # the thinking budget after which </think> is forced
    enable_thinking: bool | None = None
    max_thinking_tokens: int | None = Field(default=None, ge=0)

    def policy(self) -> DecodePolicy:
        """The decoding policy (InvalidArgument on a bad combination, e.g. steps with threshold)."""
        return DecodePolicy(self.mode, block_length=self.block_length, threshold=self.threshold, steps=self.steps,
                            temperature=self.temperature or 0.0, seed=self.seed or 0)

    def new_tokens(self) -> int:
        return self.max_tokens or DEFAULT_MAX_TOKENS

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and all(isinstance(t, int) for t in p)):
            return [p]
        return list(p)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str
    detail: Literal["auto", "low", "high"] | None = None      # accepted; the image is used as preprocessed


class ImagePart(BaseModel):
    """Vision-language engines: an image (serve/images.py says which URLs are accepted); it sits in the text
    where the part is, as the chat template's <|image_start|> marker."""
    model_config = ConfigDict(extra="forbid")
    type: Literal["image_url"]
    image_url: ImageURL


IMAGE_MARKER = "<|image_start|>"        # model/vision_config.IMAGE_TOKENS["start"]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart | ImagePart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text if isinstance(p, ContentPart) else IMAGE_MARKER for p in self.content)

    def image_urls(self) -> list[str]:
        return [] if isinstance(self.content, str) else [p.image_url.url for p in self.content
                                                         if isinstance(p, ImagePart)]


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def images(self) -> list[tuple[str, str]]:
        """(where, url) of every image part, in conversation order."""
        out = []
        for i, m in enumerate(self.messages):
            if not isinstance(m.content, str):
                out += [(f"messages[{i}].content[{j}].image_url", p.image_url.url)
                        for j, p in enumerate(m.content) if isinstance(p, ImagePart)]
        return out


# ---- responses -----------------------------------------------------------------------------------------

FINISH = {"eos": "stop", "length": "length"}
ONLY_DEFAULT = ("n", "top_p", "frequency_penalty", "presence_penalty", "stop")


def new_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, nfe: int, tokens_per_forward: float) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "nfe": nfe,
            "tokens_per_forward": round(tokens_per_forward, 4)}


def completion(rid: str, model: str, texts: list[str], finishes: list[str], use: dict) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": t, "finish_reason": FINISH[f], "logprobs": None}
                        for i, (t, f) in enumerate(zip(texts, finishes))],
            "usage": use}


def chat_completion(rid: str, model: str, text: str, finish: str, use: dict) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": FINISH[finish], "logprobs": None}],
            "usage": use}


def completion_chunk(rid: str, model: str, text: str, finish: str | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish and FINISH[finish], "logprobs": None}]}


def chat_chunk(rid: str, model: str, delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish and FINISH[finish], "logprobs": None}]}


def usage_chunk(rid: str, model: str, kind: str, use: dict) -> dict[str, Any]:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": use}


def error(message: str, kind: str = "invalid_request_error", param: str | None = None,
          code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """pydantic's errors -> one line naming the first bad field, and the field."""
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x not in ("body",)]
    field = ".".join(loc) or None
    msg = e.get("msg", "invalid value")
    if e.get("type") == "extra_forbidden":
        msg = "unsupported field (this server does not implement it)"
    elif field in ONLY_DEFAULT:
        msg = f"only the default is supported here ({msg})"
    return (f"{field}: {msg}" if field else msg), field
