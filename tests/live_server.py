"""A real uvicorn server on a free port of 127.0.0.1, in a thread, for the serving tests."""

from __future__ import annotations

import socket
import threading
from contextlib import contextmanager

from polling import until  # tests/polling.py


@contextmanager
def serving(app, start_timeout: float = 30.0):
    """Runs `app` under uvicorn until the block ends; yields the base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    until(lambda: server.started, start_timeout)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()
