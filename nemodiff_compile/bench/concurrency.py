"""What batching concurrent requests gains on one engine: closed-loop clients on a `Scheduler`, no HTTP.

    clients(fn, prompts, concurrency=8, requests=32)
        `concurrency` client threads, each calling fn on the next prompt as soon as its previous call returned,
        until `requests` are done (scripts/profile_scheduler.py drives `Session.generate` with it)
    closed_loop(scheduler, prompts, policy, concurrency=8, requests=32, max_new_tokens=64)
        `clients` submitting prompts (token ids) to a scheduler: tokens, seconds, tokens/s, the engine passes
        run and the rows per pass (the requests' row passes over the engine's passes).
    concurrency_ratio(denoiser, prompts, policy, levels=(1, 8))
        the levels in turn (`rounds` times, figures pooled) on one scheduler over the denoiser, after a
        warm-up request at each level (CUDA graphs are captured per batch bucket): one dict per level and
        the last level's tokens/s over the first's.

`scripts/gpu_check.py --sections serve` runs it on the fast engine at the 8B geometry (the serving issue's GPU
criterion: concurrency 8 at least 3x concurrency 1); `scripts/profile_scheduler.py` is the CPU counterpart
through `Session` with a per-pass breakdown.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from ..decoding.policy import DecodePolicy
from ..decoding.scheduler import Scheduler


def clients(fn: Callable[[Any], Any], prompts: list, *, concurrency: int, requests: int) -> list:
    """fn(prompt) from `concurrency` threads, each taking the next request (prompt i % len(prompts) for request i)
    as soon as its previous one returned, until `requests` are done: their results, in order. The first error a
    request raised is raised here."""
    if concurrency < 1 or requests < 1 or not prompts:
        raise ValueError(f"clients: concurrency {concurrency}, requests {requests}, {len(prompts)} prompts")
    todo, lock = iter(range(requests)), threading.Lock()
    results: list = [None] * requests
    errors: list[BaseException] = []

    def client() -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None or errors:
                return
            try:
                results[i] = fn(prompts[i % len(prompts)])
            except Exception as e:                 # raised by the caller's thread, not lost in this one
                errors.append(e)
                return

    threads = [threading.Thread(target=client, name=f"client-{c}") for c in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def closed_loop(scheduler: Scheduler, prompts: list[list[int]], policy: DecodePolicy, *, concurrency: int,
                requests: int, max_new_tokens: int, timeout: float = 600.0) -> dict:
    """One level of `clients` submitting to the scheduler."""
    passes0, t0 = scheduler.passes, time.perf_counter()
    gens = clients(lambda p: scheduler.submit(p, policy, max_new_tokens).result(timeout), prompts,
                   concurrency=concurrency, requests=requests)
    seconds, passes = time.perf_counter() - t0, scheduler.passes - passes0
    tokens, row_passes = sum(len(g.tokens[0]) for g in gens), sum(g.nfe for g in gens)
    return dict(_figures(concurrency, tokens, seconds, passes, row_passes), requests=requests, row_passes=row_passes)


def concurrency_ratio(denoiser, prompts: list[list[int]], policy: DecodePolicy, *, levels=(1, 8),
                      requests: Callable[[int], int] = lambda c: max(8, 4 * c), rounds: int = 1,
                      max_new_tokens: int = 64, log=print) -> dict:
    """Levels on one scheduler (max_batch: the largest level); `requests(c)` per level and round."""
    sched = Scheduler(denoiser, max_batch=max(levels))
    try:
        pooled = {c: dict(tokens=0, seconds=0.0, passes=0, row_passes=0) for c in levels}
        for c in levels:                                        # warm-up: every batch bucket the level reaches
            closed_loop(sched, prompts, policy, concurrency=c, requests=c, max_new_tokens=max_new_tokens)
        for _ in range(rounds):
            for c in levels:
                r = closed_loop(sched, prompts, policy, concurrency=c, requests=requests(c),
                                max_new_tokens=max_new_tokens)
                log(f"  concurrency {c}: {r['tokens_per_s']} tok/s, {r['rows_per_pass']} rows per pass")
                for k in pooled[c]:
                    pooled[c][k] += r[k]
    finally:
        sched.close()
    rows = [_figures(c, **p) for c, p in pooled.items()]
    return dict(levels=rows, ratio=round(rows[-1]["tokens_per_s"] / rows[0]["tokens_per_s"], 2),
                mode=policy.mode, max_new_tokens=max_new_tokens, rounds=rounds)


def _figures(concurrency: int, tokens: int, seconds: float, passes: int, row_passes: int) -> dict:
    """A level's figures: tokens/s, and the requests' row passes over the engine's passes."""
    return dict(concurrency=concurrency, tokens=tokens, seconds=round(seconds, 4),
                tokens_per_s=round(tokens / seconds, 1), passes=passes,
                rows_per_pass=round(row_passes / passes, 2) if passes else None)
