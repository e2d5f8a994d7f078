"""reconnecting: an async iterator of client connections that connects again
whenever one ends.

How this works
--------------
There is no background task: every connection attempt happens inside
``__anext__``, in the caller's task, so every error reaches the caller and
cancelling the caller stops everything.  ``__anext__`` first closes the
connection it handed out last (if the body did not), records how it ended,
then tries to connect until it succeeds, waiting between attempts:

* the wait before an attempt is "full jitter" exponential backoff: a random
  time between 0 and ``min(backoff_max, backoff_initial * backoff_factor **
  (n - 1))`` seconds, where ``n`` counts the failed attempts -- and the
  connections that ended within ``reset_after`` seconds -- since the last
  connection that lasted at least that long.  So the first attempt, and the
  first one after a long-lived connection, go at once; a server that keeps
  refusing, or that accepts and hangs up at once, is asked less and less
  often, never more than ``backoff_max`` apart.
* ``max_attempts`` (failed attempts in a row) and ``reconnect_timeout``
  (seconds without a connection) end the iteration with a
  :class:`ConnectError` whose cause is the last failure.

Cleanup.  ``async with`` closes the current connection gracefully when the
block ends, however it ends.  A bare ``async for`` that is left by ``break``
or an exception cannot be told; the iterator then closes the connection at
once (no flush, no TLS close_notify) when it is dropped, which CPython does
as soon as the loop is left.

Logging, on the ``"trionet"`` logger: the first failure after a connection
(or at the start) at WARNING; further failures at DEBUG, with a summary at
INFO at most every ``LOG_INTERVAL`` seconds; each connection's end, with its
close reason, at INFO.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import ssl
from collections import Counter
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn

import attrs
import trio

from ._client import connect_tcp, connect_unix
from ._codec import Framing
from ._connection import Connection
from ._exceptions import CloseReason, ConnectError
from ._options import non_negative, positive, positive_int, positive_or_none
from ._util import format_address

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["Reconnecting", "ReconnectingStatistics", "reconnecting"]

logger = logging.getLogger("trionet")

#: Seconds between two INFO summaries of failed attempts in a row.
LOG_INTERVAL = 60.0

#: Draws the jittered wait: ``_uniform(0, ceiling)`` (tests replace it).
_uniform = random.uniform


def _failed_attempts(count: int) -> str:
    return f"{count} failed attempt{'' if count == 1 else 's'}"


def _optional_positive_int(instance: object, attribute: Any, value: int | None) -> None:
    if value is not None:
        positive_int(instance, attribute, value)


def _at_least_one(instance: object, attribute: Any, value: float) -> None:
    positive(instance, attribute, value)
    if not value >= 1:
        raise ValueError(f"{attribute.name} must be >= 1, not {value!r}")


@attrs.frozen(kw_only=True)
class _Policy:
    """The backoff and the limits, validated."""

    connect_timeout: float = attrs.field(default=10.0, validator=positive)
    backoff_initial: float = attrs.field(default=0.1, validator=positive)
    backoff_factor: float = attrs.field(default=2.0, validator=_at_least_one)
    backoff_max: float = attrs.field(default=30.0, validator=positive)
    reset_after: float = attrs.field(default=5.0, validator=non_negative)
    max_attempts: int | None = attrs.field(
        default=None, validator=_optional_positive_int
    )
    reconnect_timeout: float | None = attrs.field(
        default=None, validator=positive_or_none
    )

    def ceiling(self, streak: int) -> float:
        """The longest wait after ``streak`` bad outcomes in a row (>= 1)."""
        wait = self.backoff_initial
        for _ in range(streak - 1):
            if wait >= self.backoff_max:
                break
            wait *= self.backoff_factor
        return min(wait, self.backoff_max)


@attrs.frozen(kw_only=True)
class ReconnectingStatistics:
    """A snapshot of a :class:`Reconnecting`'s counters.

    .. versionadded:: 0.1
    """

    #: Connection attempts made.
    attempts: int
    #: Attempts that failed.
    failures: int
    #: Connections made (attempts that succeeded).
    connections: int
    #: Failed attempts since the last connection was made (or since the start).
    consecutive_failures: int
    #: Whether a connection handed out is open now.
    connected: bool
    #: Connections ended, by close reason.
    closed: Mapping[CloseReason, int]


class Reconnecting:
    """An async iterator of client connections that connects again whenever
    one ends.  Get one from :func:`reconnecting`.

    Each iteration closes the previous connection (if still open), connects
    -- waiting between failed attempts -- and yields the open
    :class:`Connection`.  Use it in ``async with`` so that the connection
    is closed gracefully however the block ends::

        async with trionet.reconnecting("127.0.0.1", 8000) as connections:
            async for conn in connections:
                ...
            print(connections.statistics())

    It is also an async context manager and has :meth:`aclose`; after
    either, iteration stops.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        where: str,
        connect: _Connect,
        policy: _Policy,
    ) -> None:
        self._where = where
        self._connect = connect
        self._policy = policy
        self._conn: Connection | None = None
        self._connected_at = 0.0
        self._ended = False
        # Bad outcomes (failed attempts, short-lived connections) in a row:
        # the backoff's exponent.
        self._streak = 0
        self._failed_in_row = 0
        self._down_since: float | None = None
        self._attempts = 0
        self._failures = 0
        self._connections = 0
        self._closed: Counter[CloseReason] = Counter()
        self._last_failure: ConnectError | None = None
        self._next_summary = -math.inf

    def __repr__(self) -> str:
        state = "connected" if self._conn is not None else "not connected"
        return f"<trionet.Reconnecting {self._where} {state}>"

    @property
    def connection(self) -> Connection | None:
        """The connection handed out last, until the next iteration closes
        it (it may have been closed meanwhile); None before the first."""
        return self._conn

    @property
    def last_failure(self) -> ConnectError | None:
        """Why the most recent failed attempt failed (None if none has)."""
        return self._last_failure

    def statistics(self) -> ReconnectingStatistics:
        """A snapshot of the counters."""
        conn = self._conn
        return ReconnectingStatistics(
            attempts=self._attempts,
            failures=self._failures,
            connections=self._connections,
            consecutive_failures=self._failed_in_row,
            connected=conn is not None and conn.close_reason is None,
            closed=dict(self._closed),
        )

    # -------------------------------------------------------------- iterating

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Connection:
        """Close the previous connection, then connect (again).

        Raises:
            StopAsyncIteration: after :meth:`aclose` (or the end of the
                ``async with`` block).
            ConnectError: ``max_attempts`` or ``reconnect_timeout`` ran out;
                the last failure is the ``__cause__``.
        """
        await self._end_current()
        if self._ended:
            raise StopAsyncIteration
        policy = self._policy
        now = trio.current_time()
        if self._down_since is None:
            self._down_since = now
        deadline = math.inf
        if policy.reconnect_timeout is not None:
            deadline = self._down_since + policy.reconnect_timeout
        while True:
            wait = 0.0
            if self._streak:
                wait = _uniform(0, policy.ceiling(self._streak))
            left = deadline - trio.current_time()
            if wait >= left and self._failed_in_row:
                # The next attempt would start too late: give up now.
                self._give_up(self._out_of_time)
            await trio.sleep(min(wait, max(0.0, left)))
            self._attempts += 1
            timeout = min(policy.connect_timeout, deadline - trio.current_time())
            try:
                conn = await self._connect(max(0.0, timeout))
            except ConnectError as exc:
                self._failed(exc)
                if trio.current_time() >= deadline:
                    self._give_up(self._out_of_time)
                continue
            self._connected(conn)
            return conn

    def _failed(self, exc: ConnectError) -> None:
        """Count a failed attempt and log it; give up after ``max_attempts``."""
        now = trio.current_time()
        assert self._down_since is not None
        self._failures += 1
        self._failed_in_row += 1
        self._streak += 1
        self._last_failure = exc
        if self._failed_in_row == 1:
            logger.warning("%s; trying again", exc)
            self._next_summary = now + LOG_INTERVAL
        elif now >= self._next_summary:
            logger.info(
                "still no connection to %s: %d failed attempts in %.1f s; last: %s",
                self._where,
                self._failed_in_row,
                now - self._down_since,
                exc,
            )
            self._next_summary = now + LOG_INTERVAL
        else:
            logger.debug("%s (attempt %d)", exc, self._failed_in_row)
        limit = self._policy.max_attempts
        if limit is not None and self._failed_in_row >= limit:
            self._give_up(f"max_attempts ({limit}) reached")

    @property
    def _out_of_time(self) -> str:
        seconds = self._policy.reconnect_timeout
        return f"no connection within reconnect_timeout ({seconds:g} s)"

    def _give_up(self, why: str) -> NoReturn:
        """End the iteration with a ConnectError caused by the last failure."""
        last = self._last_failure
        assert last is not None and self._down_since is not None
        self._ended = True
        down = trio.current_time() - self._down_since
        raise ConnectError(
            last.reason,
            f"gave up connecting to {self._where}: {why} "
            f"({_failed_attempts(self._failed_in_row)} in {down:.1f} s); "
            f"last: {last}",
        ) from last

    def _connected(self, conn: Connection) -> None:
        now = trio.current_time()
        self._conn = conn
        self._connected_at = now
        self._connections += 1
        if self._failed_in_row:
            assert self._down_since is not None
            logger.info(
                "connected to %s after %s (%.1f s)",
                self._where,
                _failed_attempts(self._failed_in_row),
                now - self._down_since,
            )
        else:
            logger.debug("connected to %s", self._where)
        self._failed_in_row = 0
        self._down_since = None

    async def _end_current(self) -> None:
        """Close the connection handed out last (if the body did not) and
        record how it ended."""
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        try:
            await conn.aclose()
        finally:
            now = trio.current_time()
            lived = now - self._connected_at
            reason = conn.close_reason or CloseReason.CLOSED_BY_HOST
            self._closed[reason] += 1
            self._streak = 0 if lived >= self._policy.reset_after else self._streak + 1
            self._down_since = now
            logger.info(
                "connection to %s ended after %.1f s: %s",
                self._where,
                lived,
                reason.name,
            )

    # ----------------------------------------------------------------- ending

    async def aclose(self) -> None:
        """Close the current connection gracefully (flushing what was sent;
        bounded as :meth:`Connection.aclose` is) and end the iteration."""
        self._ended = True
        await self._end_current()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # A bare ``async for`` left by break or an exception: close the
        # connection at once rather than leave its socket open.
        conn = self._conn
        if conn is not None and conn.close_reason is None:
            # (Outside trio this fails; the socket's own finalizer closes it.)
            with contextlib.suppress(Exception):
                conn._close_now(CloseReason.CLOSED_BY_HOST)


