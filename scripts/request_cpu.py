"""CPU time per streamed request at concurrency 1, by thread: where the HTTP path's cost goes.

    python scripts/request_cpu.py engines/tiny-fp32-onnxruntime --requests 200

Starts `nemodiff-compile serve` on the engine (as scripts/load_test.py --engine does), warms it up, then sends
`--requests` streamed completions one after another with the async openai client and prints one JSON line:
wall milliseconds per request, p50 latency, the server's CPU milliseconds per request for each thread that
used any (its event loop thread named "loop"; the scheduler's thread and ONNX Runtime's workers by thread id:
both also count the workers' spinning), and the client's (this process). On a machine whose cores the engine
already uses, the loop's and the client's CPU is what a request at concurrency 1 pays beyond
`Session.generate`.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load_test  # noqa: E402


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of pid, from /proc: in clock ticks (10 ms), so a thread's figure
    needs many requests (the default 200) to mean anything."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        stat = (task / "stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


async def run(args) -> dict:
    prompts = load_test.read_prompts(args.prompts)
    server, url = load_test.start_server(args.engine, args.threads, None)
    try:
        client, model = await load_test.connect(url)
        knobs = {"mode": args.mode}
        for p in prompts[:8]:                                         # warm-up
            await load_test.one(client, model, p, args.max_tokens, knobs)
        s0, c0, t0 = thread_cpu_s(server.pid), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        lat = [(await load_test.one(client, model, prompts[i % len(prompts)], args.max_tokens, knobs))["latency"]
               for i in range(args.requests)]
        wall = time.perf_counter() - t0
        s1, c1 = thread_cpu_s(server.pid), resource.getrusage(resource.RUSAGE_SELF)
    finally:
        server.terminate()
        server.wait(60)
    n = args.requests
    per = {("loop" if tid == server.pid else str(tid)): round((s1[tid] - s0.get(tid, 0.0)) / n * 1e3, 2) for tid in s1}
    return dict(mode=args.mode, requests=n, ms_per_request=round(wall / n * 1e3, 2),
                latency_p50_ms=round(load_test.q(lat, 0.5) * 1e3, 2),
                server_cpu_ms_per_request={k: v for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v > 0.05},
                client_cpu_ms_per_request=round((c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime) / n * 1e3, 2))


def main() -> int:
    args = load_test.one_at_a_time_args(__doc__, requests=200)
    print(json.dumps(asyncio.run(run(args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
