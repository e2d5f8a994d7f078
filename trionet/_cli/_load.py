"""``trionet load``: drive an echo server and measure it.

How this works
--------------
Every connection (or, with ``--udp``, every connected UDP endpoint) runs a
*sender* and a *receiver*.  Message ``n`` of a connection starts with ``n``
in hexadecimal (as many digits as the size allows, at most 16) and is padded
with a fixed pattern of letters and digits, so it never contains the line
delimiter.  The sender keeps a copy of each message, with the time it was
sent, in a queue shared with the receiver, and may have ``--pipeline``
messages without an echo; the receiver checks each echo against the oldest
copy (intact and in order), records the round trip in a log-linear
histogram and frees a slot.  With ``--pipeline 1`` one task does both.

The senders share one budget (``--messages``, a total across connections)
or one deadline (``--duration``), and one token schedule for ``--rate``.  A
connection that fails stops and counts one error under its close reason (or
exception type); the others go on.  A TCP echo that does not come within
``--timeout`` counts as TIMEOUT and ends that connection.  A UDP echo that
does not come within ``--timeout`` counts as ``lost`` and frees its slot, so
a lossy path slows a run down but never hangs it.  Over everything sits the
hard ``--time-limit``: whatever still runs then is stopped and counted as
``time_limit``.
"""

from __future__ import annotations

import argparse
import math
import socket
import sys
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from functools import partial

import attrs
import trio

import trionet

from ._common import (
    EXIT_RUNTIME,
    CliError,
    Parser,
    UsageError,
    parse_duration,
    parse_host_port,
    parse_rate,
    positive_float,
    positive_int,
)
from ._histogram import LogLinearHistogram

if sys.version_info < (3, 11):  # pragma: no cover
    pass
from ._output import Progress, open_progress, print_table

__all__ = ["LoadResult", "LoadSpec", "add_parser", "run", "run_load", "validate"]

#: File descriptors kept back from the open-file limit for everything else.
FD_MARGIN = 32
#: Largest UDP payload over IPv4 (the load tool binds IPv4 or IPv6 by target).
UDP_MAX_SIZE = 65507
#: The most bytes a pipelined sender joins into one send.
MAX_BATCH_BYTES = 256 * 1024
#: Connections opened at once while connecting.
CONNECT_CONCURRENCY = 64
#: Seconds allowed for each connect.
CONNECT_TIMEOUT = 10.0
#: Seconds an echo may take, by default (TCP: the connection fails with
#: TIMEOUT; UDP: the datagram counts as lost).
DEFAULT_TCP_TIMEOUT = 10.0
DEFAULT_UDP_TIMEOUT = 1.0
#: Hard bound on a ``--messages`` run, by default.
DEFAULT_TIME_LIMIT = 300.0
#: Extra seconds a ``--duration`` run may take to collect its last echoes.
DURATION_SLACK = 30.0

_PATTERN = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


