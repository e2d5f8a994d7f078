"""What the compatibility servers share: a trionet TCP server underneath.

Each compatibility server (:mod:`trionet.compat.tinyproto`,
:mod:`trionet.compat.socketengine`) is :func:`trionet.serve_tcp` with a
handler of its own that speaks the old wire format over each
:class:`~trionet.Connection` and then calls the user's handler.  Nothing
here copies server logic: accepting, limits, timeouts, shutdown and
broadcasts are the TCP server's.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import trio

from .._client import Connecting
from .._codec import Framing
from .._connection import Connection
from .._exceptions import CloseReason, ConnectionClosed, IncompleteMessage
from .._server import Server, ServerStatistics, _TransportOptionsDict, serve_tcp
from .._transport import Address
from .._util import format_address

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "CompatConnection",
    "CompatServer",
    "Connector",
    "TcpOptions",
    "abort",
    "close_after_flush",
    "expect_byte",
    "serve_over_tcp",
]

_Message = TypeVar("_Message")

#: The server options of :class:`trionet.ServerOptions` except ``framing``.
TcpOptions = _TransportOptionsDict


class CompatConnection(Generic[_Message]):
    """The part of every compatibility connection that is the Connection's:
    closing, its reason, and ``async for`` over :meth:`receive`."""

    __slots__ = ("_conn",)

    def __init__(self, conn: Connection) -> None:
        if not isinstance(conn, Connection):
            raise TypeError(f"expected a trionet.Connection, not {conn!r}")
        self._conn = conn

    @property
    def connection(self) -> Connection:
        """The underlying :class:`~trionet.Connection` (for its addresses,
        counters and timeouts)."""
        return self._conn

    @property
    def close_reason(self) -> CloseReason | None:
        """Why the connection ended, or None while it is open."""
        return self._conn.close_reason

    def __repr__(self) -> str:
        state = "open" if self.close_reason is None else self.close_reason.name
        return (
            f"<{type(self).__module__}.{type(self).__name__} "
            f"{format_address(self._conn.remote_address)} {state}>"
        )

    async def receive(self) -> _Message:
        raise NotImplementedError

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> _Message:
        """The next message; iteration stops when the peer closes between
        messages."""
        try:
            return await self.receive()
        except ConnectionClosed as exc:
            if exc.reason is CloseReason.CLOSED_BY_PEER and not isinstance(
                exc, IncompleteMessage
            ):
                raise StopAsyncIteration from None
            raise

    async def aclose(self) -> None:
        """Close the connection (see :meth:`trionet.Connection.aclose`)."""
        await self._conn.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


# What the compat ``connect_*`` return: the same as trionet's own.
Connector = Connecting


class CompatServer:
    """The part of every compatibility server that is the TCP server's."""

    _kind = "server"

    def __init__(self) -> None:
        self._server: Server | None = None

    @property
    def tcp_server(self) -> Server:
        """The underlying :class:`trionet.Server` (its connections, counters,
        broadcast)."""
        if self._server is None:
            raise RuntimeError(f"this {self._kind} is not serving yet")
        return self._server

    @property
    def port(self) -> int:
        """The port, the same for every address."""
        port = self.tcp_server.port
        assert port is not None  # (compat servers listen on TCP)
        return port

    @property
    def addresses(self) -> list[Address]:
        """Every bound address, as ``getsockname()`` gives it."""
        return self.tcp_server.addresses

    @property
    def handler_exceptions(self) -> list[BaseException]:
        """The most recent exceptions that escaped a handler (at most 100)."""
        return self.tcp_server.handler_exceptions

    def statistics(self) -> ServerStatistics:
        """The TCP server's counters (see :class:`trionet.ServerStatistics`)."""
        return self.tcp_server.statistics()

    async def aclose(self, grace_period: float | None = None) -> None:
        """Shut down gracefully (see :meth:`trionet.Server.aclose`)."""
        await self.tcp_server.aclose(grace_period)

    def __repr__(self) -> str:
        addresses = self.addresses if self._server is not None else "not serving"
        return f"<{type(self).__module__}.{type(self).__name__} {addresses}>"


async def serve_over_tcp(
    server: CompatServer,
    handle: Callable[[Connection], Awaitable[object]],
    port: int,
    *,
    host: str | Sequence[str] | None,
    handler_nursery: trio.Nursery | None,
    framing: Framing | None,
    task_status: trio.TaskStatus[Any],
    options: TcpOptions,
) -> None:
    """Run :func:`trionet.serve_tcp` with ``handle`` for ``server`` and report
    ``server`` once it listens; return when the TCP server has stopped."""

    async def run_tcp(task_status: trio.TaskStatus[Server]) -> None:
        await serve_tcp(
            handle,
            port,
            host=host,
            handler_nursery=handler_nursery,
            framing=framing,
            task_status=task_status,
            **options,
        )

    async with trio.open_nursery() as nursery:
        server._server = await nursery.start(run_tcp)
        task_status.started(server)


async def expect_byte(conn: Connection, within: float | None, what: str) -> bytes:
    """Receive one byte (``what``) within ``within`` seconds (None: no limit).

    On timeout the connection is closed with TIMEOUT and ConnectionClosed
    raised; if this wait is cancelled from outside, the connection is closed
    with ERROR, since the byte may still arrive and would be misread later.
    """
    deadline = math.inf if within is None else trio.current_time() + within
    try:
        with trio.move_on_at(deadline):
            return await conn.receive_exactly(1)
    except trio.Cancelled:
        abort(conn, CloseReason.ERROR)
        raise
    abort(conn, CloseReason.TIMEOUT)
    raise ConnectionClosed(CloseReason.TIMEOUT, f"no {what} within {within} seconds")


# The two ways a compatibility layer ends a connection with a reason of its
# choosing (a protocol error, a timeout).  Connection has no public call for
# that; trionet.channels closes its connections the same way.


def abort(conn: Connection, reason: CloseReason) -> None:
    """Close ``conn`` now with ``reason`` (if it is the first), unflushed."""
    conn._close_now(reason)


async def close_after_flush(conn: Connection, reason: CloseReason) -> None:
    """Close ``conn`` with ``reason`` (if it is the first) once what it
    queued has been sent (bounded by its flush timeout)."""
    deadline = trio.current_time() + conn._send_path.limits.flush_timeout
    await conn._finish(reason, trio.CancelScope(shield=True, deadline=deadline))
