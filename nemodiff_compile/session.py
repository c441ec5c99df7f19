"""`Session`: the small public API a service embeds.

    with Session.open("engines/tiny-fp32-onnxruntime") as s:
        out = s.generate("What is 3 + 4?", mode="dlm", max_new_tokens=64)
        for piece in s.stream("Once upon a time"):
            print(piece, end="")
        out = await s.agenerate("What is 3 + 4?")              # from a coroutine
        async for piece in s.astream("Once upon a time"):
            ...

A session owns one engine (one KV cache) and one scheduler (decoding/scheduler.py): concurrent `generate` /
`stream` calls from threads and `agenerate` / `astream` calls from an event loop are batched on the
engine, each prompt in its own row with its own policy and seed, and get the tokens they would get alone.
A traced generation (`trace=True`) has the engine to itself (whole-batch `loops.generate`).

Instruct checkpoints: `generate(..., enable_thinking=True, max_thinking_tokens=N)` renders the chat
template's thinking switch and forces `</think>` after N generated tokens; None takes the
checkpoint's generation_config.json defaults (thinking off when it has none); every call takes them
(each row forces its own tag: decoding/rows.py).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Sequence

from .errors import InvalidArgument, NemodiffError
from .decoding import loops
from .decoding.arguments import check_token_ids
from .decoding.policy import DecodePolicy, check_bounds
from .decoding.scheduler import Request, Scheduler

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
    def __init__(self, denoiser: loops.Denoiser, tokenizer: Any = None, manifest: Any = None, *,
                 defaults: Any = None, max_batch: int | None = None, max_queue: int = 1024, observer: Any = None,
                 image_prefill: str = "causal"):
        """defaults: generation_config.json's (thinking); max_batch: rows decoded at once (default: the
        engine's largest batch bucket); max_queue: prompts waiting for a row before submitting raises
        QueueFull; observer: the scheduler's metrics hook; image_prefill: how a vision-language prompt's
        image span is prefilled, "causal" (as the text; an unverified assumption) or "bidirectional"
        (decoding/embeds.py)."""
        from .model.generation_config import GenerationDefaults

        self.denoiser, self.tokenizer, self.manifest = denoiser, tokenizer, manifest
        self.image_prefill = image_prefill
        self._prompter = None
        self.defaults = defaults or GenerationDefaults()
        if max_batch is None and manifest is not None and manifest.buckets.get("batch_sizes"):
            max_batch = max(manifest.buckets["batch_sizes"])
        self.scheduler = Scheduler(denoiser, max_batch=max_batch, max_queue=max_queue, observer=observer)
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def open(cls, engine_dir: str | Path, *, providers: list[str] | None = None,
             threads: int | None = None, max_len: int | None = None, verify: str = "size", **kw) -> "Session":
        """Open a built engine directory (checks its manifest first). verify: "size" (default: every
        artifact's size, a stat per file) or "sha256" (also re-hash every byte: seconds per GB, see the
        README). A directory a build swaps while it is opened is opened again (never a mix of two builds).
        kw: max_batch, max_queue, observer."""
        from .backends.open import open_engine
        from .model.generation_config import GenerationDefaults

        engine = open_engine(engine_dir, providers=providers, threads=threads, max_len=max_len, verify=verify)
        return cls(engine.denoiser, engine.tokenizer, engine.manifest,
                   defaults=GenerationDefaults.read(engine_dir), **kw)

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
        from .model.generation_config import GenerationDefaults

        session = cls(den, tok, defaults=GenerationDefaults.read(folder))
        if fp8 == "static":
            if not calibration:
                raise InvalidArgument("fp8='static' needs calibration prompts to set its scales")
            den.calibrate([session.encode(p) for p in calibration])
        return session

    @property
    def config(self):
        self._check_open()
        return self.denoiser.config

    def encode(self, prompt: Prompt, chat: bool = True, **template_kwargs) -> list[int]:
        """Token ids of a prompt; template_kwargs (e.g. enable_thinking) go to the chat template."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidArgument("this engine has no tokenizer: pass token ids")
            from .model.tokenizer import encode_prompt

            return encode_prompt(self.tokenizer, prompt, chat=chat, **template_kwargs)
        return check_token_ids(prompt, self.config.vocab_size, "prompt")

    def decode(self, ids: Sequence[int]) -> str | None:
        if self.tokenizer is None:
            return None
        from .model.tokenizer import decode

        return decode(self.tokenizer, ids)

    def submit(self, prompt: Prompt, *, mode: str = "dlm", max_new_tokens: int = 64, chat: bool = True,
               policy: DecodePolicy | None = None, on_tokens=None, enable_thinking: bool | None = None,
               max_thinking_tokens: int | None = None, **knobs) -> Request:
        """Queue one prompt on the engine; on_tokens(ids) is called (on the scheduler's thread) as tokens
        commit. The `Request` gives `result()` (its `Generation`) and `cancel()`. Raises QueueFull when the
        queue is full. images (vision-language models): the prompt's images, as in `generate`."""
        self._check_open()
        check_bounds(max_new_tokens=max_new_tokens)
        images = knobs.pop("images", None)
        policy = DecodePolicy.of(policy or mode, knobs)
        template_kwargs, budget = self.thinking(enable_thinking, max_thinking_tokens)
        if images is not None:
            (ids,), (feats,) = self._with_images(prompt, images, chat, template_kwargs)
        else:
            ids, feats = self.encode(prompt, chat, **template_kwargs), None
        return self.scheduler.submit(ids, policy, max_new_tokens, on_tokens=on_tokens, thinking=budget, images=feats)

    def thinking(self, enable_thinking: bool | None = None, max_thinking_tokens: int | None = None):
        """(chat-template kwargs, thinking budget or None) of a request: model/generation_config.py."""
        from .model.generation_config import thinking_setup

        return thinking_setup(self.tokenizer, self.defaults, enable_thinking, max_thinking_tokens)

    # ---- images (vision-language checkpoints) -----------------------------------------------------------

    def image_prompter(self):
        """The model's `ImagePrompter` (model/image_prompt.py); InvalidArgument for a text-only model/engine."""
        if self._prompter is None:
            encode = getattr(self.denoiser, "encode_image", None)
            if encode is None or not getattr(self.denoiser, "accepts_embeds", False) or not self.config.is_vlm:
                raise InvalidArgument("images: this model takes no images (expected a vision-language checkpoint, "
                                      "or an engine built from one)")
            from .model.image_prompt import ImagePrompter
            from .model.vision_config import ImageTokenIds, VisionConfig

            self._prompter = ImagePrompter(VisionConfig.of(self.config), ImageTokenIds.of(self.config, self.tokenizer),
                                           encode, image_prefill=self.image_prefill)
        return self._prompter

    def prepare(self, prompt: Prompt, images: Sequence[Any], chat: bool = True, **template_kwargs):
        """(token ids, PromptImages) of a prompt with images (paths, bytes, PIL images or preprocessed pixels
        [3, H, W]): text gets one <|image_start|> per image in front unless it has them; token ids must hold
        one image start token per image. Bad images: InvalidArgument naming the file."""
        from .model.image_prompt import image_prompt_text

        prompter = self.image_prompter()
        if isinstance(prompt, str):
            prompt = image_prompt_text(prompt, len(images))
        return prompter.prepare(self.encode(prompt, chat, **template_kwargs), list(images))

    def _with_images(self, prompts, images, chat: bool, template_kwargs: dict):
        """(ids per prompt, PromptImages or None per prompt). images: for one prompt, its list of images;
        for a batch, one list (or None) per prompt; a `PromptImages` (from `prepare`) goes with its prompt's
        expanded token ids as they are."""
        from .decoding.embeds import PromptImages

        batch = _batch(prompts)
        single = isinstance(prompts, str) or _is_ids(prompts)
        per = [images] if single else list(images)
        if len(per) != len(batch):
            raise InvalidArgument(f"images: {len(per)} image lists for {len(batch)} prompts (expected one per prompt)")
        ids, imgs = [], []
        for p, ims in zip(batch, per):
            if isinstance(ims, PromptImages):
                ids.append(self.encode(p, chat, **template_kwargs))
                imgs.append(ims)
            elif ims:
                i, pi = self.prepare(p, ims, chat, **template_kwargs)
                ids.append(i)
                imgs.append(pi)
            else:
                ids.append(self.encode(p, chat, **template_kwargs))
                imgs.append(None)
        return ids, imgs

    def generate(self, prompts: Prompt | Sequence[Prompt], *, mode: str = "dlm", max_new_tokens: int = 64,
                 chat: bool = True, on_tokens=None, trace: bool = False, policy: DecodePolicy | None = None,
                 enable_thinking: bool | None = None, max_thinking_tokens: int | None = None,
                 images: Sequence[Any] | None = None, **knobs) -> Result:
        """Generate for one prompt or a batch (text or token ids). The decoding policy: `policy`, or `mode`
        and its knobs (block_length, threshold, steps, temperature, seed: decoding/policy.py); prompt i of a
        batch samples with seed + i. on_tokens(row, ids) streams tokens; trace keeps every pass (host passes
        only; the engine runs the batch alone, in lock-step). enable_thinking: the chat template's thinking
        switch; max_thinking_tokens: the thinking budget (needs thinking on); None: generation_config.json's
        defaults. images (vision-language models): for one prompt, its images (paths, bytes, PIL images); for a
        batch, one list per prompt (None for none)."""
        self._check_open()
        check_bounds(max_new_tokens=max_new_tokens)
        if trace:
            policy = DecodePolicy.of(policy or mode, knobs)
            template_kwargs, budget = self.thinking(enable_thinking, max_thinking_tokens)
            if images is not None:
                ids, imgs = self._with_images(prompts, images, chat, template_kwargs)
            else:
                ids, imgs = [self.encode(p, chat, **template_kwargs) for p in _batch(prompts)], None
            with self.scheduler.exclusive() as den:
                g = loops.generate(den, ids, policy, max_new_tokens=max_new_tokens, trace=trace,
                                   on_tokens=on_tokens, thinking=budget,
                                   images=imgs if imgs and any(i is not None for i in imgs) else None)
            return self._result(g)
        reqs = self._submit_all(prompts, mode=mode, max_new_tokens=max_new_tokens, chat=chat, on_tokens=on_tokens,
                                policy=policy, enable_thinking=enable_thinking,
                                max_thinking_tokens=max_thinking_tokens, images=images, **knobs)
        try:
            gens = [r.result() for r in reqs]
        except BaseException:
            for r in reqs:
                r.cancel()
            raise
        return self._result(merge(reqs, gens))

    async def agenerate(self, prompts: Prompt | Sequence[Prompt], **kw) -> Result:
        """`generate` from a coroutine (same arguments): the scheduler's thread decodes, the event loop waits.
        Cancelling the coroutine cancels its rows."""
        if kw.get("trace"):
            return await asyncio.to_thread(self.generate, prompts, **kw)
        reqs = self._submit_all(prompts, **kw)
        try:
            gens = [await _wait(r) for r in reqs]
        except BaseException:
            for r in reqs:
                r.cancel()
            raise
        return self._result(merge(reqs, gens))

    def _submit_all(self, prompts, *, mode: str = "dlm", max_new_tokens: int = 64, chat: bool = True,
                    on_tokens=None, policy: DecodePolicy | None = None, enable_thinking: bool | None = None,
                    max_thinking_tokens: int | None = None, images=None, **knobs) -> list[Request]:
        self._check_open()
        check_bounds(max_new_tokens=max_new_tokens)
        policy = DecodePolicy.of(policy or mode, knobs)
        template_kwargs, budget = self.thinking(enable_thinking, max_thinking_tokens)
        if images is not None:
            ids, feats = self._with_images(prompts, images, chat, template_kwargs)
        else:
            ids = [self.encode(p, chat, **template_kwargs) for p in _batch(prompts)]
            feats = [None] * len(ids)
        reqs: list[Request] = []
        try:
            for i, (p, f) in enumerate(zip(ids, feats)):
                stream = None if on_tokens is None else (lambda new, i=i: on_tokens(i, new))
                reqs.append(self.scheduler.submit(p, replace(policy, seed=policy.seed + i), max_new_tokens,
                                                  on_tokens=stream, thinking=budget, images=f))
        except BaseException:
            for r in reqs:
                r.cancel()
            raise
        return reqs

    def _result(self, g: loops.Generation) -> Result:
        return Result([Completion(t, self.decode(t), f) for t, f in zip(g.tokens, g.finish)], g)

    def stream(self, prompt: Prompt, **kw) -> Iterator[str | list[int]]:
        """Yield text pieces (token-id lists without a tokenizer) as blocks are committed. Closing the
        iterator early cancels the request."""
        pieces: queue.Queue = queue.Queue()
        req = self.submit(prompt, on_tokens=pieces.put, **kw)
        req.add_done_callback(lambda r: pieces.put(_DONE))
        text = TextStream(self)
        try:
            while (item := pieces.get()) is not _DONE:
                if (piece := text.feed(item)) is not None:
                    yield piece
            req.result()                                  # raises the request's error, if any
            if (piece := text.finish()) is not None:
                yield piece
        finally:
            req.cancel()

    async def astream(self, prompt: Prompt, **kw) -> AsyncIterator[str | list[int]]:
        """`stream` for an event loop: `async for piece in session.astream(...)`. Leaving the loop early (or
        cancelling the task) cancels the request."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        put = lambda item: loop.call_soon_threadsafe(pieces.put_nowait, item)   # noqa: E731
        req = self.submit(prompt, on_tokens=put, **kw)
        req.add_done_callback(lambda r: put(_DONE))
        text = TextStream(self)
        try:
            while (item := await pieces.get()) is not _DONE:
                if (piece := text.feed(item)) is not None:
                    yield piece
            req.result()
            if (piece := text.finish()) is not None:
                yield piece
        finally:
            req.cancel()

    def close(self, drain: bool = True) -> None:
        """Stop taking prompts; drain=True lets the running and queued ones finish first."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.scheduler.close(drain=drain)

    def __del__(self):                      # an unclosed session's scheduler thread stops with it
        if not getattr(self, "_closed", True) and getattr(self, "scheduler", None) is not None:
            self.scheduler.close(drain=False, timeout=0)

    def _check_open(self) -> None:
        if self._closed:
            raise NemodiffError("session is closed")

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TextStream:
    """Incremental detokenization: feed committed ids, get the new text (None while there is none); without a
    tokenizer, the ids themselves.

    A feed decodes a short window, never everything so far (an AR stream of n tokens would cost O(n^2)):
    the ids from `prefix` on against the ids from `prefix` to `read` (what the last piece covered), as vLLM's
    incremental detokenizer does. Decoding both from the same start keeps tokenizers that drop a leading space
    (SentencePiece's Metaspace) consistent, and a window that ends inside a UTF-8 character (U+FFFD) waits for
    the next ids. `finish` decodes everything once and returns what the pieces have not covered, so pieces +
    finish add up to `session.decode(ids)` (the non-streamed text)."""

    def __init__(self, session: Session):
        self.session, self.ids, self.text = session, [], ""
        self._prefix = self._read = 0                # ids[prefix:read]: the window the last piece ended

    def feed(self, new: list[int]) -> str | list[int] | None:
        self.ids.extend(new)
        if self.session.tokenizer is None:
            return list(new)
        head = self.session.decode(self.ids[self._prefix : self._read])
        window = self.session.decode(self.ids[self._prefix :])
        if len(window) <= len(head) or not window.startswith(head) or window.endswith("\ufffd"):
            return None                              # nothing new yet, or a character still incomplete
        piece = window[len(head) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += piece
        return piece

    def finish(self) -> str | None:
        if self.session.tokenizer is None or not self.ids:
            return None
        text = self.session.decode(self.ids)
        if text != self.text and text.startswith(self.text):
            piece, self.text = text[len(self.text):], text
            return piece
        return None


def merge(reqs: list[Request], gens: list[loops.Generation]) -> loops.Generation:
    """One `Generation` for rows decoded by the scheduler: each row's tokens and passes; nfe counts the engine
    passes any of them took part in (as the whole-batch loops count a batch)."""
    passes = {p for r in reqs for p in r.passes}
    by_phase: dict[str, int] = {}
    for _, phase in passes:
        by_phase[phase] = by_phase.get(phase, 0) + 1
    return loops.Generation([t for g in gens for t in g.tokens], [f for g in gens for f in g.finish],
                            len(passes), by_phase, [n for g in gens for n in g.row_nfe],
                            device_passes=max((g.device_passes for g in gens), default=0))


_DONE = object()


async def _wait(req: Request) -> loops.Generation:
    """Await a request from an event loop (its done callback runs on the scheduler's thread)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    req.add_done_callback(lambda r: loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None)))
    try:
        await done
    except asyncio.CancelledError:
        req.cancel()
        raise
    return req.result()


def _batch(prompts) -> list:
    return [prompts] if isinstance(prompts, str) or _is_ids(prompts) else list(prompts)


def _is_ids(p: Any) -> bool:
    return isinstance(p, Sequence) and not isinstance(p, str) and (len(p) == 0 or isinstance(p[0], int))