@attrs.frozen(kw_only=True)
class LoadSpec:
    """One load run: what to send, where, how much and how fast."""

    host: str
    port: int
    connections: int = 50
    #: Total messages across all connections (None with ``duration``).
    messages: int | None = 10000
    #: Seconds to send for (None with ``messages``).
    duration: float | None = None
    size: int = 64
    #: "line" or "frame" (ignored with ``udp``).
    framing: str = "line"
    pipeline: int = 1
    #: Messages per second across all connections (None: as fast as possible).
    rate: float | None = None
    udp: bool = False
    #: Seconds an echo may take (None: the default for TCP or UDP).
    timeout: float | None = None
    #: Hard bound on the whole run in seconds (None: the default).
    time_limit: float | None = None

    @property
    def reply_timeout(self) -> float:
        """The per-message timeout in effect."""
        if self.timeout is not None:
            return self.timeout
        return DEFAULT_UDP_TIMEOUT if self.udp else DEFAULT_TCP_TIMEOUT

    @property
    def hard_limit(self) -> float:
        """The overall time limit in effect."""
        if self.time_limit is not None:
            return self.time_limit
        if self.duration is not None:
            return self.duration + self.reply_timeout + DURATION_SLACK
        return DEFAULT_TIME_LIMIT

    @property
    def framing_name(self) -> str:
        """How messages are delimited: "line", "frame" or "datagram"."""
        return "datagram" if self.udp else self.framing

    @property
    def target(self) -> str:
        """The server's address as HOST:PORT."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@attrs.frozen(kw_only=True)
class LoadResult:
    """What a run measured."""

    spec: LoadSpec
    #: Messages whose echo came back intact and in order.
    messages: int
    #: Failures by close reason, exception type, "mismatch", "lost" or "time_limit".
    errors: dict[str, int]
    elapsed: float
    latency: LogLinearHistogram

    @property
    def messages_per_s(self) -> float:
        """Echoed messages per second."""
        return self.messages / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        """Echoed payload in megabytes (10**6 bytes) per second, one way."""
        return self.messages_per_s * self.spec.size / 1e6

    def percentiles(self) -> dict[str, float | None]:
        """p50, p90, p99 and max round-trip time in microseconds."""
        hist = self.latency
        return {
            "p50": hist.percentile(50),
            "p90": hist.percentile(90),
            "p99": hist.percentile(99),
            "max": None if hist.max is None else float(hist.max),
        }

    def as_json(self) -> dict[str, object]:
        """The machine-readable result that ``--json`` prints."""
        spec = self.spec
        return {
            "target": spec.target,
            "transport": "udp" if spec.udp else "tcp",
            "connections": spec.connections,
            "messages": self.messages,
            "errors": dict(sorted(self.errors.items())),
            "elapsed_s": round(self.elapsed, 6),
            "messages_per_s": round(self.messages_per_s, 1),
            "mb_per_s": round(self.mb_per_s, 3),
            "latency_us": {
                name: None if value is None else round(value, 1)
                for name, value in self.percentiles().items()
            },
            "framing": spec.framing_name,
            "size": spec.size,
            "pipeline": spec.pipeline,
        }


# ------------------------------------------------------------------ checks


def size_limit(spec: LoadSpec) -> tuple[int, str]:
    """The largest message size the run's framing allows, and where it comes from."""
    if spec.udp:
        return UDP_MAX_SIZE, "the largest UDP payload over IPv4"
    if spec.framing == "line":
        return trionet.Lines().max_length, "Lines().max_length"
    return trionet.Frames().max_size, "Frames().max_size"


def open_file_limit() -> int | None:
    """The soft RLIMIT_NOFILE, or None where it cannot be read."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Unix
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    return int(soft)


def validate(spec: LoadSpec) -> None:
    """Refuse a run that cannot work, before any connection is made.

    Raises:
        UsageError: the size is over the framing's limit, or there are more
            connections than the open-file limit allows.
    """
    limit, source = size_limit(spec)
    if spec.size > limit:
        raise UsageError(
            f"--size {spec.size} is over the {spec.framing_name} limit of "
            f"{limit} bytes ({source})"
        )
    files = open_file_limit()
    if files is not None and spec.connections > files - FD_MARGIN:
        raise UsageError(
            f"--connections {spec.connections} is more than the open-file limit "
            f"allows: the limit is {files} (ulimit -n), so at most "
            f"{max(0, files - FD_MARGIN)} connections"
        )


# ----------------------------------------------------------------- the run


def message_maker(size: int) -> Callable[[int], bytes]:
    """A function making message ``n``: ``n`` in hex, then a fixed filler.

    The result never contains ``b"\\n"``.
    """
    width = min(size, 16)
    modulus = 16**width
    filler = (_PATTERN * (size // len(_PATTERN) + 1))[width:size]

    def make(seq: int) -> bytes:
        return b"%0*x" % (width, seq % modulus) + filler

    return make


class _RateLimiter:
    """A schedule of send times ``1 / rate`` apart, shared by every sender."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._next: float | None = None

    async def wait(self) -> None:
        now = trio.current_time()
        # A sender that fell behind does not earn a burst to catch up with.
        if self._next is None or self._next < now - 0.1:
            self._next = now
        when = self._next
        self._next += self._interval
        if when > now:
            await trio.sleep_until(when)


