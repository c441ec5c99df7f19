"""Serving: continuous batching over one engine (`scheduler`), an OpenAI-compatible HTTP server (`server`,
the `serve` extra: FastAPI + uvicorn + prometheus-client) and scale-out on Ray Serve (`ray_app`).

Importing this package imports nothing heavy; the server and Ray modules import their libraries."""
