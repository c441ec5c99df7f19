"""The OpenAI-compatible HTTP server: FastAPI routes over one `Session` (one engine, one scheduler), run by
uvicorn (the `serve` extra). `nemodiff-compile serve ENGINE_DIR [--host 127.0.0.1] [--port 8000]`.

  POST /v1/completions, POST /v1/chat/completions   (serve/protocol.py; stream: true = server-sent events,
                                                     one chunk per committed block, then data: [DONE])
  GET  /v1/models, /health, /metrics                (Prometheus text: serve/metrics.py)

Errors are OpenAI error objects: a bad request (a field, a decoding knob, a prompt that does not fit the
engine) is HTTP 400; a model name other than the served one 404; a full queue, or a server shutting down,
503 with Retry-After. A client that goes away (a closed stream or connection) cancels its requests, which
frees their rows. On SIGTERM uvicorn stops accepting connections and waits for the open ones; then the
session drains (every running and queued request finishes) and the process exits.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from ..decoding.scheduler import QueueFull, Request, SchedulerClosed
from ..errors import NemodiffError
from ..session import Session, TextStream, merge
from . import protocol
from .metrics import Metrics

RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.25


class _HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, protocol.error(message, kind, param, code)


def create_app(session: Session, *, model_name: str, metrics: Metrics | None = None,
               replica: str | None = None, close_session: bool = True,
               image_dirs: list[Path] | None = None) -> FastAPI:
    """The app over `session` (its scheduler reports to `metrics`); replica: sent back as the
    x-nemodiff-replica header (Ray Serve replicas); close_session: drain and close it at shutdown;
    image_dirs: where chat image parts may name local files (serve/images.py)."""
    image_dirs = [Path(d) for d in image_dirs or ()]
    metrics = metrics or Metrics()
    if session.scheduler.observer is None:
        session.scheduler.observer = metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if close_session:
            await asyncio.to_thread(session.close, True)          # drain what is still running or queued

    app = FastAPI(title="nemodiff-compile", lifespan=lifespan)

    if replica is not None:
        app.add_middleware(_ReplicaHeader, replica=replica)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: HttpRequest, exc: RequestValidationError):
        message, field = protocol.validation_message(exc.errors())
        metrics.request(request.url.path, "bad_request")
        return JSONResponse(protocol.error(message, param=field), status_code=400)

    @app.exception_handler(_HttpError)
    async def http_error(request: HttpRequest, exc: _HttpError):
        headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status == 503 else None
        status = {400: "bad_request", 404: "bad_request", 503: "overloaded"}.get(exc.status, "error")
        metrics.request(request.url.path, status)
        return JSONResponse(exc.body, status_code=exc.status, headers=headers)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, **session.scheduler.stats()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "nemodiff-compile"}]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.post("/v1/completions")
    async def completions(body: protocol.CompletionRequest, request: HttpRequest):
        _checked(lambda: session.thinking(body.enable_thinking, body.max_thinking_tokens))
        prompts = [_encode_completion(session, p) for p in body.prompts()]
        return await _serve(request, body, prompts, "completion")

    @app.post("/v1/chat/completions")
    async def chat(body: protocol.ChatRequest, request: HttpRequest):
        template_kwargs, _ = _checked(lambda: session.thinking(body.enable_thinking, body.max_thinking_tokens))
        ids = _encode_chat(session, body.conversation(), template_kwargs)
        if not body.images():
            return await _serve(request, body, [ids], "chat")
        # image parts: resolved and decoded here (HTTP 400 when bad), their features made before queueing
        from .images import open_image

        prompter = _checked(session.image_prompter)             # a text-only engine: 400 before any decoding
        def prepare():                                            # decoding + the vision encoder: off the loop
            images = [_checked(lambda w=w, u=u: open_image(u, image_dirs, w)) for w, u in body.images()]
            return _checked(lambda: prompter.prepare(ids, images))

        ids, feats = await asyncio.to_thread(prepare)
        return await _serve(request, body, [ids], "chat", [feats])

    async def _serve(request: HttpRequest, body: protocol._Common, prompts: list[list[int]], kind: str,
                     images: list | None = None):
        images = images or [None] * len(prompts)
        endpoint = request.url.path
        if body.model is not None and body.model != model_name:
            raise _HttpError(404, f"The model '{body.model}' does not exist (this server serves '{model_name}')",
                             "invalid_request_error", "model", "model_not_found")
        if body.stream and len(prompts) != 1:
            raise _HttpError(400, "prompt: stream one prompt per request", "invalid_request_error", "prompt")
        policy = _checked(body.policy)
        loop = asyncio.get_running_loop()
        rid = protocol.new_id("chatcmpl" if kind == "chat" else "cmpl")
        if body.stream:
            items: asyncio.Queue = asyncio.Queue()
            put = _threadsafe(loop, items.put_nowait)
            req = _submit(session, prompts[0], policy, body, put, images[0])
            req.add_done_callback(lambda r: put(_DONE))
            return _EventStream(_events(session, req, items, rid, model_name, kind, body.include_usage,
                                        metrics, endpoint))
        reqs: list[Request] = []
        try:
            for ids, feats in zip(prompts, images):
                reqs.append(_submit(session, ids, policy, body, None, feats))
            if not await _wait_all(request, reqs):
                metrics.request(endpoint, "cancelled")
                return Response(status_code=499)                   # nobody is listening
            gens = [r.result() for r in reqs]
        except BaseException:
            for r in reqs:
                r.cancel()
            raise
        g = merge(reqs, gens)
        use = protocol.usage(sum(map(len, prompts)), sum(len(t) for t in g.tokens), g.nfe, g.tokens_per_forward)
        texts = [_text(session, t) for t in g.tokens]
        metrics.request(endpoint, "ok")
        if kind == "chat":
            return protocol.chat_completion(rid, model_name, texts[0], g.finish[0], use)
        return protocol.completion(rid, model_name, texts, g.finish, use)

    return app


class _ReplicaHeader:
    """Pure ASGI middleware adding x-nemodiff-replica to every response (Starlette's BaseHTTPMiddleware would
    re-stream each server-sent event through a task and memory channel of its own)."""

    def __init__(self, app, replica: str):
        self.app, self.header = app, (b"x-nemodiff-replica", replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self.header]}
            await send(message)

        await self.app(scope, receive, tagged)


def _checked(make):
    try:
        return make()
    except NemodiffError as e:
        raise _HttpError(400, str(e), "invalid_request_error") from None


def _submit(session: Session, ids: list[int], policy, body: protocol._Common, on_tokens, images=None) -> Request:
    try:
        return session.submit(ids, policy=policy, max_new_tokens=body.new_tokens(), on_tokens=on_tokens,
                              enable_thinking=body.enable_thinking, max_thinking_tokens=body.max_thinking_tokens,
                              images=images)
    except QueueFull as e:
        raise _HttpError(503, f"the server is overloaded ({e}): retry later", "server_overloaded") from None
    except SchedulerClosed as e:
        raise _HttpError(503, f"the server is shutting down ({e})", "server_overloaded") from None
    except NemodiffError as e:
        raise _HttpError(400, str(e), "invalid_request_error", "prompt") from None


def _encode_completion(session: Session, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        if session.tokenizer is None:
            raise _HttpError(400, "prompt: this engine has no tokenizer, send token ids", "invalid_request_error",
                             "prompt")
        return session.encode(prompt, chat=False)
    return list(prompt)


def _encode_chat(session: Session, conversation: list[dict[str, str]], template_kwargs: dict[str, Any]) -> list[int]:
    tok = session.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise _HttpError(400, "messages: this engine's tokenizer has no chat template; use /v1/completions",
                         "invalid_request_error", "messages")
    rendered = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True, **template_kwargs)
    return list(tok.encode(rendered, add_special_tokens=False))     # the template writes BOS itself


def _text(session: Session, ids: list[int]) -> str:
    text = session.decode(ids)
    return text if text is not None else " ".join(map(str, ids))


def _threadsafe(loop: asyncio.AbstractEventLoop, fn):
    """fn for another thread: scheduled on the loop (dropped once the loop is closed)."""
    def call(*args):
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:          # the event loop is gone (shutdown): nobody is listening
            pass
    return call


async def _wait_all(request: HttpRequest, reqs: list[Request]) -> bool:
    """Wait for the requests; False (and cancelled) if the client disconnects first."""
    loop = asyncio.get_running_loop()
    done = [loop.create_future() for _ in reqs]
    for r, f in zip(reqs, done):
        r.add_done_callback(_threadsafe(loop, lambda _r, f=f: f.done() or f.set_result(None)))
    pending = set(done)
    while pending:
        _, pending = await asyncio.wait(pending, timeout=DISCONNECT_POLL_S)
        if pending and await request.is_disconnected():
            for r in reqs:
                r.cancel()
            return False
    return True


_DONE = object()


class _EventStream(Response):
    """A text/event-stream response from an async iterator of (bytes, more) pairs, more=False on the last. Unlike
    Starlette's StreamingResponse it runs no task group per response (one task watches for the client going away
    and cancels the stream, which cancels its request), and the last events end the body in the same write
    (StreamingResponse sends an empty closing chunk after them: a second write, and a second wake-up of the
    client at the end of every request)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[tuple[bytes, bool]]):
        self.events, self.status_code, self.background = events, 200, None
        self.init_headers({"Cache-Control": "no-cache"})

    async def __call__(self, scope, receive, send) -> None:
        task, gone = asyncio.current_task(), False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            task.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            ended = False
            async for chunk, more in self.events:      # to its end: what follows the last yield runs too
                await send({"type": "http.response.body", "body": chunk, "more_body": more})
                ended = not more
            if not ended:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone:
                raise
            if hasattr(task, "uncancel"):        # Python >= 3.11 counts cancellations; this one is handled
                task.uncancel()                  # (the client went away: the stream ends here, quietly)
        finally:
            watcher.cancel()
            await self.events.aclose()