class _Run:
    """State shared by every connection of one run."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.make = message_maker(spec.size)
        self.latency = LogLinearHistogram()
        self.errors: Counter[str] = Counter()
        self.completed = 0
        self.budget = spec.messages
        self.deadline = math.inf
        self.started: float | None = None
        self.finished: float | None = None
        #: Connections whose worker ended (normally or by a counted failure).
        self.ended = 0
        self.limiter = _RateLimiter(spec.rate) if spec.rate else None

    def may_send(self) -> bool:
        """Take one message from the budget; False once the run is over."""
        if trio.current_time() >= self.deadline:
            return False
        if self.budget is not None:
            if self.budget <= 0:
                return False
            self.budget -= 1
        return True

    def done(self, sent_at: float) -> None:
        """Count one intact echo of a message sent at ``sent_at``."""
        now = trio.current_time()
        self.latency.record(max(0, round((now - sent_at) * 1e6)))
        self.completed += 1

    def count_error(self, error: BaseException | str) -> None:
        """Count one error under its name, close reason or exception type."""
        if isinstance(error, str):
            name = error
        elif isinstance(error, trionet.ConnectionClosed):
            name = error.reason.name
        else:
            name = type(error).__name__
        self.errors[name] += 1


class _Failed(Exception):
    """Ends one connection; the error was already counted."""


#: What ends a connection: counted under its close reason or type.
_CONNECTION_ERRORS = (trionet.ConnectionClosed, trionet.ProtocolError, OSError)


class _Worker:
    """Runs a connection's sender and receiver; the first failure ends both."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.failed = False

    def fail(self, error: BaseException | str) -> _Failed:
        """Count ``error`` (only the first of this connection) and stop."""
        if not self.failed:
            self.failed = True
            self.run.count_error(error)
        return _Failed()

    async def guard(
        self, scope: trio.CancelScope, task: Callable[[], Awaitable[None]]
    ) -> None:
        """Run ``task``; a failure is counted and cancels ``scope``."""
        try:
            await task()
        except _Failed:
            scope.cancel()
        except _CONNECTION_ERRORS as exc:
            self.fail(exc)
            scope.cancel()


async def _tcp_connection(run: _Run, conn: trionet.Connection) -> None:
    worker = _Worker(run)
    async with conn:
        if run.spec.pipeline == 1:
            # One task: nothing else to cancel when it fails.
            await worker.guard(trio.CancelScope(), partial(_ping_pong, worker, conn))
        else:
            await _pipelined(worker, conn)
    run.ended += 1


async def _ping_pong(worker: _Worker, conn: trionet.Connection) -> None:
    run = worker.run
    timeout = run.spec.reply_timeout
    limiter = run.limiter
    seq = 0
    # One cancel scope for the whole loop: its deadline follows the message.
    with trio.CancelScope() as scope:
        while run.may_send():
            if limiter is not None:
                scope.deadline = math.inf
                await limiter.wait()
            message = run.make(seq)
            seq += 1
            sent_at = trio.current_time()
            scope.deadline = sent_at + timeout
            await conn.send(message)
            if await conn.receive() != message:
                raise worker.fail("mismatch")
            run.done(sent_at)
    if scope.cancelled_caught:
        raise worker.fail("TIMEOUT")


