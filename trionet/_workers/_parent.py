"""The pool's parent: :func:`run_workers`.

How this works
--------------
:func:`run_workers` is a synchronous entry point, like :func:`trio.run`.  It
runs a small trio supervisor in the calling process with one task per worker
*slot*.  A slot starts a worker process (multiprocessing's "spawn" method:
a fresh interpreter, no fork of a running event loop), reads its messages
over the control connection (``_control.py``) and waits for it to end;
``Process.start`` and ``join`` run in a thread, so the supervisor's loop
never blocks.

Stopping.  SIGINT or SIGTERM to the parent sends ``stop`` to every worker; a
second signal sends ``force``.  The parent kills (SIGKILL) a worker still
alive ``shutdown_timeout`` + 5 seconds after ``stop``.

Healing.  While the pool is not stopping, a worker that ends is replaced,
whatever ended it -- ``main`` raised, the process was killed, or it was sent
SIGINT or SIGTERM on its own (which stops it gracefully) -- unless ``main``
returned by itself (the worker said ``finished``): that worker is done for
good.  Each replacement is logged at WARNING with the exit status and waits
``restart_backoff`` seconds, doubling for each further end of that worker
within ``restart_window``, up to ``max_restart_backoff``.  Before deciding,
the slot gives the pool's own stop a moment (:data:`SETTLE` seconds) to
arrive: a signal to the whole process group reaches the workers and the
parent at once, and a worker that stops first must not be replaced.  With
``max_restarts`` set, more ends than that within ``restart_window`` stop the
whole pool.

:func:`run_workers` returns 0 when the last process of every worker exited
with 0, and 1 otherwise.
"""

from __future__ import annotations

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
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias, final

import attrs
import trio

from .._connection import Connection
from .._options import non_negative, positive, positive_int
from ._child import SIGNALS, WorkerMain, worker_process
from ._control import ERRORS, Command, Note, open_control, parse_note, send

__all__ = ["KILL_MARGIN", "SETTLE", "run_workers"]

logger = logging.getLogger("trionet")

ReportCallback: TypeAlias = Callable[[int, dict[str, Any]], object]

#: Seconds the parent waits past ``shutdown_timeout`` before killing a worker.
KILL_MARGIN = 5.0
#: Seconds a slot waits, after its worker ended, for the pool's own stop.
SETTLE = 0.25

_FINITE = attrs.validators.lt(math.inf)


def _optional_count(instance: object, attribute: Any, value: object) -> None:
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{attribute.name} must be an int or None")
        non_negative(instance, attribute, value)


@attrs.frozen(kw_only=True)
class _PoolOptions:
    """run_workers' options, checked once."""

    workers: int = attrs.field(default=1, validator=positive_int)
    max_restarts: int | None = attrs.field(default=None, validator=_optional_count)
    restart_window: float = attrs.field(
        default=60.0, validator=attrs.validators.and_(positive, _FINITE)
    )
    restart_backoff: float = attrs.field(
        default=0.5, validator=attrs.validators.and_(non_negative, _FINITE)
    )
    max_restart_backoff: float = attrs.field(
        default=30.0, validator=attrs.validators.and_(non_negative, _FINITE)
    )
    shutdown_timeout: float = attrs.field(
        default=30.0, validator=attrs.validators.and_(non_negative, _FINITE)
    )


