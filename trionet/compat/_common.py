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
from typing import Any

import trio

from .._codec import Framing
from .._connection import Connection
from .._exceptions import CloseReason, ConnectionClosed
from .._server import Server, _TransportOptionsDict, serve_tcp
from .._transport import Address

__all__ = [
    "CompatServer",
    "TcpOptions",
    "abort",
    "close_after_flush",
    "expect_byte",
    "serve_over_tcp",
]

#: The server options of :class:`trionet.ServerOptions` except ``framing``.
TcpOptions = _TransportOptionsDict


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
        return self.tcp_server.port

    @property
    def addresses(self) -> list[Address]:
        """Every bound address, as ``getsockname()`` gives it."""
        return self.tcp_server.addresses

    @property
    def handler_errors(self) -> list[BaseException]:
        """The most recent exceptions that escaped a handler (at most 100)."""
        return self.tcp_server.handler_errors

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
    await conn._finish(reason)