async def _pipelined(worker: _Worker, conn: trionet.Connection) -> None:
    """A sender and a receiver; what is in flight goes between them in batches.

    The sender takes every free slot at once (up to ``MAX_BATCH_BYTES``) and
    writes the messages in one send; without this, one system call per
    message would cost the client more than the server it measures.
    """
    run = worker.run
    spec = run.spec
    timeout = spec.reply_timeout
    framing = conn.framing
    assert framing is not None
    slots = trio.Semaphore(spec.pipeline)
    most = max(1, min(spec.pipeline, MAX_BATCH_BYTES // spec.size))
    # Never full: each batch holds at least one slot.
    in_flight_send, in_flight = trio.open_memory_channel[tuple[list[bytes], float]](
        spec.pipeline
    )

    async def receive() -> None:
        with trio.CancelScope() as scope:
            async for batch, sent_at in in_flight:
                scope.deadline = sent_at + timeout
                for message in batch:
                    if await conn.receive() != message:
                        raise worker.fail("mismatch")
                    run.done(sent_at)
                    slots.release()
        if scope.cancelled_caught:
            raise worker.fail("TIMEOUT")

    async def send() -> None:
        encode = framing.encode
        limiter = run.limiter
        seq = 0
        async with in_flight_send:
            while True:
                await slots.acquire()
                taken = 1
                while limiter is None and taken < most:
                    try:
                        slots.acquire_nowait()
                    except trio.WouldBlock:
                        break
                    taken += 1
                batch: list[bytes] = []
                while len(batch) < taken and run.may_send():
                    batch.append(run.make(seq))
                    seq += 1
                for _ in range(taken - len(batch)):
                    slots.release()
                if not batch:
                    return
                if limiter is not None:
                    await limiter.wait()
                in_flight_send.send_nowait((batch, trio.current_time()))
                await conn.send_all(b"".join(map(encode, batch)))
                if len(batch) < taken:
                    return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.guard, nursery.cancel_scope, receive)
        nursery.start_soon(worker.guard, nursery.cancel_scope, send)


class _Datagram:
    """One datagram in flight."""

    __slots__ = ("message", "send_failed", "sent_at")

    def __init__(self, message: bytes, sent_at: float) -> None:
        self.message = message
        self.sent_at = sent_at
        self.send_failed = False


async def _udp_endpoint(run: _Run, endpoint: trionet.Datagram) -> None:
    """One UDP "connection": like _pipelined, but a late echo is a lost message.

    Echoes are matched against every datagram in flight, so one that
    overtook another is not a mismatch; the ones it overtook count as lost
    once their timeout passes (or at once, when a later echo arrived).
    """
    spec = run.spec
    timeout = spec.reply_timeout
    worker = _Worker(run)
    slots = trio.Semaphore(spec.pipeline)
    in_flight_send, in_flight = trio.open_memory_channel[_Datagram](spec.pipeline)
    recently_lost: deque[bytes] = deque(maxlen=max(64, 2 * spec.pipeline))

    def lose(item: _Datagram) -> None:
        if not item.send_failed:  # a failed send was counted already
            run.count_error("lost")
            recently_lost.append(item.message)
        slots.release()

    async def receive() -> None:
        pending: deque[_Datagram] = deque()
        while True:
            if not pending:
                try:
                    pending.append(await in_flight.receive())
                except trio.EndOfChannel:
                    return
            data = None
            with trio.move_on_at(pending[0].sent_at + timeout):
                try:
                    data = await endpoint.receive()
                except trionet.DatagramError as exc:
                    run.count_error(exc)
                    continue
            while True:  # collect what was sent meanwhile
                try:
                    pending.append(in_flight.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            if data is None:
                lose(pending.popleft())
                continue
            match = next(
                (i for i, item in enumerate(pending) if item.message == data), None
            )
            if match is None:
                if data not in recently_lost:
                    run.count_error("mismatch")
                continue
            for _ in range(match):
                lose(pending.popleft())
            run.done(pending.popleft().sent_at)
            slots.release()

    async def send() -> None:
        async with in_flight_send:
            seq = 0
            limiter = run.limiter
            while True:
                await slots.acquire()
                if not run.may_send():
                    break
                if limiter is not None:
                    await limiter.wait()
                message = run.make(seq)
                seq += 1
                item = _Datagram(message, trio.current_time())
                in_flight_send.send_nowait(item)
                try:
                    await endpoint.send(message)
                except trionet.DatagramError as exc:
                    item.send_failed = True
                    run.count_error(exc)

    async with endpoint, trio.open_nursery() as nursery:
        nursery.start_soon(worker.guard, nursery.cancel_scope, receive)
        nursery.start_soon(worker.guard, nursery.cancel_scope, send)
    run.ended += 1


async def _connect_tcp(spec: LoadSpec, stack: AsyncExitStack) -> trionet.Connection:
    framing: trionet.Framing = (
        trionet.Lines() if spec.framing == "line" else trionet.Frames()
    )
    connect = trionet.connect_tcp(
        spec.host, spec.port, framing=framing, connect_timeout=CONNECT_TIMEOUT
    )
    return await stack.enter_async_context(connect)


async def _open_udp(spec: LoadSpec, stack: AsyncExitStack) -> trionet.Datagram:
    try:
        infos = await trio.socket.getaddrinfo(
            spec.host, spec.port, type=socket.SOCK_DGRAM
        )
    except OSError as exc:
        raise trionet.ConnectError(
            trionet.CloseReason.ERROR, f"cannot resolve {spec.host}: {exc}"
        ) from exc
    family, *_, address = infos[0]
    local = "::" if family == socket.AF_INET6 else "0.0.0.0"
    remote = (str(address[0]), int(address[1]))
    return await stack.enter_async_context(
        trionet.open_udp(local_host=local, remote=remote)
    )


async def _probe_udp(spec: LoadSpec, endpoint: trionet.Datagram) -> None:
    """Check that something echoes at the target before the run starts."""
    probe = b"?" * spec.size
    with trio.move_on_after(spec.reply_timeout):
        try:
            await endpoint.send(probe)
            while await endpoint.receive() != probe:
                pass
            return
        except trionet.DatagramError as exc:
            raise CliError(
                f"no UDP echo from {spec.target}: {exc.strerror or exc}"
            ) from exc
    raise CliError(
        f"no UDP echo from {spec.target} within {spec.reply_timeout:g} s "
        "(is 'trionet echo --udp' running there?)"
    )


Opened = trionet.Connection | trionet.Datagram


async def _open_all(spec: LoadSpec, run: _Run, stack: AsyncExitStack) -> list[Opened]:
    """Open every connection; the first failing is fatal, later ones count."""
    opener: Callable[[LoadSpec, AsyncExitStack], Awaitable[Opened]]
    opener = _open_udp if spec.udp else _connect_tcp
    try:
        first = await opener(spec, stack)
    except OSError as exc:  # ConnectError (it names the OS's reason), or a UDP bind
        raise CliError(str(exc)) from exc
    if isinstance(first, trionet.Datagram):
        await _probe_udp(spec, first)
    opened: list[Opened] = [first]
    limiter = trio.CapacityLimiter(CONNECT_CONCURRENCY)

    async def open_one() -> None:
        async with limiter:
            try:
                opened.append(await opener(spec, stack))
            except OSError as exc:
                run.count_error(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(spec.connections - 1):
            nursery.start_soon(open_one)
    return opened


async def run_load(spec: LoadSpec, progress: Progress | None = None) -> LoadResult:
    """Run ``spec`` and measure it.

    Raises:
        CliError: the first connection could not be made (nothing listening),
            or a UDP target does not echo.
    """
    run = _Run(spec)
    opened: list[Opened] = []
    async with AsyncExitStack() as stack:
        with trio.move_on_after(spec.hard_limit) as limit:
            opened = await _open_all(spec, run, stack)
            run.started = trio.current_time()
            if spec.duration is not None:
                run.deadline = run.started + spec.duration
            async with trio.open_nursery() as nursery:
                if progress is not None:
                    nursery.start_soon(_report_progress, run, progress)
                async with trio.open_nursery() as workers:
                    for resource in opened:
                        if isinstance(resource, trionet.Datagram):
                            workers.start_soon(_udp_endpoint, run, resource)
                        else:
                            workers.start_soon(_tcp_connection, run, resource)
                run.finished = trio.current_time()
                nursery.cancel_scope.cancel()
    if run.started is None:
        raise CliError(
            f"could not open {spec.connections} connections to {spec.target} "
            f"within the time limit of {spec.hard_limit:g} s"
        )
    if limit.cancelled_caught and run.finished is None:
        run.errors["time_limit"] += len(opened) - run.ended
        run.finished = trio.current_time()
    assert run.finished is not None
    return LoadResult(
        spec=spec,
        messages=run.completed,
        errors=dict(run.errors),
        elapsed=run.finished - run.started,
        latency=run.latency,
    )


async def _report_progress(run: _Run, progress: Progress) -> None:
    spec = run.spec
    assert run.started is not None
    while True:
        if spec.duration is not None:
            done = min(spec.duration, trio.current_time() - run.started)
            progress.update(
                done, spec.duration, run.completed, sum(run.errors.values())
            )
        else:
            assert spec.messages is not None
            progress.update(
                run.completed, spec.messages, run.completed, sum(run.errors.values())
            )
        await trio.sleep(progress.interval)


# ------------------------------------------------------------ the command


def add_parser(commands: argparse._SubParsersAction[Parser]) -> None:
    """Add the ``load`` command to ``commands``."""
    parser = commands.add_parser(
        "load",
        help="drive load at an echo server and measure it",
        description=(
            "Open connections to an echo server, send messages and check that "
            "every echo comes back intact and in order.  Reports messages/s, "
            "MB/s, latency percentiles and errors."
        ),
    )
    parser.add_argument(
        "target",
        type=parse_host_port,
        metavar="HOST:PORT",
        help="the echo server (IPv6 in brackets: [::1]:8000)",
    )
    parser.add_argument(
        "--connections",
        "-c",
        type=positive_int,
        default=50,
        metavar="N",
        help="connections (UDP: endpoints) to open (50)",
    )
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument(
        "--messages",
        "-n",
        type=positive_int,
        default=None,
        metavar="N",
        help="messages to send in total, across all connections (10000)",
    )
    amount.add_argument(
        "--duration",
        "-d",
        type=parse_duration,
        default=None,
        metavar="TIME",
        help="send for this long instead, e.g. 10s, 500ms, 2m",
    )
    parser.add_argument(
        "--size",
        "-s",
        type=positive_int,
        default=64,
        metavar="BYTES",
        help="bytes per message, at least 1 (64)",
    )
    parser.add_argument(
        "--framing",
        choices=["line", "frame"],
        default=None,
        help="line: newline-terminated; frame: 4-byte length prefix (line)",
    )
    parser.add_argument(
        "--pipeline",
        "-p",
        type=positive_int,
        default=1,
        metavar="N",
        help="messages in flight per connection; 1 is ping-pong (1)",
    )
    parser.add_argument(
        "--rate",
        type=parse_rate,
        default=None,
        metavar="N/s",
        help="at most this many messages per second in total (no limit)",
    )
    parser.add_argument(
        "--udp", action="store_true", help="send UDP datagrams to 'trionet echo --udp'"
    )
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=None,
        metavar="SECONDS",
        help="how long an echo may take: TCP counts TIMEOUT and drops the "
        "connection, UDP counts the datagram lost (TCP 10, UDP 1)",
    )
    parser.add_argument(
        "--time-limit",
        type=positive_float,
        default=None,
        metavar="SECONDS",
        help="hard bound on the whole run "
        "(300; with --duration: duration + timeout + 30)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of a table"
    )
    parser.set_defaults(run=run)


def spec_from_args(args: argparse.Namespace) -> LoadSpec:
    """The :class:`LoadSpec` the command-line options describe."""
    host, port = args.target
    if args.udp and args.framing is not None:
        raise UsageError("--framing does not apply to --udp: a datagram is a message")
    messages = args.messages
    if messages is None and args.duration is None:
        messages = 10000
    return LoadSpec(
        host=host,
        port=port,
        connections=args.connections,
        messages=messages,
        duration=args.duration,
        size=args.size,
        framing=args.framing or "line",
        pipeline=args.pipeline,
        rate=args.rate,
        udp=args.udp,
        timeout=args.timeout,
        time_limit=args.time_limit,
    )


def run(args: argparse.Namespace) -> int:
    """``trionet load``: exit code 0 when every message was echoed, else 1."""
    spec = spec_from_args(args)
    validate(spec)

    async def main() -> LoadResult:
        total_label = "s" if spec.duration is not None else "messages"
        with open_progress(
            f"load {spec.target}", total_label, json=args.json
        ) as progress:
            return await run_load(spec, progress)

    result = trio.run(main)
    if args.json:
        import json

        print(json.dumps(result.as_json()), flush=True)
    else:
        print_result(result)
    if result.errors:
        return EXIT_RUNTIME
    return 0


def _number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def print_result(result: LoadResult) -> None:
    """Print one run's result as a small table on stdout."""
    spec = result.spec
    p = result.percentiles()
    errors = ", ".join(f"{name} {n}" for name, n in sorted(result.errors.items()))
    transport = "udp" if spec.udp else "tcp"
    rate = f", rate {spec.rate:g}/s" if spec.rate else ""
    print(
        f"trionet load {spec.target}: {transport}, {spec.framing_name} framing, "
        f"{spec.connections} connections, {spec.size} B messages, "
        f"pipeline {spec.pipeline}{rate}",
        flush=True,
    )
    rows = [
        ["messages", f"{result.messages:,} in {result.elapsed:.2f} s"],
        [
            "throughput",
            f"{_number(result.messages_per_s)} msg/s, {result.mb_per_s:.2f} MB/s",
        ],
        [
            "latency (us)",
            f"p50 {_number(p['p50'])}  p90 {_number(p['p90'])}  "
            f"p99 {_number(p['p99'])}  max {_number(p['max'])}",
        ],
        ["errors", errors or "none"],
    ]
    print_table(None, rows, header=False)
