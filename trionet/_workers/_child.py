"""A worker process: :class:`Worker`, and the body that runs ``main``.

How this works
--------------
The parent spawns a fresh interpreter whose target is :func:`worker_process`.
It imports ``main`` by name and runs it in a trio loop of its own, beside
three tasks: one reads the parent's commands (``_control.py``), one sends the
latest report, one watches this process's own SIGINT and SIGTERM.

Stopping.  ``stop`` from the parent, or the parent's end of the control
connection closing, and the first SIGINT or SIGTERM to this process are the
same request: :attr:`Worker.shutdown_requested` is set and ``main`` has
``shutdown_timeout`` seconds to return before it is cancelled.  A signal to
the whole process group reaches the parent and every worker at once, so a
worker usually gets both the signal and ``stop``; that is still one request.
Only a *second signal to this process*, or ``force`` from the parent, cancels
``main`` at once.

What the parent learns.  A worker that was signalled says so at once
(``signalled``): unless the pool is stopping, the parent replaces it once it
has exited.  A ``main`` that returned before any stop request says
``finished``: that worker is done for good.  Exit code 0 means ``main``
returned; 1 that it raised or had to be cancelled.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeAlias, final

import trio

from .._connection import Connection
from .._exceptions import MessageTooLarge
from ._control import (
    ERRORS,
    MAX_REPORT_SIZE,
    Command,
    Note,
    open_control,
    send,
)

__all__ = ["SIGNALS", "Worker", "WorkerMain", "worker_process"]

logger = logging.getLogger("trionet")

WorkerMain: TypeAlias = Callable[..., Awaitable[object]]

#: The signals that ask a worker (or the pool) to stop.
SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Seconds a stopping worker waits for its last messages to reach the parent.
_LAST_WORDS_TIMEOUT = 1.0


@final
class Worker:
    """What a worker process knows about itself.  ``main`` receives one.

    ::

        async def main(worker: trionet.Worker, port: int) -> None:
            async with trionet.open_tcp_server(
                handler, port, host="0.0.0.0", reuse_port=True
            ) as server:
                worker.report({"pid": worker.pid, "port": server.port})
                await worker.shutdown_requested.wait()
            # leaving the block closed the server gracefully

    :func:`run_workers` makes the worker objects; make one yourself (with the
    defaults) to call a ``main`` in a test.

    Args:
        index: the worker's number, 0 to ``workers - 1``; a worker started
            in place of one that ended keeps its number.
        workers: how many workers the pool runs.
        restarts: how many times this worker has been replaced.

    .. versionadded:: 0.1
    """

    def __init__(self, index: int = 0, workers: int = 1, *, restarts: int = 0) -> None:
        if not 0 <= index < workers:
            raise ValueError(f"index must be in 0..{workers - 1}, not {index}")
        self.index = index
        """The worker's number, 0 to ``workers - 1``, kept across restarts."""
        self.workers = workers
        """How many workers the pool runs."""
        self.restarts = restarts
        """How many times this worker has been replaced (after a crash, a
        kill, or a signal to this worker alone)."""
        self.pid = os.getpid()
        """The worker's process id."""
        self.shutdown_requested = trio.Event()
        """Set when the worker is asked to stop (SIGINT or SIGTERM to the pool
        or to this process).  ``main`` should then return -- typically by
        leaving its ``open_tcp_server`` block, which closes the server
        gracefully -- before ``shutdown_timeout``, after which it is cancelled."""
        self.last_report: dict[str, Any] | None = None
        """The latest dict given to :meth:`report`, or None."""
        self._pending: str | None = None
        self._wakeup = trio.Event()

    def __repr__(self) -> str:
        return f"<trionet.Worker {self.index}/{self.workers} pid={self.pid}>"

    def report(self, stats: Mapping[str, Any]) -> None:
        """Send ``stats`` to the parent's ``on_report`` callback; never waits.

        Only the latest report is kept: one not sent yet is replaced.  Keep
        it small and JSON-serialisable (str keys; numbers, strings, lists,
        dicts, booleans, None).

        Raises:
            TypeError: ``stats`` is not a mapping or cannot be made JSON.
            ValueError: ``stats`` holds NaN or infinity.
            MessageTooLarge: its JSON is over 64 KiB.
        """
        if not isinstance(stats, Mapping):
            raise TypeError(f"stats must be a mapping, not {type(stats).__name__}")
        line = json.dumps(dict(stats), separators=(",", ":"), allow_nan=False)
        if len(line.encode()) > MAX_REPORT_SIZE:
            raise MessageTooLarge(
                f"report of {len(line)} characters of JSON is over "
                f"the limit of {MAX_REPORT_SIZE} bytes"
            )
        self.last_report = json.loads(line)
        self._pending = line
        self._wakeup.set()


