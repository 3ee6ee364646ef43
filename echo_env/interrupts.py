"""SIGTERM treated as Ctrl-C, without raising inside whatever code happens to be running.

By default SIGTERM (``kill``, ``timeout``, a cancelled CI job) ends Python at once and
skips every ``finally`` block: an embedded engine, in a session of its own, would be
orphaned, and partial results would never be written. Raising ``KeyboardInterrupt`` from
a signal handler avoids that but lands in whatever frame runs at that moment. If that
frame is inside a request task, the task keeps the exception, asyncio prints "Task
exception was never retrieved" and the code awaiting the task sees a failure instead
of an interrupt.

Two tools, one for each kind of code:

- :func:`run_main` runs a coroutine the way :func:`asyncio.run` does and handles SIGTERM
  the way :class:`asyncio.Runner` handles Ctrl-C: the main task is cancelled, so every
  ``finally`` block and ``async with`` exit runs, and the caller gets
  ``KeyboardInterrupt``. A second SIGTERM stops the loop at once.
- :func:`sigterm_as_interrupt` covers synchronous code (an engine starting, a server in
  the foreground): SIGTERM raises ``KeyboardInterrupt`` in the main thread. While an
  event loop runs there (code that calls ``asyncio.run`` itself), the interrupt is
  raised from a loop callback instead of inside a task, and ``asyncio.run``'s shutdown
  cancels the tasks so their cleanup runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Awaitable, Callable, Iterator
from types import FrameType
from typing import Any, TypeVar

__all__ = ["run_main", "sigterm_as_interrupt"]

T = TypeVar("T")


class _Main:
    """What the SIGTERM handler of :func:`run_main` acts on."""

    __slots__ = ("task", "terminated")

    def __init__(self) -> None:
        self.task: asyncio.Task[Any] | None = None
        self.terminated = False


def run_main(coro_factory: Callable[[], Awaitable[T]]) -> T:
    """Run ``coro_factory()`` in a new event loop; SIGTERM and Ctrl-C cancel it cleanly.

    The coroutine is made inside the loop, so an interrupt before it starts leaves no
    coroutine un-awaited. Off the main thread (where signal handlers cannot be set) it
    runs as :func:`asyncio.run` would.

    Args:
        coro_factory: Makes the coroutine to run, e.g. ``lambda: main(config)``.

    Returns:
        The coroutine's result.

    Raises:
        KeyboardInterrupt: SIGTERM or Ctrl-C arrived; the coroutine was cancelled and its
            cleanup has run.
    """
    state = _Main()

    async def main() -> T:
        state.task = asyncio.current_task()
        if state.terminated:  # SIGTERM came before the first step
            raise asyncio.CancelledError
        return await coro_factory()

    def on_sigterm() -> None:
        if state.terminated:
            # Cleanup is stuck or too slow: stop the loop now, as a second Ctrl-C does.
            raise KeyboardInterrupt
        state.terminated = True
        if state.task is not None:
            state.task.cancel()

    with asyncio.Runner() as runner:
        loop = runner.get_loop()
        previous = signal.getsignal(signal.SIGTERM)
        handled = False
        if threading.current_thread() is threading.main_thread():
            with contextlib.suppress(NotImplementedError):  # no add_signal_handler on Windows
                loop.add_signal_handler(signal.SIGTERM, on_sigterm)
                handled = True
        try:
            result = runner.run(main())
        except asyncio.CancelledError:
            if state.terminated:
                raise KeyboardInterrupt from None
            raise
        finally:
            if handled:
                loop.remove_signal_handler(signal.SIGTERM)
                # remove_signal_handler leaves SIG_DFL; put back what was there (a
                # sigterm_as_interrupt around this call, say).
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    if state.terminated:  # the coroutine swallowed the cancellation: the process still has to stop
        raise KeyboardInterrupt
    return result


def _raise_interrupt() -> None:
    raise KeyboardInterrupt


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        raise KeyboardInterrupt from None
    # Raised from a loop callback, the interrupt leaves run_until_complete without
    # passing through any task; asyncio.run then cancels the tasks and runs their cleanup.
    loop.call_soon_threadsafe(_raise_interrupt)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises ``KeyboardInterrupt`` in the main thread, as Ctrl-C does.

    Meant for synchronous code: start-up of an embedded engine, a server kept in the
    foreground, a command's whole run. While an event loop runs in the main thread the
    interrupt comes from a loop callback instead (see the module's docstring); use
    :func:`run_main` for the coroutine itself. Off the main thread it does nothing.
    The previous handler comes back when the block ends.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