async def _events(session: Session, req: Request, items: asyncio.Queue, rid: str, model: str, kind: str,
                  include_usage: bool, metrics: Metrics, endpoint: str) -> AsyncIterator[tuple[bytes, bool]]:
    """Server-sent events, as (bytes, more) for `_EventStream`: a chunk per committed block, the finish chunk, usage
    (if asked), [DONE]. The events ready at once go out in one write (the last block, the finish, usage and [DONE]
    usually are): each write wakes the client, and on a small machine its parsing competes with the engine's
    threads. Leaving early (the client went away) cancels the request."""
    def sse(obj: Any) -> bytes:
        return f"data: {json.dumps(obj)}\n\n".encode()

    text = TextStream(session)
    status = "cancelled"
    out = [sse(protocol.chat_chunk(rid, model, {"role": "assistant", "content": ""}))] if kind == "chat" else []
    try:
        done = False
        while not done:
            ready = [await items.get()]
            while not items.empty():
                ready.append(items.get_nowait())
            done = ready[-1] is _DONE                    # put last, after the row's final tokens
            for ids in ready[:-1] if done else ready:
                piece = text.feed(ids)
                if piece:
                    out.append(sse(_chunk(kind, rid, model, _piece(piece))))
            if out and not done:
                yield b"".join(out), True
                out = []
        if req.error is not None:
            status = "error"
            yield b"".join(out) + sse(protocol.error(str(req.error), "server_error")), False
            return
        g = req.row.generation()
        tail = text.finish()
        out.append(sse(_chunk(kind, rid, model, _piece(tail) if tail else "", g.finish[0])))
        if include_usage:
            out.append(sse(protocol.usage_chunk(rid, model, kind, protocol.usage(
                len(req.row.prompt), len(g.tokens[0]), g.nfe, g.tokens_per_forward))))
        yield b"".join(out) + b"data: [DONE]\n\n", False
        status = "ok"
    finally:
        req.cancel()
        metrics.request(endpoint, status)


