"""Where a streamed request's latency at concurrency 1 goes, beside `Session.generate`: one JSON line.

    python scripts/c1_latency.py engines/tiny-fp32-onnxruntime --requests 48

Starts `nemodiff-compile serve` on the engine (as scripts/load_test.py --engine does) and opens the same engine
in this process; then, prompt after prompt, one streamed completion with the async openai client and the same
prompt through this process's `Session.generate`, 0.1 s apart (ONNX Runtime's workers spin for a while after a
run). Around each HTTP request the server's /metrics give its scheduler time (`nemodiff_request_seconds`:
submission to finish). Medians, in milliseconds:

  client_ms      the client's latency (create() to the end of the stream; what load_test.py reports)
  scheduler_ms   the server's submission-to-finish: the passes, as `Session.generate` runs them, plus whatever
                 the HTTP path's CPU takes from the engine's threads while they run
  http_ms        client_ms - scheduler_ms per request: the client building the request and parsing the events,
                 the round trip, the server's handler before submission and its event loop after the finish
  session_ms     `Session.generate` on the same prompt
and the ratios client / session (load_test.py --baseline's figure) and scheduler / session.

`--client raw` reads each stream's bytes over one kept-alive connection without parsing them (stdlib asyncio):
the same server work, without the openai client's own CPU per event, which on a machine shared with the server
runs while the engine computes the next block.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load_test  # noqa: E402

SETTLE_S = 0.1


class RawClient:
    """Streamed completions as bytes over one kept-alive HTTP/1.1 connection, never parsed: `one` returns what
    load_test.one does for the fields this script reads (latency, error)."""

    def __init__(self, url: str):
        u = urllib.parse.urlsplit(url)
        self.host, self.port, self.path = u.hostname, u.port, u.path.rstrip("/") + "/completions"
        self.reader = self.writer = None

    async def one(self, model: str, prompt: str, max_tokens: int, knobs: dict) -> dict:
        body = json.dumps(dict(model=model, prompt=prompt, max_tokens=max_tokens, stream=True,   # as load_test.one
                               stream_options={"include_usage": True}, **knobs)).encode()
        t0 = time.perf_counter()
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(f"POST {self.path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0].decode()
        if " 200 " not in status or b"chunked" not in head.lower():
            return dict(latency=time.perf_counter() - t0, error=status)
        tail = b""
        while not tail.endswith(b"\r\n0\r\n\r\n"):              # the chunked body's last chunk
            data = await self.reader.read(1 << 16)
            if not data:
                return dict(latency=time.perf_counter() - t0, error="the server closed the connection")
            tail = (tail + data)[-16:]
        return dict(latency=time.perf_counter() - t0, error=None)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def scheduler_seconds(metrics_url: str) -> tuple[float, float]:
    """(sum, count) of the server's nemodiff_request_seconds histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    fam = next(f for f in text_string_to_metric_families(text) if f.name == "nemodiff_request_seconds")
    values = {s.name: s.value for s in fam.samples}
    return values["nemodiff_request_seconds_sum"], values["nemodiff_request_seconds_count"]


async def run(args) -> dict:
    from nemodiff_compile.serve.server import host_threads
    from nemodiff_compile.session import Session

    prompts = load_test.read_prompts(args.prompts)
    knobs = {"mode": args.mode}
    server, url = load_test.start_server(args.engine, args.threads, None)
    metrics_url = url.removesuffix("/v1") + "/metrics"
    host_threads()                                                    # as the server does
    session = raw = None
    try:
        session = Session.open(args.engine, threads=args.threads)
        client, model = await load_test.connect(url)
        raw = RawClient(url) if args.client == "raw" else None
        one = raw.one if raw is not None else lambda *a: load_test.one(client, *a)
        for p in prompts[:4]:                                         # warm-up, both sides
            await one(model, p, args.max_tokens, knobs)
            session.generate(p, chat=False, max_new_tokens=args.max_tokens, **knobs)
        rows = []
        for i in range(args.requests):
            p = prompts[i % len(prompts)]
            s0, n0 = scheduler_seconds(metrics_url)
            r = await one(model, p, args.max_tokens, knobs)
            if r["error"] is not None:
                raise SystemExit(f"request {i} failed: {r['error']}")
            s1, n1 = scheduler_seconds(metrics_url)
            deadline = time.monotonic() + 2      # the scheduler records a request just after it signals the end
            while n1 == n0 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
                s1, n1 = scheduler_seconds(metrics_url)
            if n1 != n0 + 1:
                raise SystemExit(f"the server recorded {n1 - n0} requests during one: is another client using it?")
            await asyncio.sleep(SETTLE_S)
            t0 = time.perf_counter()
            session.generate(p, chat=False, max_new_tokens=args.max_tokens, **knobs)
            rows.append(dict(client=r["latency"], scheduler=s1 - s0, http=r["latency"] - (s1 - s0),
                             session=time.perf_counter() - t0))
            await asyncio.sleep(SETTLE_S)
    finally:
        if raw is not None:
            raw.close()
        if session is not None:
            session.close()
        server.terminate()
        server.wait(60)
    med = {k: load_test.q([r[k] for r in rows], 0.5) for k in ("client", "scheduler", "http", "session")}
    return dict(mode=args.mode, client=args.client, requests=len(rows), max_tokens=args.max_tokens,
                **{f"{k}_ms": round(v * 1e3, 2) for k, v in med.items()},
                client_over_session=round(med["client"] / med["session"], 3),
                scheduler_over_session=round(med["scheduler"] / med["session"], 3))


def main() -> int:
    args = load_test.one_at_a_time_args(__doc__, requests=48, more=lambda ap: ap.add_argument(
        "--client", choices=("openai", "raw"), default="openai",
        help="openai: the async openai client, as load_test.py; raw: the stream's bytes, unparsed"))
    print(json.dumps(asyncio.run(run(args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