def run_workers(
    main: WorkerMain,
    workers: int | None = None,
    *,
    args: Sequence[Any] = (),
    max_restarts: int | None = None,
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

    SIGINT or SIGTERM to this process -- or to its whole process group, as a
    terminal's Ctrl-C, systemd and docker send it -- asks every worker to
    stop: :attr:`Worker.shutdown_requested` is set and ``main`` has
    ``shutdown_timeout`` seconds to return before it is cancelled; a second
    signal cancels it at once.

    While the pool runs, a worker that ends is replaced -- ``main`` raised,
    the process was killed, or it alone was sent SIGINT or SIGTERM (which
    stops it gracefully first) -- after ``restart_backoff`` seconds, doubling
    for each further end of that worker within ``restart_window`` seconds up
    to ``max_restart_backoff``, each logged at WARNING on the ``"trionet"``
    logger with the exit status.  Only the pool's own stop, or ``main``
    returning by itself, ends a worker for good.

    Args:
        main: a module-level ``async def main(worker: Worker, *args)``;
            it is imported by name in each worker, so it cannot be a lambda,
            a nested function or a bound method.
        workers: how many processes (default: the CPUs this process may use).
        args: more positional arguments for ``main``; they must pickle.
        max_restarts: if given, more than this many ends of one worker within
            ``restart_window`` seconds stop the whole pool (which then
            returns 1); by default workers are replaced for as long as the
            pool runs.
        restart_window: see ``restart_backoff`` and ``max_restarts``.
        restart_backoff: seconds before replacing a worker that ended;
            doubles for each further end within the window.
        max_restart_backoff: the longest wait before a replacement.
        shutdown_timeout: seconds a worker has, once asked to stop, before
            ``main`` is cancelled; the parent kills it 5 seconds later.
        on_report: called in this process as ``on_report(index, report)``
            with each dict a worker gives to :meth:`Worker.report`.

    Returns:
        0 if the last process of every worker exited with 0 -- ``main``
        returned, on its own or after a stop request -- and 1 otherwise: a
        worker crashed while stopping, did not stop in time, or ended too
        often.

    Raises:
        TypeError: ``main`` is not a module-level async function, ``args``
            does not pickle, or an option has the wrong type.
        ValueError: an option is out of range.
        RuntimeError: not called from the main thread.

    .. versionadded:: 0.1
    """
    target = _main_reference(main)
    try:
        pickle.dumps(tuple(args))
    except Exception as exc:
        raise TypeError(f"args must pickle to reach the workers: {exc}") from exc
    options = _PoolOptions(
        workers=_cpu_count() if workers is None else workers,
        max_restarts=max_restarts,
        restart_window=restart_window,
        restart_backoff=restart_backoff,
        max_restart_backoff=max_restart_backoff,
        shutdown_timeout=shutdown_timeout,
    )
    pool = _Pool(target, tuple(args), options, on_report)
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


@final
@attrs.frozen
class _Ended:
    """How one worker process ended."""

    pid: int
    code: int | None
    #: ``main`` returned before any stop request.
    finished: bool
    #: The signal sent to this worker alone, if it said it got one.
    signalled: str | None

    def describe(self) -> str:
        code = self.code
        if code is not None and code < 0:
            try:
                what = f"was killed by {signal.Signals(-code).name}"
            except ValueError:  # pragma: no cover
                what = f"was killed by signal {-code}"
        else:
            what = f"exited with code {code}"
        if self.signalled is not None:
            what += f" after {self.signalled}"
        return f"(pid {self.pid}) {what}"


@final
class _Pool:
    def __init__(
        self,
        target: tuple[str, str],
        args: tuple[Any, ...],
        options: _PoolOptions,
        on_report: ReportCallback | None,
    ) -> None:
        self._target = target
        self._args = args
        self._options = options
        self._on_report = on_report
        self._context = multiprocessing.get_context("spawn")
        # multiprocessing keeps its children in a set that start() and join()
        # change: one thread at a time.
        self._process_calls = trio.CapacityLimiter(1)
        self._stopping = trio.Event()
        self._forcing = trio.Event()
        self._failed = False

    async def run(self) -> int:
        with trio.open_signal_receiver(*SIGNALS) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_signals, signals)
                async with trio.open_nursery() as slots:
                    for index in range(self._options.workers):
                        slots.start_soon(self._run_slot, index)
                nursery.cancel_scope.cancel()
        return 1 if self._failed else 0

    async def _watch_signals(self, signals: Any) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if not self._stopping.is_set():
                logger.info("%s: stopping %d workers", name, self._options.workers)
                self._stopping.set()
            elif not self._forcing.is_set():
                logger.warning(
                    "second signal (%s): cancelling main in every worker", name
                )
                self._forcing.set()

    async def _run_slot(self, index: int) -> None:
        options = self._options
        restarts = 0
        ends: deque[float] = deque()
        while not self._stopping.is_set():
            ended = await self._run_process(index, restarts)
            if not self._stopping.is_set():
                if ended.finished and ended.code == 0:
                    logger.info("worker %d %s: main returned", index, ended.describe())
                    return
                # Was that the pool's own stop, arriving at the same moment?
                with trio.move_on_after(SETTLE):
                    await self._stopping.wait()
            if self._stopping.is_set():
                if ended.code != 0:
                    logger.error("worker %d %s", index, ended.describe())
                    self._failed = True
                return
            now = trio.current_time()
            ends.append(now)
            while ends[0] < now - options.restart_window:
                ends.popleft()
            if options.max_restarts is not None and len(ends) > options.max_restarts:
                logger.error(
                    "worker %d %s; it ended %d times within %.0f s, so every "
                    "worker is stopped",
                    index,
                    ended.describe(),
                    len(ends),
                    options.restart_window,
                )
                self._failed = True
                self._stopping.set()
                return
            delay = min(
                options.restart_backoff * 2 ** (len(ends) - 1),
                options.max_restart_backoff,
            )
            logger.warning(
                "worker %d %s; restarting it in %.1f s",
                index,
                ended.describe(),
                delay,
            )
            with trio.move_on_after(max(0.0, delay - SETTLE)):
                await self._stopping.wait()
            if self._stopping.is_set():
                self._failed |= ended.code != 0
                return
            restarts += 1

    async def _run_process(self, index: int, restarts: int) -> _Ended:
        parent_end, child_end = socket.socketpair()
        process = self._context.Process(
            target=worker_process,
            args=(
                self._target,
                self._args,
                index,
                self._options.workers,
                restarts,
                child_end,
                self._options.shutdown_timeout,
            ),
            name=f"trionet worker {index}",
        )
        control = open_control(parent_end)
        notes: dict[Note, str] = {}
        try:
            try:
                await trio.to_thread.run_sync(
                    process.start, limiter=self._process_calls
                )
            finally:
                child_end.close()
            logger.debug("worker %d started (pid %s)", index, process.pid)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_notes, control, index, notes)
                nursery.start_soon(self._tell_stop, control, process, index)
                await trio.lowlevel.wait_readable(process.sentinel)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await control.aclose()
                if process.pid is not None:
                    if process.exitcode is None:
                        # We are being cancelled (or crashed) with it alive.
                        process.kill()
                    await trio.to_thread.run_sync(
                        process.join, limiter=self._process_calls
                    )
        pid, code = process.pid, process.exitcode
        process.close()
        assert pid is not None
        return _Ended(pid, code, Note.FINISHED in notes, notes.get(Note.SIGNALLED))

    async def _read_notes(
        self, control: Connection, index: int, notes: dict[Note, str]
    ) -> None:
        try:
            async for line in control:
                parsed = parse_note(line)
                if parsed is None:
                    logger.warning("worker %d sent an unknown message", index)
                    continue
                note, payload = parsed
                notes[note] = payload
                if note is Note.REPORT:
                    self._report(index, payload)
        except ERRORS as exc:
            logger.debug("worker %d: control connection ended: %r", index, exc)

    def _report(self, index: int, payload: str) -> None:
        try:
            report = json.loads(payload)
        except ValueError:
            report = None
        if not isinstance(report, dict):
            logger.warning("worker %d sent a malformed report", index)
            return
        if self._on_report is not None:
            try:
                self._on_report(index, report)
            except Exception:
                logger.exception("on_report failed for worker %d", index)

    async def _tell_stop(self, control: Connection, process: Any, index: int) -> None:
        await self._stopping.wait()
        await send(control, Command.STOP)
        patience = self._options.shutdown_timeout + KILL_MARGIN
        with trio.move_on_after(patience):
            await self._forcing.wait()
            await send(control, Command.FORCE)
            await trio.sleep_forever()
        logger.error(
            "worker %d (pid %d) did not stop within %.1f s; killing it",
            index,
            process.pid,
            patience,
        )
        process.kill()