class _Connect:
    """One connection attempt with a given timeout (TCP or UNIX)."""

    def __init__(
        self,
        host: str | None,
        port: int | None,
        path: str | None,
        framing: Framing | None,
        ssl_context: ssl.SSLContext | None,
        server_hostname: str | None,
        require_close_notify: bool,
        local_address: str | None,
    ) -> None:
        self._require_close_notify = require_close_notify
        self._host = host
        self._port = port
        self._path = path
        self._framing = framing
        self._ssl_context = ssl_context
        self._server_hostname = server_hostname
        self._local_address = local_address

    async def __call__(self, connect_timeout: float) -> Connection:
        if self._path is not None:
            return await connect_unix(
                self._path,
                framing=self._framing,
                ssl_context=self._ssl_context,
                server_hostname=self._server_hostname,
                connect_timeout=connect_timeout,
                require_close_notify=self._require_close_notify,
            )
        assert self._host is not None and self._port is not None
        return await connect_tcp(
            self._host,
            self._port,
            framing=self._framing,
            ssl_context=self._ssl_context,
            server_hostname=self._server_hostname,
            connect_timeout=connect_timeout,
            require_close_notify=self._require_close_notify,
            local_address=self._local_address,
        )


def reconnecting(
    host: str | None = None,
    port: int | None = None,
    *,
    path: str | os.PathLike[str] | None = None,
    framing: Framing | None = None,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    connect_timeout: float = 10.0,
    require_close_notify: bool = False,
    local_address: str | None = None,
    backoff_initial: float = 0.1,
    backoff_factor: float = 2.0,
    backoff_max: float = 30.0,
    reset_after: float = 5.0,
    max_attempts: int | None = None,
    reconnect_timeout: float | None = None,
) -> Reconnecting:
    """Connections to one server, one after another: connect, hand the
    connection to the loop body, and when the body is done with it (the
    connection ended, or the body moved on), close it and connect again.

    ::

        async for conn in trionet.reconnecting("127.0.0.1", 8000, framing=lines):
            async for line in conn:     # one connection's life
                ...
            # the server went away: the loop connects again

    No task runs in the background: each attempt happens in the loop's own
    ``async for``, so errors reach the caller and cancelling the caller
    stops it.  Between failed attempts it waits a random time (full jitter)
    below a bound that starts at ``backoff_initial`` seconds and is
    multiplied by ``backoff_factor`` after each failure, up to
    ``backoff_max``.  The first attempt goes at once, and so does the first
    one after a connection that lasted at least ``reset_after`` seconds; a
    connection that ended sooner counts as a failure for the backoff, so a
    server that accepts and hangs up at once is not hammered.

    By default it never gives up.  ``max_attempts`` (failed attempts in a
    row) and ``reconnect_timeout`` (seconds without a connection) make the
    loop raise :class:`ConnectError` instead, with the last failure as its
    ``__cause__``.  Errors other than failing to connect -- a wrong
    ``ssl_context``, say -- are raised at once.

    Use it in ``async with`` for a graceful close of the current connection
    however the block ends (a bare ``async for`` left by ``break`` or an
    exception closes it at once, without flushing, when the iterator is
    dropped).  The object also counts attempts, failures and the close
    reason of every connection: :meth:`Reconnecting.statistics`.

    For :mod:`trionet.channels`, wrap each connection::

        async with trionet.reconnecting(path="/run/app.sock") as connections:
            async for conn in connections:
                async with trionet.channels.ChannelConnection(conn) as cc:
                    async for channel, data in cc:
                        ...

    Args:
        host, port: the TCP server.
        path: the UNIX socket server's socket file, instead of host and port.
        framing: each connection's framing, as in :func:`connect_tcp`.
        ssl_context, server_hostname: TLS for each connection, as in
            :func:`connect_tcp` and :func:`connect_unix`.
        connect_timeout: seconds each attempt may take (default 10).
        require_close_notify: as in :func:`connect_tcp`.
        local_address: as in :func:`connect_tcp` (TCP only).
        backoff_initial: seconds; the first bound of the wait (default 0.1).
        backoff_factor: how much the bound grows after each failure (2).
        backoff_max: the largest bound, in seconds (30).
        reset_after: seconds a connection must last for the next attempt to
            go at once and the backoff to start over (5).
        max_attempts: give up after this many failed attempts in a row
            (None: never).
        reconnect_timeout: give up after this many seconds without a
            connection (None: never).  Attempts are cut short to fit.

    Raises:
        ValueError: neither or both of host and port, and path, are given,
            or an option is out of range.

    .. versionadded:: 0.1
    """
    policy = _Policy(
        connect_timeout=connect_timeout,
        backoff_initial=backoff_initial,
        backoff_factor=backoff_factor,
        backoff_max=backoff_max,
        reset_after=reset_after,
        max_attempts=max_attempts,
        reconnect_timeout=reconnect_timeout,
    )
    if path is not None:
        if host is not None or port is not None:
            raise ValueError("give either host and port, or path; not both")
        if local_address is not None:
            raise ValueError("local_address does not apply to a UNIX socket")
        unix_path = os.fspath(path)
        where = format_address(unix_path)
    elif host is None or port is None:
        raise ValueError("give host and port (TCP), or path (a UNIX socket)")
    else:
        unix_path = None
        where = format_address((host, port))
    connect = _Connect(
        host,
        port,
        unix_path,
        framing,
        ssl_context,
        server_hostname,
        require_close_notify,
        local_address,
    )
    return Reconnecting(where, connect, policy)
