"""serve.server._EventStream, the server-sent-events response, against a hand-driven ASGI receive / send (no server):
the last events close the body in their own write, a generator that just ends gets the closing chunk, and a client
that goes away mid-stream ends it quietly with the events' generator closed (which cancels its request)."""

import asyncio

import pytest

pytest.importorskip("fastapi")

from nemodiff_compile.serve.server import _EventStream  # noqa: E402


def _never():
    async def receive():
        await asyncio.Event().wait()
    return receive


def _run(stream, receive):
    sent = []

    async def send(message):
        sent.append(message)

    asyncio.run(stream({"type": "http"}, receive, send))
    return sent


def test_the_last_events_end_the_body_in_one_write():
    ran = []

    async def events():
        yield b"data: 1\n\n", True
        yield b"data: 2\n\ndata: [DONE]\n\n", False
        ran.append("after the last")                  # the server's generator counts the request "ok" here

    sent = _run(_EventStream(events()), _never())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in sent[0]["headers"]
    assert sent[1:] == [{"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True},
                        {"type": "http.response.body", "body": b"data: 2\n\ndata: [DONE]\n\n", "more_body": False}]
    assert ran == ["after the last"]


def test_a_generator_that_just_ends_gets_the_closing_chunk():
    async def events():
        yield b"data: 1\n\n", True

    sent = _run(_EventStream(events()), _never())
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False} and len(sent) == 3


def test_a_client_going_away_ends_the_stream_quietly():
    closed, gone = [], asyncio.Event()

    async def events():
        try:
            yield b"data: 1\n\n", True
            await asyncio.sleep(3600)                 # waiting for the next block
            yield b"data: 2\n\n", False
        finally:
            closed.append(True)                       # (the server's generator cancels its request here)

    async def receive():
        await gone.wait()
        return {"type": "http.disconnect"}

    sent = []

    async def send(message):
        sent.append(message)

    async def main():
        task = asyncio.ensure_future(_EventStream(events())({"type": "http"}, receive, send))
        await asyncio.sleep(0.05)
        gone.set()
        await asyncio.wait_for(task, 5)               # returns: no CancelledError out of the app
        assert not task.cancelled() and task.exception() is None
        if hasattr(task, "cancelling"):
            assert task.cancelling() == 0             # the handled cancellation is not left pending

    asyncio.run(main())
    assert closed == [True] and [m.get("more_body") for m in sent[1:]] == [True]
