"""Waiting for another thread, server or process in the tests: poll a condition up to a time limit."""

from __future__ import annotations

import time
from typing import Callable


def until(cond: Callable[[], object], timeout: float = 30.0, every: float = 0.01) -> None:
    """Return once cond() is true; TimeoutError after `timeout` seconds."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise TimeoutError(f"condition not met in {timeout} s")
        time.sleep(every)