def _piece(piece: str | list[int]) -> str:
    return piece if isinstance(piece, str) else " ".join(map(str, piece)) + " "


def _chunk(kind: str, rid: str, model: str, text: str, finish: str | None = None) -> dict[str, Any]:
    if kind == "chat":
        return protocol.chat_chunk(rid, model, {"content": text} if text or finish is None else {}, finish)
    return protocol.completion_chunk(rid, model, text, finish)


def host_threads() -> None:
    """One torch thread: an engine directory's passes run in ONNX Runtime's or TensorRT's own threads, torch only
    does the scheduler's small host-side tensor work, and its OpenMP workers would spin against the engine's
    (measured: the tiny ONNX Runtime engine at concurrency 8, 86 -> 200 tokens/s on 2 cores)."""
    import torch

    torch.set_num_threads(1)


def run(engine_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int | None = None,
        max_queue: int = 64, threads: int | None = None, log_level: str = "info",
        image_dirs: list[Path] | None = None) -> None:
    """Open the engine and serve it until SIGINT / SIGTERM, then drain: uvicorn stops accepting and waits for the
    open connections, the session finishes what is queued, and this returns (exit status 0)."""
    import signal

    import uvicorn

    host_threads()
    metrics = Metrics()
    session = Session.open(engine_dir, threads=threads, max_batch=max_batch, max_queue=max_queue, observer=metrics)
    app = create_app(session, model_name=Path(engine_dir).name, metrics=metrics, image_dirs=image_dirs)
    # uvicorn handles the signal while it runs and re-raises it once it has shut down; handled here, the
    # re-raised signal ends nothing, so a drained shutdown exits 0 instead of dying by the signal
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run()
