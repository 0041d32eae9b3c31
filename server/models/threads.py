"""Blocking work (model builds) on daemon threads, awaited from the event loop.

``asyncio.to_thread`` uses the loop's default executor, whose non-daemon workers the interpreter waits for at
exit: a model still optimizing when SIGTERM arrives would hold the process past its grace period. A daemon
thread does not, and a result nobody awaits any more (the caller was cancelled) is handed to ``orphan`` so
what it holds (sessions, worker threads) is released instead of leaked.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


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
