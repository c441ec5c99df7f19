"""Prometheus metrics of a serving process (prometheus-client, the `serve` extra), fed by the scheduler's
observer calls (decoding/scheduler.py) and the HTTP layer. One registry per server, so several servers (or
tests) in one process do not collide.

  nemodiff_requests_total{endpoint,status}     HTTP requests by outcome (ok, bad_request, overloaded, cancelled, error)
  nemodiff_prompt_tokens_total / nemodiff_generated_tokens_total
  nemodiff_engine_passes_total                 engine passes run
  nemodiff_row_passes_total                    rows that took part in them (tokens per forward overall:
                                               generated_tokens_total / row_passes_total)
  nemodiff_tokens_per_forward                  histogram, per finished request
  nemodiff_queue_depth                         requests waiting for a row
  nemodiff_batch_rows / nemodiff_batch_occupancy   rows in the last pass; rows per pass / the largest batch (histogram)
  nemodiff_pass_seconds                        engine pass latency (histogram)
  nemodiff_time_to_first_token_seconds / nemodiff_request_seconds   per request (histograms)
"""

from __future__ import annotations

from typing import Any


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("nemodiff_requests", "HTTP requests by endpoint and outcome",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("nemodiff_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter("nemodiff_generated_tokens", "tokens generated", registry=r)
        self.passes = Counter("nemodiff_engine_passes", "engine passes run", registry=r)
        self.row_passes = Counter("nemodiff_row_passes", "rows taking part in engine passes", registry=r)
        self.tokens_per_forward = Histogram("nemodiff_tokens_per_forward", "tokens per forward of finished requests",
                                            buckets=(0.5, 0.75, 1, 1.25, 1.5, 2, 3, 4, 6, 8, 16), registry=r)
        self.queue_depth = Gauge("nemodiff_queue_depth", "requests waiting for a row", registry=r)
        self.batch_rows = Gauge("nemodiff_batch_rows", "rows in the last engine pass", registry=r)
        self.occupancy = Histogram("nemodiff_batch_occupancy", "rows per engine pass / the largest batch",
                                   buckets=(0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0), registry=r)
        self.pass_seconds = Histogram("nemodiff_pass_seconds", "engine pass latency",
                                      buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
                                      registry=r)
        self.ttft = Histogram("nemodiff_time_to_first_token_seconds", "submission to first committed tokens",
                              registry=r)
        self.latency = Histogram("nemodiff_request_seconds", "submission to finish", registry=r)

    # ---- the scheduler's observer ----------------------------------------------------------------------

    def on_pass(self, seconds: float, rows: int, batch: int, capacity: int) -> None:
        self.passes.inc()
        self.row_passes.inc(rows)
        self.batch_rows.set(rows)
        self.occupancy.observe(rows / max(1, capacity))
        self.pass_seconds.observe(seconds)

    def on_queue(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def on_request(self, req: Any) -> None:
        if req.error is None:
            g = req.row.generation()
            self.prompt_tokens.inc(len(req.row.prompt))
            self.generated_tokens.inc(sum(len(t) for t in g.tokens))
            self.tokens_per_forward.observe(g.tokens_per_forward)
            self.latency.observe(req.finished - req.submitted)
        if req.first_token is not None:
            self.ttft.observe(req.first_token - req.submitted)

    # ---- HTTP ------------------------------------------------------------------------------------------

    def request(self, endpoint: str, status: str) -> None:
        self.requests.labels(endpoint=endpoint, status=status).inc()

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
