"""Several worker processes, each with its own trio loop: run_workers.

How this works
--------------
:func:`run_workers` is a synchronous entry point, like :func:`trio.run`.  It
runs a small trio supervisor in the calling process that starts one child
per worker with multiprocessing's "spawn" method (a fresh interpreter; no
fork of a running event loop).  Each child runs ``main(worker, *args)`` in a
``trio.run`` of its own.  Servers in ``main`` pass ``reuse_port=True``, so
all workers listen on one port and the kernel spreads new connections (or
UDP peers) over them.

Parent and child talk over a socketpair, one JSON or command line at a time,
through a :class:`trionet.Connection` with :class:`trionet.Lines` framing:

* parent to child: ``stop`` (shut down gracefully) and ``force`` (cancel
  ``main`` now).  End of stream -- the parent died -- also means ``stop``;
* child to parent: the latest :meth:`Worker.report`, a JSON object per line.

Stopping.  SIGINT or SIGTERM to the parent sends ``stop`` to every worker
(a terminal's Ctrl-C also reaches them directly; that is the same request).
A worker sets :attr:`Worker.shutdown_requested` and gives ``main``
``shutdown_timeout`` seconds to return -- long enough for a server's grace
period and flush -- then cancels it.  A second signal sends ``force``.  The
parent kills (SIGKILL) a worker still alive ``shutdown_timeout`` + 5 seconds
after ``stop``.

Crashes.  A worker whose process ends with a non-zero code while the pool is
not stopping is logged on the ``"trionet"`` logger and started again after an
exponential backoff.  More than ``max_restarts`` crashes of one worker within
``restart_window`` seconds stop the whole pool.  A worker whose ``main``
returns normally is finished and not restarted.

:func:`run_workers` returns 0 when every worker's last process exited with 0,
and 1 otherwise.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import logging
import math
import multiprocessing
import os
import pickle
import signal
import socket
import sys
import types
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeAlias, final

import trio

from ._codec import Lines
from ._connection import Connection
from ._exceptions import MessageTooLarge, TrionetError

__all__ = ["Worker", "run_workers"]

logger = logging.getLogger("trionet")

WorkerMain: TypeAlias = Callable[..., Awaitable[object]]
ReportCallback: TypeAlias = Callable[[int, dict[str, Any]], object]

#: The longest report line, in bytes of JSON.
MAX_REPORT_SIZE = 64 * 1024
#: Seconds the parent waits past ``shutdown_timeout`` before killing a worker.
KILL_MARGIN = 5.0
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_CONTROL_FRAMING = Lines(max_length=MAX_REPORT_SIZE)
_CONTROL_ERRORS = (TrionetError, trio.BrokenResourceError, trio.ClosedResourceError)


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
        index: the worker's number, 0 to ``workers - 1``; a restarted worker
            keeps its number.
        workers: how many workers the pool runs.
        restarts: how many times this worker has been restarted.

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
        """How many times this worker has been restarted after a crash."""
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


def run_workers(
    main: WorkerMain,
    workers: int | None = None,
    *,
    args: Sequence[Any] = (),
    max_restarts: int = 5,
    restart_window: float = 60.0,
    restart_backoff: float = 0.5,
    max_restart_backoff: float = 30.0,
    shutdown_timeout: float = 30.0,
    on_report: ReportCallback | None = None,
) -> int:
    """Run ``await main(worker, *args)`` in each of ``workers`` processes.

    A synchronous entry point, like :func:`trio.run`: call it from the main
    thread of your program, under ``if __name__ == "__main__":``, and exit
    with what it returns::

        if __name__ == "__main__":
            raise SystemExit(trionet.run_workers(main, 4, args=(7000,)))

    Each worker is a fresh Python process (multiprocessing's "spawn" method)
    running its own trio loop.  For all of them to accept on one port, their
    servers must pass ``reuse_port=True`` (Linux, the BSDs and macOS; Linux
    spreads connections evenly) and the port must be given, not 0 -- pass it
    in ``args``.  See :doc:`/scaling`.

    SIGINT or SIGTERM to this process asks every worker to stop:
    :attr:`Worker.shutdown_requested` is set and ``main`` has
    ``shutdown_timeout`` seconds to return before it is cancelled; a second
    signal cancels it at once.  A worker whose process exits with a non-zero
    code (``main`` raised, or the process was killed) is logged on the
    ``"trionet"`` logger and restarted after ``restart_backoff`` seconds,
    doubling with each crash up to ``max_restart_backoff``; more than
    ``max_restarts`` crashes of one worker within ``restart_window`` seconds
    stop every worker.  A worker whose ``main`` returns is finished.

    Args:
        main: a module-level ``async def main(worker: Worker, *args)``;
            it is imported by name in each worker, so it cannot be a lambda,
            a nested function or a bound method.
        workers: how many processes (default: the CPUs this process may use).
        args: more positional arguments for ``main``; they must pickle.
        max_restarts: crashes of one worker tolerated within
            ``restart_window`` seconds.
        restart_window: see ``max_restarts``.
        restart_backoff: seconds before restarting a crashed worker the first
            time; doubles for each further crash within the window.
        max_restart_backoff: the longest wait before a restart.
        shutdown_timeout: seconds a worker has, once asked to stop, before
            ``main`` is cancelled; the parent kills it 5 seconds later.
        on_report: called in this process as ``on_report(index, report)``
            with each dict a worker gives to :meth:`Worker.report`.

    Returns:
        0 if the last process of every worker exited with 0 -- ``main``
        returned, on its own or after a stop request -- and 1 otherwise: a
        worker crashed while stopping, did not stop in time, or crashed too
        often.

    Raises:
        TypeError: ``main`` is not a module-level async function, or ``args``
            does not pickle.
        ValueError: an option is out of range.
        RuntimeError: not called from the main thread.

    .. versionadded:: 0.1
    """
    target = _main_reference(main)
    try:
        pickle.dumps(tuple(args))
    except Exception as exc:
        raise TypeError(f"args must pickle to reach the workers: {exc}") from exc
    if workers is None:
        workers = _cpu_count()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, not {workers!r}")
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, int):
        raise TypeError("max_restarts must be an int")
    if max_restarts < 0:
        raise ValueError(f"max_restarts must be >= 0, not {max_restarts}")
    for name, value in (
        ("restart_window", restart_window),
        ("restart_backoff", restart_backoff),
        ("max_restart_backoff", max_restart_backoff),
        ("shutdown_timeout", shutdown_timeout),
    ):
        if not (isinstance(value, int | float) and 0 <= value < math.inf):
            raise ValueError(f"{name} must be a number >= 0, not {value!r}")
    pool = _Pool(
        target,
        tuple(args),
        workers,
        max_restarts=max_restarts,
        restart_window=float(restart_window),
        restart_backoff=float(restart_backoff),
        max_restart_backoff=float(max_restart_backoff),
        shutdown_timeout=float(shutdown_timeout),
        on_report=on_report,
    )
    return trio.run(pool.run)


def _main_reference(main: object) -> tuple[str, str]:
    if not (isinstance(main, types.FunctionType) and inspect.iscoroutinefunction(main)):
        raise TypeError(f"main must be an async function, not {main!r}")
    module, name = main.__module__, main.__qualname__
    if "<" in name or "." in name:
        raise TypeError(
            f"main must be defined at the top level of a module, not {name!r}; "
            "the workers import it by name"
        )
    if getattr(sys.modules.get(module), name, None) is not main:
        raise TypeError(f"main is not importable as {module}.{name}")
    return module, name


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # pragma: no cover


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:  # pragma: no cover
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


# ---------------------------------------------------------------- the parent


class _Pool:
    def __init__(
        self,
        target: tuple[str, str],
        args: tuple[Any, ...],
        workers: int,
        *,
        max_restarts: int,
        restart_window: float,
        restart_backoff: float,
        max_restart_backoff: float,
        shutdown_timeout: float,
        on_report: ReportCallback | None,
    ) -> None:
        self._target = target
        self._args = args
        self._workers = workers
        self._max_restarts = max_restarts
        self._restart_window = restart_window
        self._restart_backoff = restart_backoff
        self._max_restart_backoff = max_restart_backoff
        self._shutdown_timeout = shutdown_timeout
        self._on_report = on_report
        self._context = multiprocessing.get_context("spawn")
        self._stopping = trio.Event()
        self._forcing = trio.Event()
        self._failed = False

    async def run(self) -> int:
        with trio.open_signal_receiver(*_SIGNALS) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_signals, signals)
                async with trio.open_nursery() as slots:
                    for index in range(self._workers):
                        slots.start_soon(self._run_slot, index)
                nursery.cancel_scope.cancel()
        return 1 if self._failed else 0

    async def _watch_signals(self, signals: Any) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if not self._stopping.is_set():
                logger.info("%s: stopping %d workers", name, self._workers)
                self._stopping.set()
            elif not self._forcing.is_set():
                logger.warning(
                    "second signal (%s): cancelling main in every worker", name
                )
                self._forcing.set()

    def _stop_all(self) -> None:
        self._stopping.set()

    async def _run_slot(self, index: int) -> None:
        restarts = 0
        crashes: deque[float] = deque()
        while not self._stopping.is_set():
            pid, code = await self._run_process(index, restarts)
            if code == 0:
                return
            if self._stopping.is_set():
                logger.error("worker %d (pid %d) %s", index, pid, _describe_exit(code))
                self._failed = True
                return
            now = trio.current_time()
            crashes.append(now)
            while crashes[0] < now - self._restart_window:
                crashes.popleft()
            if len(crashes) > self._max_restarts:
                logger.error(
                    "worker %d (pid %d) %s; it crashed %d times within %.0f s, "
                    "so every worker is stopped",
                    index,
                    pid,
                    _describe_exit(code),
                    len(crashes),
                    self._restart_window,
                )
                self._failed = True
                self._stop_all()
                return
            delay = min(
                self._restart_backoff * 2 ** (len(crashes) - 1),
                self._max_restart_backoff,
            )
            logger.error(
                "worker %d (pid %d) %s; restarting it in %.1f s",
                index,
                pid,
                _describe_exit(code),
                delay,
            )
            with trio.move_on_after(delay):
                await self._stopping.wait()
            if self._stopping.is_set():
                self._failed = True
                return
            restarts += 1

    async def _run_process(self, index: int, restarts: int) -> tuple[int, int | None]:
        parent_end, child_end = socket.socketpair()
        try:
            process = self._context.Process(
                target=_worker_process,
                args=(
                    self._target,
                    self._args,
                    index,
                    self._workers,
                    restarts,
                    child_end,
                    self._shutdown_timeout,
                ),
                name=f"trionet worker {index}",
            )
            process.start()
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()
        pid = process.pid
        assert pid is not None
        logger.debug("worker %d started (pid %d)", index, pid)
        control = Connection(
            trio.SocketStream(trio.socket.from_stdlib_socket(parent_end)),
            framing=_CONTROL_FRAMING,
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_reports, control, index)
                nursery.start_soon(self._tell_stop, control, process, index)
                await trio.lowlevel.wait_readable(process.sentinel)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await control.aclose()
            if process.exitcode is None:
                # We are being cancelled (or crashed) with the worker alive.
                process.kill()
            process.join()
        code = process.exitcode
        process.close()
        return pid, code

    async def _read_reports(self, control: Connection, index: int) -> None:
        try:
            async for line in control:
                try:
                    report = json.loads(line)
                except ValueError:
                    report = None
                if not isinstance(report, dict):
                    logger.warning("worker %d sent a malformed report", index)
                    continue
                if self._on_report is not None:
                    try:
                        self._on_report(index, report)
                    except Exception:
                        logger.exception("on_report failed for worker %d", index)
        except _CONTROL_ERRORS as exc:
            logger.debug("worker %d: control connection ended: %r", index, exc)

    async def _tell_stop(self, control: Connection, process: Any, index: int) -> None:
        await self._stopping.wait()
        await _send_command(control, "stop")
        deadline = trio.current_time() + self._shutdown_timeout + KILL_MARGIN
        with trio.move_on_at(deadline):
            await self._forcing.wait()
            await _send_command(control, "force")
            await trio.sleep_forever()
        logger.error(
            "worker %d (pid %d) did not stop within %.1f s; killing it",
            index,
            process.pid,
            self._shutdown_timeout + KILL_MARGIN,
        )
        process.kill()


async def _send_command(control: Connection, command: str) -> None:
    with contextlib.suppress(*_CONTROL_ERRORS):  # the other side is gone
        await control.send_line(command)


# ---------------------------------------------------------------- a worker


def _worker_process(
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
    for signum in _SIGNALS:
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
    control = Connection(
        trio.SocketStream(trio.socket.from_stdlib_socket(control_socket)),
        framing=_CONTROL_FRAMING,
    )
    main_scope = trio.CancelScope()
    forced = False

    def request_shutdown() -> None:
        if not worker.shutdown_requested.is_set():
            worker.shutdown_requested.set()
            main_scope.deadline = trio.current_time() + shutdown_timeout

    def force() -> None:
        nonlocal forced
        request_shutdown()
        forced = True
        main_scope.cancel()

    def on_signal() -> None:
        if worker.shutdown_requested.is_set():
            force()
        else:
            request_shutdown()

    async def watch_signals(signals: Any) -> None:
        async for _signum in signals:
            on_signal()

    async def read_commands() -> None:
        try:
            async for line in control:
                if line == b"stop":
                    request_shutdown()
                elif line == b"force":
                    force()
        except _CONTROL_ERRORS:
            pass
        request_shutdown()  # the parent is gone: stop too

    code = 0
    with trio.open_signal_receiver(*_SIGNALS) as signals:
        for _signum in early:
            on_signal()
        async with control, trio.open_nursery() as nursery:
            nursery.start_soon(watch_signals, signals)
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
            if worker._pending is not None:
                with trio.move_on_after(1.0):
                    await _send_command(control, worker._pending)
            nursery.cancel_scope.cancel()
    return code


async def _send_reports(worker: Worker, control: Connection) -> None:
    while True:
        await worker._wakeup.wait()
        worker._wakeup = trio.Event()
        line, worker._pending = worker._pending, None
        if line is not None:
            await _send_command(control, line)
