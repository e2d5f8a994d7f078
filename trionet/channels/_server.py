"""Channel servers and clients: serve_tcp / connect_tcp (or their UNIX socket
twins) speaking named channels.

How this works
--------------
:func:`serve_channels` builds its :class:`ChannelServer` first, then runs
:func:`trionet.serve_tcp` in its own task with ``Frames(max_size=...)``
framing, a handler of its own and a task status (:class:`_StartedAs`) that,
when the TCP server is listening, records it in the ChannelServer and
reports the ChannelServer to the caller's ``nursery.start``.  No nursery of
its own: ``serve_channels`` lives exactly as long as ``serve_tcp``.

The handler wraps
each connection in a :class:`ChannelConnection`, registers it, runs its reader
task beside the user's handler (in a nursery whose one-exception groups are
unwrapped, so the server sees the handler's own exception), and stops the
reader when the handler returns.  The TCP server then closes the connection
as it closes any other.

:meth:`ChannelServer.publish` encodes the channel message once and hands it
to :meth:`trionet.Server.broadcast`, which queues the same bytes on every
connection without waiting and closes a client whose queue is full with
SLOW_CONSUMER.

:func:`connect_channels` opens a client connection and runs the reader task
for the duration of its block, again unwrapping one-exception groups.

The UNIX socket functions (``serve_unix_channels``, ``open_unix_channel_server``,
``connect_unix_channels``) are the same code over :func:`trionet.serve_unix`
and :func:`trionet.connect_unix`: only the function that listens (or
connects) differs.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, TypeAlias

import attrs
import trio

from .._client import connect_tcp, connect_unix
from .._connection import Connection
from .._server import (
    Server,
    ServerStatistics,
    _TransportOptionsDict,
    serve_tcp,
    serve_unix,
)
from .._transport import Address
from .._util import server_in_block
from ._connection import (
    DEFAULT_CHANNEL_BUFFER,
    DEFAULT_MAX_BUFFERED_BYTES,
    DEFAULT_MAX_CHANNELS,
    DEFAULT_MAX_SIZE,
    ChannelConnection,
    Policy,
    _Settings,
)
from ._wire import encode

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "ChannelServer",
    "connect_channels",
    "connect_unix_channels",
    "open_channel_server",
    "open_unix_channel_server",
    "serve_channels",
    "serve_unix_channels",
]

ChannelHandler: TypeAlias = Callable[[ChannelConnection], Awaitable[object]]


_TcpOptions: TypeAlias = _TransportOptionsDict


class ChannelServer:
    """A running channel server.  Get one from :func:`serve_channels` or
    :func:`open_channel_server`.

    It is a :class:`trionet.Server` (:attr:`tcp_server`) whose handler speaks
    channels: its lifecycle, options and counters are that server's.

    .. versionadded:: 0.1
    """

    def __init__(self, handler: ChannelHandler, settings: _Settings) -> None:
        self._handler = handler
        self._settings = settings
        self._clients: dict[Connection, ChannelConnection] = {}
        self._server: Server | None = None

    @property
    def _tcp(self) -> Server:
        assert self._server is not None
        return self._server

    @property
    def tcp_server(self) -> Server:
        """The underlying :class:`trionet.Server`."""
        return self._tcp

    @property
    def port(self) -> int | None:
        """The port, the same for every address; None on a UNIX socket."""
        return self._tcp.port

    @property
    def path(self) -> str | None:
        """The socket file of a UNIX socket server; None for TCP."""
        return self._tcp.path

    @property
    def addresses(self) -> list[Address]:
        """Every bound address, as ``getsockname()`` gives it."""
        return self._tcp.addresses

    @property
    def max_size(self) -> int:
        """The largest frame sent or accepted, in bytes."""
        return self._settings.max_size

    @property
    def clients(self) -> list[ChannelConnection]:
        """A snapshot of the open client connections, oldest first."""
        open_now = set(self._tcp.connections)
        return [cc for conn, cc in self._clients.items() if conn in open_now]

    def statistics(self) -> ServerStatistics:
        """A snapshot of the TCP server's counters (connections accepted,
        open and closed by reason, bytes), as :meth:`trionet.Server.statistics`
        gives them."""
        return self._tcp.statistics()

    @property
    def handler_exceptions(self) -> list[BaseException]:
        """The most recent exceptions that escaped a handler (at most 100)."""
        return self._tcp.handler_exceptions

    def __repr__(self) -> str:
        return (
            f"<trionet.channels.ChannelServer {self.addresses} "
            f"clients={len(self._clients)}>"
        )

    async def publish(
        self, channel: str, data: bytes | bytearray | memoryview | str
    ) -> None:
        """Send ``data`` on ``channel`` to every open client, waiting on none.

        The message is encoded once.  It joins each client's outgoing queue
        in order with that client's own messages; a client too far behind to
        take it (see :meth:`trionet.Server.broadcast`) is closed with
        :attr:`~trionet.CloseReason.SLOW_CONSUMER` and the others still get
        the message.  With a ``backplane`` (see
        :class:`RedisBackplane`) the clients of every other server on it get
        it too.

        Raises:
            TypeError, ValueError: ``channel`` or ``data`` is invalid (see
                :meth:`ChannelConnection.publish`); nothing was sent.
            MessageTooLarge: the message does not fit ``max_size`` (or the
                backplane's ``max_payload``).
        """
        await self._tcp.broadcast(encode(channel, data))

    async def aclose(self, grace_period: float | None = None) -> None:
        """Shut down gracefully, as :meth:`trionet.Server.aclose` does.

        Stop accepting new clients at once; give running handlers
        ``grace_period`` seconds (default: the server's ``grace_period``
        option) to finish; cancel the rest; flush what each connection queued
        (bounded by ``flush_timeout``); return when every handler has
        finished.  The shutdown is a request that the server carries out
        itself: if the wait in ``aclose`` is cancelled, or a handler of this
        server calls it, only the wait is abandoned, never the shutdown.
        After it, :func:`serve_channels` returns.
        """
        await self._tcp.aclose(grace_period)

    async def _handle(self, conn: Connection) -> None:
        cc = ChannelConnection._create(conn, self._settings)
        self._clients[conn] = cc
        try:
            async with cc._running(close=False):
                await self._handler(cc)
        finally:
            del self._clients[conn]


@attrs.frozen
class _StartedAs(trio.TaskStatus[Server]):
    """The task status :func:`serve_channels` gives :func:`trionet.serve_tcp`:
    the TCP server it reports becomes the ChannelServer's, and the caller's
    ``nursery.start`` gets the ChannelServer."""

    channel_server: ChannelServer
    task_status: trio.TaskStatus[ChannelServer]

    def started(self, value: Server | None = None) -> None:
        assert value is not None, "serve_tcp reports its Server"
        self.channel_server._server = value
        self.task_status.started(self.channel_server)


async def serve_channels(
    handler: ChannelHandler,
    port: int,
    *,
    host: str | Sequence[str] | None = None,
    handler_nursery: trio.Nursery | None = None,
    max_size: int = DEFAULT_MAX_SIZE,
    channel_buffer: int = DEFAULT_CHANNEL_BUFFER,
    max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
    policy: Policy = "block",
    max_channels: int = DEFAULT_MAX_CHANNELS,
    task_status: trio.TaskStatus[ChannelServer] = trio.TASK_STATUS_IGNORED,
    **options: Unpack[_TcpOptions],
) -> None:
    """Serve named channels over TCP: ``handler(cc)`` runs once per client.

    Use it trio-style; it runs until cancelled or until
    :meth:`ChannelServer.aclose` returns::

        async def handler(cc: trionet.channels.ChannelConnection) -> None:
            async for channel, data in cc:
                ...

        server = await nursery.start(trionet.channels.serve_channels, handler, 0)
        await server.publish("news", "hello, everyone")

    The client's connection stays open while the handler runs; when it
    returns the server closes the connection
    (:attr:`~trionet.CloseReason.CLOSED_BY_HOST`, "host" being this side,
    unless something came first).  An exception escaping the handler is logged
    and closes only that connection, as with :func:`trionet.serve_tcp`.

    Args:
        handler: ``async def handler(cc: ChannelConnection)``.
        port: TCP port; 0 picks a free one.
        host: address or name to listen on, or a sequence of them; None
            listens on every interface.
        handler_nursery: run connection tasks here instead of in a nursery of
            the server's own.
        max_size, channel_buffer, max_buffered_bytes, policy, max_channels:
            for every client's :class:`ChannelConnection` (``max_size`` also
            limits :meth:`ChannelServer.publish`).  ``max_buffered_bytes``
            bounds what each client can make the server hold unread.
        **options: the options of :class:`trionet.ServerOptions` except
            ``framing`` (ssl_context, backlog, accept, max_connections,
            idle_timeout, message_timeout, send_queue_size, grace_period,
            flush_timeout, handshake_timeout, on_connect, on_close,
            reuse_port, so_sndbuf, so_rcvbuf, backplane).  ``on_connect`` and
            ``on_close`` get the :class:`trionet.Connection`.  With
            ``backplane=RedisBackplane(url)``, :meth:`ChannelServer.publish`
            reaches the clients of every server on that backplane.

    .. versionadded:: 0.1
    """
    settings = _Settings(
        max_size=max_size,
        channel_buffer=channel_buffer,
        max_buffered_bytes=max_buffered_bytes,
        policy=policy,
        max_channels=max_channels,
    )
    await _serve(
        partial(serve_tcp, port=port, host=host),
        handler,
        settings,
        handler_nursery,
        task_status,
        options,
    )


async def _serve(
    serve: Callable[..., Awaitable[object]],
    handler: ChannelHandler,
    settings: _Settings,
    handler_nursery: trio.Nursery | None,
    task_status: trio.TaskStatus[ChannelServer],
    options: _TcpOptions,
) -> None:
    """Run ``serve`` (serve_tcp or serve_unix, its address bound) with a
    channel handler: the body of every channel server."""
    channel_server = ChannelServer(handler, settings)
    await serve(
        channel_server._handle,
        handler_nursery=handler_nursery,
        framing=settings.framing,
        task_status=_StartedAs(channel_server, task_status),
        **options,
    )


async def serve_unix_channels(
    handler: ChannelHandler,
    path: str | os.PathLike[str],
    *,
    mode: int = 0o600,
    handler_nursery: trio.Nursery | None = None,
    max_size: int = DEFAULT_MAX_SIZE,
    channel_buffer: int = DEFAULT_CHANNEL_BUFFER,
    max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
    policy: Policy = "block",
    max_channels: int = DEFAULT_MAX_CHANNELS,
    task_status: trio.TaskStatus[ChannelServer] = trio.TASK_STATUS_IGNORED,
    **options: Unpack[_TcpOptions],
) -> None:
    """Serve named channels on a UNIX domain socket: :func:`serve_channels`
    listening on the socket file ``path`` instead of a port.

    The socket file is made, replaced and removed as
    :func:`trionet.serve_unix` does (``mode`` default 0o600: only this user
    may connect); every other argument is as for :func:`serve_channels`
    (``reuse_port`` does not apply).

    .. versionadded:: 0.1
    """
    settings = _Settings(
        max_size=max_size,
        channel_buffer=channel_buffer,
        max_buffered_bytes=max_buffered_bytes,
        policy=policy,
        max_channels=max_channels,
    )
    await _serve(
        partial(serve_unix, path=path, mode=mode),
        handler,
        settings,
        handler_nursery,
        task_status,
        options,
    )


@asynccontextmanager
async def open_channel_server(
    handler: ChannelHandler,
    port: int = 0,
    *,
    host: str | Sequence[str] | None = None,
    max_size: int = DEFAULT_MAX_SIZE,
    channel_buffer: int = DEFAULT_CHANNEL_BUFFER,
    max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
    policy: Policy = "block",
    max_channels: int = DEFAULT_MAX_CHANNELS,
    **options: Unpack[_TcpOptions],
) -> AsyncIterator[ChannelServer]:
    """A channel server scoped to an ``async with`` block.

    ::

        async with trionet.channels.open_channel_server(handler) as server:
            async with trionet.channels.connect_channels(
                "127.0.0.1", server.port
            ) as cc:
                ...

    Leaving the block shuts the server down gracefully (see
    :meth:`ChannelServer.aclose`).  Exceptions raised in the block reach the
    caller as themselves.  Takes the same arguments as :func:`serve_channels`.

    .. versionadded:: 0.1
    """
    async with server_in_block(
        serve_channels,
        handler,
        port,
        host=host,
        max_size=max_size,
        channel_buffer=channel_buffer,
        max_buffered_bytes=max_buffered_bytes,
        policy=policy,
        max_channels=max_channels,
        **options,
    ) as server:
        yield server


@asynccontextmanager
async def open_unix_channel_server(
    handler: ChannelHandler,
    path: str | os.PathLike[str],
    *,
    mode: int = 0o600,
    max_size: int = DEFAULT_MAX_SIZE,
    channel_buffer: int = DEFAULT_CHANNEL_BUFFER,
    max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
    policy: Policy = "block",
    max_channels: int = DEFAULT_MAX_CHANNELS,
    **options: Unpack[_TcpOptions],
) -> AsyncIterator[ChannelServer]:
    """A channel server on a UNIX domain socket, scoped to an ``async with``
    block: :func:`open_channel_server` on the socket file ``path``.  Takes
    the same arguments as :func:`serve_unix_channels`.

    .. versionadded:: 0.1
    """
    async with server_in_block(
        serve_unix_channels,
        handler,
        path,
        mode=mode,
        max_size=max_size,
        channel_buffer=channel_buffer,
        max_buffered_bytes=max_buffered_bytes,
        policy=policy,
        max_channels=max_channels,
        **options,
    ) as server:
        yield server


@asynccontextmanager
async def connect_channels(
    host: str,
    port: int,
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    channel_buffer: int = DEFAULT_CHANNEL_BUFFER,
    max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
    policy: Policy = "block",
    max_channels: int = DEFAULT_MAX_CHANNELS,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    connect_timeout: float = 10.0,
) -> AsyncIterator[ChannelConnection]:
    """Connect to a channel server; use with ``async with``.

    ::

        async with trionet.channels.connect_channels("127.0.0.1", port) as cc:
            await cc.publish("test", "client is connected!")
            print(await cc.receive("news"))

    The reader task runs while the block does; leaving the block closes the
    connection (after flushing what was published).  Exceptions raised in
    the block reach the caller as themselves.

    Args:
        host: name or address to connect to.
        port: TCP port.
        max_size, channel_buffer, max_buffered_bytes, policy, max_channels:
            see :class:`ChannelConnection`.
        ssl_context: speak TLS with this context.
        server_hostname: the name the server's certificate must carry
            (default ``host``).
        connect_timeout: seconds allowed for connecting and the TLS handshake.

    Raises:
        ConnectError: connecting failed (see :func:`trionet.connect_tcp`).

    .. versionadded:: 0.1
    """
    settings = _Settings(
        max_size=max_size,
        channel_buffer=channel_buffer,
        max_buffered_bytes=max_buffered_bytes,
        policy=policy,
        max_channels=max_channels,
    )
    connect = connect_tcp(
        host,
        port,
        framing=settings.framing,
        ssl_context=ssl_context,
        server_hostname=server_hostname,
        connect_timeout=connect_timeout,
    )
    async with _channels_over(await connect, settings) as cc:
        yield cc


@asynccontextmanager
async def connect_unix_channels(
    path: str | os.PathLike[str],
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    channel_buffer: int = DEFAULT_CHANNEL_BUFFER,
    max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
    policy: Policy = "block",
    max_channels: int = DEFAULT_MAX_CHANNELS,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    connect_timeout: float = 10.0,
) -> AsyncIterator[ChannelConnection]:
    """Connect to a channel server on a UNIX domain socket; use with
    ``async with``, as :func:`connect_channels`.

    ::

        async with trionet.channels.connect_unix_channels("/run/app.sock") as cc:
            print(await cc.receive("news"))

    Args:
        path: the server's socket file.
        max_size, channel_buffer, max_buffered_bytes, policy, max_channels:
            see :class:`ChannelConnection`.
        ssl_context, server_hostname, connect_timeout: as for
            :func:`trionet.connect_unix` (a socket file has no host name:
            give ``server_hostname`` for TLS).

    Raises:
        ConnectError: connecting failed (see :func:`trionet.connect_unix`).

    .. versionadded:: 0.1
    """
    settings = _Settings(
        max_size=max_size,
        channel_buffer=channel_buffer,
        max_buffered_bytes=max_buffered_bytes,
        policy=policy,
        max_channels=max_channels,
    )
    connect = connect_unix(
        path,
        framing=settings.framing,
        ssl_context=ssl_context,
        server_hostname=server_hostname,
        connect_timeout=connect_timeout,
    )
    async with _channels_over(await connect, settings) as cc:
        yield cc


def _channels_over(
    conn: Connection, settings: _Settings
) -> AbstractAsyncContextManager[ChannelConnection]:
    """Channels over a client connection just made: the reader task runs
    while the block does, and the connection is closed after it."""
    return ChannelConnection._create(conn, settings)._running(close=True)
