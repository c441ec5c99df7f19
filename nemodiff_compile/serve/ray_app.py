"""Scale-out on Ray Serve: each replica is one engine + scheduler behind the same OpenAI-compatible FastAPI
app (serve/server.py); Ray Serve's proxy spreads requests over the replicas, restarts a replica that dies and
asks Ray for one GPU per replica where the engine needs one.

    nemodiff-compile serve ENGINE_DIR --replicas 2 [--host 127.0.0.1] [--port 8000]     # a local Ray
    serve run nemodiff_compile.serve.ray_app:app_builder engine_dir=ENGINE_DIR replicas=2  # an existing cluster
    serve deploy serve_config.yaml                                                      # or a config file:

    applications:
      - name: nemodiff
        route_prefix: /
        import_path: nemodiff_compile.serve.ray_app:app_builder
        args: {engine_dir: /models/tiny-fp32-onnxruntime, replicas: 2, max_batch: 8, max_queue: 64}

`app_builder` args: engine_dir (required), replicas (default 1), max_batch, max_queue (64), threads (ONNX
Runtime intra-op threads per replica), num_gpus (per replica; default 1 for TensorRT engines, else 0),
num_cpus (per replica, default 1).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

from ray import serve

from ..artifact.manifest import read_manifest
from ..errors import InvalidArgument

APP_NAME = "nemodiff"
ARGS = ("engine_dir", "replicas", "max_batch", "max_queue", "threads", "num_gpus", "num_cpus")


@serve.deployment(name="NemodiffReplica", health_check_period_s=2, health_check_timeout_s=10,
                  graceful_shutdown_timeout_s=30)
@serve.ingress()
class NemodiffReplica:
    """One engine + scheduler; the app is built once the engine is open."""

    def __init__(self, engine_dir: str, max_batch: int | None = None, max_queue: int = 64,
                 threads: int | None = None):
        from ..session import Session
        from .metrics import Metrics
        from .server import host_threads

        host_threads()
        self.metrics = Metrics()
        self.model_name = Path(engine_dir).name
        self.session = Session.open(engine_dir, threads=threads, max_batch=max_batch, max_queue=max_queue,
                                    observer=self.metrics)
        ctx = serve.get_replica_context()
        self.replica = f"{ctx.replica_id.unique_id}:{os.getpid()}"

    def __serve_build_asgi_app__(self):
        from .server import create_app

        return create_app(self.session, model_name=self.model_name, metrics=self.metrics, replica=self.replica,
                          close_session=False)

    def __del__(self):
        session = getattr(self, "session", None)
        if session is not None:
            session.close(drain=True)


def app_builder(args: dict[str, Any]):
    """The Ray Serve application (`serve run ...:app_builder key=value ...`)."""
    unknown = sorted(set(args) - set(ARGS))
    if unknown:
        raise InvalidArgument(f"app_builder: unknown argument {unknown[0]} (expected {', '.join(ARGS)})")
    if "engine_dir" not in args:
        raise InvalidArgument("app_builder: engine_dir is required")
    engine_dir = str(Path(args["engine_dir"]).resolve())
    manifest = read_manifest(engine_dir)                        # a one-line error before Ray starts anything
    num_gpus = float(args.get("num_gpus", 1 if manifest.backend == "tensorrt" else 0))
    options = dict(num_replicas=int(args.get("replicas", 1)),
                   ray_actor_options={"num_gpus": num_gpus, "num_cpus": float(args.get("num_cpus", 1))})
    return NemodiffReplica.options(**options).bind(
        engine_dir, _opt_int(args.get("max_batch")), int(args.get("max_queue", 64)), _opt_int(args.get("threads")))


def run(engine_dir: str | Path, *, replicas: int, host: str = "127.0.0.1", port: int = 8000,
        max_batch: int | None = None, max_queue: int = 64, threads: int | None = None,
        num_gpus: float | None = None, block: bool = True) -> None:
    """Start a local Ray, deploy `replicas` replicas behind http://host:port and, with block, serve until
    SIGINT / SIGTERM (then shut Serve and Ray down)."""
    import ray

    args: dict[str, Any] = dict(engine_dir=str(engine_dir), replicas=replicas, max_batch=max_batch,
                                max_queue=max_queue, threads=threads)
    if num_gpus is not None:
        args["num_gpus"] = num_gpus
    app = app_builder({k: v for k, v in args.items() if v is not None})
    ray.init(include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/")
    if not block:
        return
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"serving {Path(engine_dir).name} on http://{host}:{port} with {replicas} Ray Serve replicas", flush=True)
    stop.wait()
    serve.shutdown()
    ray.shutdown()


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)
