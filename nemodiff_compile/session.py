"""`Session`: the small public API a service embeds.

    with Session.open("engines/tiny-fp32-onnxruntime") as s:
        out = s.generate("What is 3 + 4?", mode="dlm", max_new_tokens=64)
        for piece in s.stream("Once upon a time"):
            print(piece, end="")

A session owns one engine (one static KV cache); generations are serialised by a lock, so one
session can be shared by several threads. Open one session per concurrent stream you want.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from .errors import InvalidArgument, NemodiffError
from .decoding import loops
from .decoding.policy import DecodePolicy

Prompt = str | Sequence[int]


@dataclass
class Completion:
    tokens: list[int]
    text: str | None
    finish: str                        # "eos" | "length"


@dataclass
class Result:
    completions: list[Completion]
    generation: loops.Generation       # NFE, tokens per forward, trace

    @property
    def text(self) -> str | None:
        return self.completions[0].text


class Session:
    def __init__(self, denoiser: loops.Denoiser, tokenizer: Any = None, manifest: Any = None):
        self.denoiser, self.tokenizer, self.manifest = denoiser, tokenizer, manifest
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def open(cls, engine_dir: str | Path, *, providers: list[str] | None = None,
             threads: int | None = None, max_len: int | None = None) -> "Session":
        """Open a built engine directory (checks its manifest first)."""
        from .backends.open import open_engine

        engine = open_engine(engine_dir, providers=providers, threads=threads, max_len=max_len)
        return cls(engine.denoiser, engine.tokenizer, engine.manifest)

    @classmethod
    def from_model(cls, source: str | Path, *, fp8: str | None = None, max_len: int = 2048,
                   device: str | None = None, calibration: Sequence[Prompt] | None = None) -> "Session":
        """The fast engine (backends/fast.py) straight from a checkpoint folder or preset, no
        engine directory: CUDA graphs and Triton kernels on a GPU, the same arithmetic eagerly on
        the CPU. fp8: None (the checkpoint's dtype on the GPU, fp32 on the CPU), "row", "tensor" or
        "static" (then `calibration` prompts, text or ids, set the scales)."""
        import torch

        from . import checkpoint_folder, load_reference
        from .backends.fast import FastDenoiser

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = "bfloat16" if fp8 else (None if device == "cuda" else "float32")
        den = FastDenoiser(load_reference(source, dtype=dtype, device=device), max_len, fp8=fp8)
        folder = checkpoint_folder(source)
        tok = None
        if folder is not None and (folder / "tokenizer.json").is_file():
            from .model.tokenizer import load_tokenizer

            tok = load_tokenizer(folder)
        session = cls(den, tok)
        if fp8 == "static":
            if not calibration:
                raise InvalidArgument("fp8='static' needs calibration prompts to set its scales")
            den.calibrate([session.encode(p) for p in calibration])
        return session

    @property
    def config(self):
        return self.denoiser.config

    def encode(self, prompt: Prompt, chat: bool = True) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidArgument("this engine has no tokenizer: pass token ids")
            from .model.tokenizer import encode_prompt

            return encode_prompt(self.tokenizer, prompt, chat=chat)
        return [int(t) for t in prompt]

    def decode(self, ids: Sequence[int]) -> str | None:
        if self.tokenizer is None:
            return None
        from .model.tokenizer import decode

        return decode(self.tokenizer, ids)

    def generate(self, prompts: Prompt | Sequence[Prompt], *, mode: str = "dlm", max_new_tokens: int = 64,
                 chat: bool = True, on_tokens=None, trace: bool = False, policy: DecodePolicy | None = None,
                 **knobs) -> Result:
        """Generate for one prompt or a batch (text or token ids). The decoding policy: `policy`, or `mode`
        and its knobs (block_length, threshold, steps, temperature, seed: decoding/policy.py).
        on_tokens(row, ids) streams tokens; trace keeps every pass (host passes only)."""
        policy = DecodePolicy.of(policy or mode, knobs)
        batch = [prompts] if isinstance(prompts, str) or _is_ids(prompts) else list(prompts)
        ids = [self.encode(p, chat) for p in batch]
        with self._lock:
            if self._closed:
                raise NemodiffError("session is closed")
            g = loops.generate(self.denoiser, ids, policy, max_new_tokens=max_new_tokens, trace=trace,
                               on_tokens=on_tokens)
        return Result([Completion(t, self.decode(t), f) for t, f in zip(g.tokens, g.finish)], g)

    def stream(self, prompt: Prompt, **kw) -> Iterator[str | list[int]]:
        """Yield text pieces (token-id lists without a tokenizer) as blocks are committed."""
        pieces: queue.Queue = queue.Queue()
        done = object()
        seen: list[int] = []

        def on_tokens(row: int, new: list[int]) -> None:
            pieces.put(new)

        def run() -> None:
            try:
                self.generate(prompt, on_tokens=on_tokens, **kw)
            except BaseException as e:  # re-raised in the consumer
                pieces.put(e)
            finally:
                pieces.put(done)

        threading.Thread(target=run, daemon=True).start()
        text = ""
        while (item := pieces.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            seen.extend(item)
            if self.tokenizer is None:
                yield item
                continue
            new_text = self.decode(seen)
            if new_text.startswith(text):        # emit the stable suffix only
                yield new_text[len(text):]
                text = new_text
        if self.tokenizer is not None and seen:
            final = self.decode(seen)
            if final != text and final.startswith(text):
                yield final[len(text):]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self.denoiser = None

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_ids(p: Any) -> bool:
    return isinstance(p, Sequence) and not isinstance(p, str) and (len(p) == 0 or isinstance(p[0], int))

