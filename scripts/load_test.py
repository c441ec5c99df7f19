"""Load test of the OpenAI-compatible server with the async `openai` client: one JSON line per level.

    python scripts/load_test.py --engine engines/tiny-fp32-onnxruntime          # starts `nemodiff-compile serve`
    python scripts/load_test.py --url http://127.0.0.1:8000/v1 --levels 1,2,4,8,16
    python scripts/load_test.py --engine DIR --soak                              # 200 requests, 8 at a time, 20% cancelled

Levels: at each concurrency (default 1, 2, 4, 8, 16), `--requests` streamed completions (default 4 per
concurrent client, at least 16; with `--rounds R` the levels run in turn R times and pool their figures) over the prompts (default docs/prompts/tiny-heldout.txt) with the same decoding
settings; per level: requests, errors, generated tokens (usage), wall seconds, aggregate tokens/s, time to
first block (first streamed text) and latency p50 / p99. With --engine, `--baseline` also times
`Session.generate` in this process on the same prompts, alternating with the concurrency-1 requests (so
both see the same machine; 0.1 s apart, not counted, so that neither runs while the other's ONNX Runtime
workers still spin after a run), and the last line compares: tokens/s at concurrency 8 over 1, and p50 latency
at concurrency 1 over Session.generate's.

Soak (--soak): after a warm-up of 4 x concurrency requests under the same load, `--requests` (200) at
`--concurrency` (8), `--cancel` (0.2) of them abandoned after their first chunk. Checks: every other request finishes (a finish reason and usage), its text equals the greedy
answer for its prompt measured alone before the soak (nothing mixed between rows), the server is still up,
and (with --engine) the server's RSS grew less than 5% from after the warm-up to the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTLE_S = 0.1   # --baseline: the pause between a request and a Session.generate (measured spin tail: ~40 ms)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="base URL of a running server, e.g. http://127.0.0.1:8000/v1")
    where.add_argument("--engine", type=Path, help="engine directory: start `nemodiff-compile serve` on it")
    ap.add_argument("--model", default=None, help="model name [default: the server's first]")
    ap.add_argument("--levels", default="1,2,4,8,16")
    ap.add_argument("--requests", type=int, default=None, help="per level and round [default: max(16, 4 x concurrency)]")
    ap.add_argument("--rounds", type=int, default=1, help="run the levels in turn this many times, figures pooled")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--mode", default="dlm", choices=("ar", "dlm", "linear-spec"))
    ap.add_argument("--prompts", type=Path, default=ROOT / "docs/prompts/tiny-heldout.txt")
    ap.add_argument("--threads", type=int, default=None,
                    help="with --engine: ONNX Runtime intra-op threads of the server and the baseline "
                         "[default: the server's, ONNX Runtime's choice: one per physical core]")
    ap.add_argument("--max-batch", type=int, default=None, help="with --engine: the server's --max-batch")
    ap.add_argument("--baseline", action="store_true", help="with --engine: also time Session.generate (see above)")
    ap.add_argument("--soak", action="store_true")
    ap.add_argument("--concurrency", type=int, default=8, help="--soak: concurrent clients")
    ap.add_argument("--cancel", type=float, default=0.2, help="--soak: fraction of requests abandoned mid-stream")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.baseline and args.engine is None:
        ap.error("--baseline needs --engine (Session.generate runs the same engine in this process)")
    prompts = read_prompts(args.prompts)
    server = None
    try:
        if args.engine is not None:
            server, url = start_server(args.engine, args.threads, args.max_batch)
        else:
            url = args.url.rstrip("/")
        return asyncio.run(soak(url, prompts, args, server) if args.soak else levels(url, prompts, args))
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(60)


# ---- levels ----------------------------------------------------------------------------------------------

async def levels(url: str, prompts: list[str], args) -> int:
    client, model = await connect(url, args.model)
    knobs = {"mode": args.mode}
    session = None
    if args.baseline:
        from nemodiff_compile.serve.server import host_threads
        from nemodiff_compile.session import Session

        host_threads()                                    # as the server does
        session = Session.open(args.engine, threads=args.threads, max_batch=args.max_batch)
        session.generate(prompts[0], chat=False, max_new_tokens=args.max_tokens, **knobs)   # warm-up
    await one(client, model, prompts[0], args.max_tokens, knobs)                         # warm-up
    conc = [int(c) for c in args.levels.split(",")]
    acc = {c: dict(results=[], seconds=0.0) for c in conc}
    base: list[float] = []

    async def level(c: int) -> None:
        n = args.requests or max(16, 4 * c)
        sem, spent = asyncio.Semaphore(c), []

        async def run(p):
            async with sem:
                acc[c]["results"].append(await one(client, model, p, args.max_tokens, knobs))
                if c == 1 and session is not None:               # alternate, never overlap: ONNX Runtime's
                    t_out = time.perf_counter()                  # workers spin for tens of ms after a run, so
                    await asyncio.sleep(SETTLE_S)                # each side waits for the other's to stop
                    t0 = time.perf_counter()
                    await asyncio.to_thread(session.generate, p, chat=False, max_new_tokens=args.max_tokens, **knobs)
                    base.append(time.perf_counter() - t0)
                    await asyncio.sleep(SETTLE_S)
                    spent.append(time.perf_counter() - t_out)    # none of it counts in the level's wall time

        t0 = time.perf_counter()
        await asyncio.gather(*(run(prompts[i % len(prompts)]) for i in range(n)))
        acc[c]["seconds"] += time.perf_counter() - t0 - sum(spent)

    for _ in range(args.rounds):            # the levels in turn, so a drifting machine load hits each alike
        for c in conc:
            await level(c)
    summary = {}
    for c in conc:
        res, wall = acc[c]["results"], acc[c]["seconds"]
        ok = [r for r in res if r["error"] is None]
        tokens = sum(r["tokens"] for r in ok)
        summary[c] = dict(concurrency=c, requests=len(res), errors=len(res) - len(ok), tokens=tokens,
                          seconds=round(wall, 3), tokens_per_s=round(tokens / wall, 1), mode=args.mode,
                          max_tokens=args.max_tokens, rounds=args.rounds,
                          ttfb_p50_s=q([r["ttfb"] for r in ok], 0.5), latency_p50_s=q([r["latency"] for r in ok], 0.5),
                          latency_p99_s=q([r["latency"] for r in ok], 0.99))
        print(json.dumps(summary[c]), flush=True)
    if base:
        summary["session"] = dict(baseline="Session.generate", requests=len(base), latency_p50_s=q(base, 0.5),
                                  latency_p99_s=q(base, 0.99))
        print(json.dumps(summary["session"]), flush=True)
    if 1 in summary and 8 in summary:
        cmp = dict(mode=args.mode, tokens_per_s_c8_over_c1=round(summary[8]["tokens_per_s"] / summary[1]["tokens_per_s"], 2))
        if "session" in summary:
            cmp["p50_latency_c1_over_session"] = round(summary[1]["latency_p50_s"] / summary["session"]["latency_p50_s"], 3)
        print(json.dumps(cmp), flush=True)
    if session is not None:
        session.close()
    return 1 if any(v.get("errors") for v in summary.values()) else 0


async def one(client, model: str, prompt: str, max_tokens: int, knobs: dict, *, cancel: bool = False) -> dict:
    """One streamed completion: its text, tokens (usage), time to first block, latency, error."""
    t0 = time.perf_counter()
    out = dict(prompt=prompt, text="", tokens=0, ttfb=None, latency=None, finish=None, error=None, cancelled=cancel)
    try:
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, stream=True,
                                                 stream_options={"include_usage": True}, extra_body=knobs)
        async for chunk in stream:
            if chunk.choices:
                if chunk.choices[0].text and out["ttfb"] is None:
                    out["ttfb"] = time.perf_counter() - t0
                out["text"] += chunk.choices[0].text
                out["finish"] = chunk.choices[0].finish_reason or out["finish"]
            if chunk.usage is not None:
                out["tokens"] = chunk.usage.completion_tokens
            if cancel and out["ttfb"] is not None:
                await stream.close()                  # the client goes away mid-stream
                break
    except Exception as e:                            # counted, not raised: a load test reports errors
        out["error"] = f"{type(e).__name__}: {e}"
    out["latency"] = time.perf_counter() - t0
    if out["ttfb"] is None:
        out["ttfb"] = out["latency"]
    return out


# ---- soak ------------------------------------------------------------------------------------------------

async def soak(url: str, prompts: list[str], args, server) -> int:
    client, model = await connect(url, args.model)
    knobs = {"mode": args.mode}
    expected = {}
    for p in prompts:                                     # each prompt alone: the answer it must get under load
        r = await one(client, model, p, args.max_tokens, knobs)
        expected[p] = r["text"]
    rng = random.Random(args.seed)
    sem = asyncio.Semaphore(args.concurrency)

    async def run(p, cancel):
        async with sem:
            return await one(client, model, p, args.max_tokens, knobs, cancel=cancel)

    warm = [(prompts[rng.randrange(len(prompts))], rng.random() < args.cancel) for _ in range(4 * args.concurrency)]
    await asyncio.gather(*(run(p, c) for p, c in warm))          # warm-up: the same load, not measured
    rss_start = rss_mb(server.pid) if server is not None else None
    n = args.requests or 200
    plan = [(prompts[rng.randrange(len(prompts))], rng.random() < args.cancel) for _ in range(n)]
    t0 = time.perf_counter()
    results = await asyncio.gather(*(run(p, c) for p, c in plan))
    wall = time.perf_counter() - t0
    kept = [r for r in results if not r["cancelled"]]
    lost = [r for r in kept if r["error"] is not None or r["finish"] is None]
    mixed = [r for r in kept if r["error"] is None and r["text"] != expected[r["prompt"]]]
    cancel_errors = [r for r in results if r["cancelled"] and r["error"] is not None]
    health = json.loads(urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=10).read())
    rss_end = rss_mb(server.pid) if server is not None else None
    growth = None if rss_start is None else (rss_end - rss_start) / rss_start
    line = dict(soak=True, requests=n, concurrency=args.concurrency, cancelled=n - len(kept), completed=len(kept) - len(lost),
                lost=len(lost), mixed=len(mixed), cancel_errors=len(cancel_errors), seconds=round(wall, 2),
                server_up=health.get("status") == "ok", running_after=health.get("running"),
                queued_after=health.get("queued"), rss_after_warmup_mb=rss_start, rss_end_mb=rss_end,
                rss_growth=None if growth is None else round(growth, 4))
    print(json.dumps(line), flush=True)
    for r in (lost + mixed)[:5]:
        print(json.dumps(dict(prompt=r["prompt"], error=r["error"], text=r["text"][:80],
                              expected=expected[r["prompt"]][:80])), file=sys.stderr)
    ok = not lost and not mixed and line["server_up"] and (growth is None or growth < 0.05)
    return 0 if ok else 1


# ---- helpers ---------------------------------------------------------------------------------------------

def read_prompts(path: Path) -> list[str]:
    """The prompts of a file: its non-empty lines, stripped."""
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


async def connect(url: str, model: str | None = None):
    """(the async openai client for url, model: the given one, else the server's first)."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    return client, model or (await client.models.list()).data[0].id


def one_at_a_time_args(doc: str, requests: int, more=None) -> argparse.Namespace:
    """The command line of the scripts that start a server on an engine and send it streamed requests one after
    another (request_cpu.py, c1_latency.py; more(parser) adds a script's own options); a missing engine folder or
    prompts file is a usage error."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if more is not None:
        more(ap)
    ap.add_argument("engine", type=Path)
    ap.add_argument("--requests", type=int, default=requests)
    ap.add_argument("--mode", default="dlm", choices=("ar", "dlm", "linear-spec"))
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None,
                    help="ONNX Runtime threads of the server (and of an in-process session) [default: its own]")
    ap.add_argument("--prompts", type=Path, default=ROOT / "docs/prompts/tiny-heldout.txt")
    args = ap.parse_args()
    if not args.engine.is_dir():
        ap.error(f"{args.engine}: expected an engine directory")
    if not args.prompts.is_file():
        ap.error(f"--prompts {args.prompts}: no such file")
    return args


def start_server(engine: Path, threads: int | None, max_batch: int | None):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    cmd = [sys.executable, "-m", "nemodiff_compile", "serve", str(engine), "--port", str(port)]
    cmd += (["--threads", str(threads)] if threads else []) + (["--max-batch", str(max_batch)] if max_batch else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return proc, url + "/v1"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: {' '.join(cmd)}")
            time.sleep(0.2)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def q(xs: list[float], p: float) -> float | None:
    """Quantile by linear interpolation between closest ranks (numpy's default)."""
    if not xs:
        return None
    s = sorted(xs)
    pos = (len(s) - 1) * p
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return round(s[lo] + (s[hi] - s[lo]) * (pos - lo), 4)


if __name__ == "__main__":
    sys.exit(main())