def worker_process(
    target: tuple[str, str],
    args: tuple[Any, ...],
    index: int,
    workers: int,
    restarts: int,
    control: socket.socket,
    shutdown_timeout: float,
) -> None:
    """The body of a worker process (module-level, so spawn can find it)."""
    early: list[int] = []

    def remember(signum: int, frame: object) -> None:
        early.append(signum)

    # Until trio's signal receiver is up, a signal is noted, not fatal.
    for signum in SIGNALS:
        signal.signal(signum, remember)
    module, name = target
    main = getattr(importlib.import_module(module), name)
    worker = Worker(index, workers, restarts=restarts)
    code = trio.run(_run_worker, main, args, worker, control, shutdown_timeout, early)
    sys.exit(code)


async def _run_worker(
    main: WorkerMain,
    args: tuple[Any, ...],
    worker: Worker,
    control_socket: socket.socket,
    shutdown_timeout: float,
    early: list[int],
) -> int:
    index = worker.index
    control = open_control(control_socket)
    main_scope = trio.CancelScope()
    forced = False
    signalled = 0

    def request_shutdown() -> None:
        if not worker.shutdown_requested.is_set():
            worker.shutdown_requested.set()
            main_scope.deadline = trio.current_time() + shutdown_timeout

    def force() -> None:
        nonlocal forced
        request_shutdown()
        forced = True
        main_scope.cancel()

    def on_signal(signum: int, nursery: trio.Nursery) -> None:
        # The parent's "stop" does not count: a signal to the process group
        # reaches us and the parent, which then also says "stop".
        nonlocal signalled
        signalled += 1
        if signalled > 1:
            force()
            return
        request_shutdown()
        name = signal.Signals(signum).name
        nursery.start_soon(send, control, Note.SIGNALLED, name)

    async def watch_signals(signals: Any, nursery: trio.Nursery) -> None:
        async for signum in signals:
            on_signal(signum, nursery)

    async def read_commands() -> None:
        try:
            async for line in control:
                if line == Command.STOP.value:
                    request_shutdown()
                elif line == Command.FORCE.value:
                    force()
        except ERRORS:
            pass
        request_shutdown()  # the parent is gone: stop too

    code = 0
    with trio.open_signal_receiver(*SIGNALS) as signals:
        async with control, trio.open_nursery() as nursery:
            for signum in early:
                on_signal(signum, nursery)
            nursery.start_soon(watch_signals, signals, nursery)
            nursery.start_soon(read_commands)
            nursery.start_soon(_send_reports, worker, control)
            with main_scope:
                try:
                    await main(worker, *args)
                except Exception:
                    logger.exception("worker %d: main raised", index)
                    code = 1
            if main_scope.cancelled_caught:
                if forced:
                    logger.warning("worker %d: main cancelled on request", index)
                else:
                    logger.error(
                        "worker %d: main did not return within %.1f s of the "
                        "shutdown request; cancelled",
                        index,
                        shutdown_timeout,
                    )
                code = 1
            with trio.move_on_after(_LAST_WORDS_TIMEOUT):
                if worker._pending is not None:
                    await send(control, Note.REPORT, worker._pending)
                if code == 0 and not worker.shutdown_requested.is_set():
                    await send(control, Note.FINISHED)
            nursery.cancel_scope.cancel()
    return code


async def _send_reports(worker: Worker, control: Connection) -> None:
    while True:
        await worker._wakeup.wait()
        worker._wakeup = trio.Event()
        line, worker._pending = worker._pending, None
        if line is not None:
            await send(control, Note.REPORT, line)
