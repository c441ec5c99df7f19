"""`nemodiff-compile serve ENGINE_DIR`: the OpenAI-compatible server (one process), or Ray Serve replicas."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import NemodiffError
from ._common import user_errors

SERVE_EXTRA = ("fastapi", "uvicorn", "prometheus_client")


@click.command()
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--replicas", type=click.IntRange(min=0), default=0, show_default=True,
              help="Ray Serve replicas on a local Ray, each one engine + scheduler (0: this process, no Ray).")
@click.option("--max-batch", type=click.IntRange(min=1), default=None,
              help="Rows decoded at once per engine [default: the engine's largest batch bucket].")
@click.option("--max-queue", type=click.IntRange(min=1), default=64, show_default=True,
              help="Requests waiting for a row before the server answers 503.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="ONNX Runtime intra-op threads per engine [default: ONNX Runtime's, one per physical core].")
@click.option("--num-gpus", type=click.FloatRange(min=0), default=None,
              help="GPUs per Ray Serve replica [default: 1 for TensorRT engines, else 0].")
@click.option("--allow-image-dir", "image_dirs", multiple=True, type=click.Path(path_type=Path),
              help="Vision-language engines: a directory chat image parts may name local files in (repeatable; "
                   "default none: data URLs only).")
@user_errors
def serve(engine_dir, host, port, replicas, max_batch, max_queue, threads, num_gpus, image_dirs):
    """Serve an engine directory over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions,
    /v1/models, /health, /metrics); with --replicas N, as N Ray Serve replicas behind one route."""
    from ..artifact.manifest import read_manifest

    for d in image_dirs:
        if not d.is_dir():
            raise NemodiffError(f"--allow-image-dir {d}: not a directory")
    read_manifest(engine_dir)                         # a one-line error for a missing or broken directory
    missing = [m for m in SERVE_EXTRA + (("ray",) if replicas else ()) if not _importable(m)]
    if missing:
        extra = "serve" if "ray" not in missing else "serve,ray"
        raise NemodiffError(f"serve needs {', '.join(missing)}: pip install 'nemodiff-compile[{extra}]'")
    if num_gpus is not None and not replicas:
        raise click.UsageError("--num-gpus goes with --replicas (Ray Serve)")
    if replicas:
        if image_dirs:
            raise click.UsageError("--allow-image-dir: not supported with --replicas yet")
        from ..serve.ray_app import run

        run(engine_dir, replicas=replicas, host=host, port=port, max_batch=max_batch, max_queue=max_queue,
            threads=threads, num_gpus=num_gpus)
    else:
        from ..serve.server import run

        run(engine_dir, host=host, port=port, max_batch=max_batch, max_queue=max_queue, threads=threads,
            image_dirs=list(image_dirs))


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
