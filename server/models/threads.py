"""Blocking work (model builds) on daemon threads, awaited from the event loop.

``asyncio.to_thread`` uses the loop's default executor, whose non-daemon workers the interpreter waits for at
exit: a model still optimizing when SIGTERM arrives would hold the process past its grace period. A daemon
thread does not, and a result nobody awaits any more (the caller was cancelled) is handed to ``orphan`` so
what it holds (sessions, worker threads) is released instead of leaked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


async def in_daemon_thread(fn: Callable[[], T], *, name: str, orphan: Callable[[T], None] | None = None) -> T:
    """Run ``fn`` on a new daemon thread and await its result."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.cancelled():
            if error is None and orphan is not None:
                threading.Thread(target=orphan, args=(result,), daemon=True, name=f"{name}-orphan").start()
        elif error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result, error = fn(), None
        except BaseException as exc:  # handed to the awaiting coroutine
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is gone: the process is exiting
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, daemon=True, name=name).start()
    return await future


def lower_thread_priority(increment: int) -> None:
    """Raise the calling thread's nice value by ``increment`` (Linux: per thread; the threads it creates from
    then on, e.g. onnxruntime's intra-op pools of sessions built on it, inherit it). It cannot be undone
    without privileges, so call it only on a thread that ends with its work. No-op elsewhere or at 0."""
    if increment <= 0 or not hasattr(os, "setpriority"):
        return
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + increment))
    except OSError as exc:  # e.g. a sandbox that forbids it: optimize at normal priority
        log.debug("could not lower the optimizer thread's priority: %s", exc)
