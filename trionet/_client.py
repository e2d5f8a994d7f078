"""connect_tcp and connect_unix: a client Connection, with no background task."""

from __future__ import annotations

import os
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable, Generator
from functools import partial
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

import trio

from ._codec import Framing
from ._connection import Connection, TlsSettings
from ._exceptions import CloseReason, ConnectError
from ._network import SimulatedStream, current_network
from ._transport import (
    SimulatedTransport,
    SocketTransport,
    Transport,
    check_server_hostname,
)
from ._util import format_address

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["connect_tcp", "connect_unix"]


def _why(exc: OSError) -> str:
    """The operating system's reasons a connect failed, e.g. "Connection refused".

    trio reports "all attempts ... failed" and keeps each attempt's error in
    an exception group behind it; the reasons are in those.
    """
    reasons: list[str] = []
    # (With a cause, the error itself only says "all attempts failed".)
    pending: list[BaseException] = [exc if exc.__cause__ is None else exc.__cause__]
    while pending:
        error = pending.pop(0)
        if isinstance(error, BaseExceptionGroup):
            pending.extend(error.exceptions)
            continue
        if not isinstance(error, OSError):
            continue
        if error.errno is None:
            # (trio's own words, e.g. a local_address that cannot be bound.)
            reason = str(error)
        elif isinstance(error, socket.gaierror):
            # (A resolver error's errno is no OS error number.)
            reason = str(error.strerror)
        else:
            reason = os.strerror(error.errno)
        if reason not in reasons:
            reasons.append(reason)
    return "; ".join(reasons) if reasons else str(exc)


async def _open_tcp_stream(
    host: str, port: int, local_address: str | None
) -> trio.SocketStream | SimulatedStream:
    # (trio's function is looked up at each call: tests replace it.)
    network = current_network()
    if network is not None:
        return await network.connect_tcp(host, port, local_address)
    return await trio.open_tcp_stream(host, port, local_address=local_address)


async def _open_unix_stream(path: str) -> trio.SocketStream | SimulatedStream:
    network = current_network()
    if network is not None:
        return await network.connect_unix(path)
    return await trio.open_unix_socket(path)


async def _connect(
    open_stream: Callable[[], Awaitable[trio.SocketStream | SimulatedStream]],
    where: str,
    framing: Framing | None,
    ssl_context: ssl.SSLContext | None,
    server_hostname: str | None,
    connect_timeout: float,
    require_close_notify: bool,
) -> Connection:
    """Open a stream with ``open_stream``, do the TLS handshake if asked,
    and wrap it in a client Connection; ConnectError for any failure."""
    if ssl_context is not None:
        check_server_hostname(ssl_context, False, server_hostname)
    tls_settings = TlsSettings(
        server_side=False,
        server_hostname=server_hostname,
        require_close_notify=require_close_notify,
    )
    with trio.move_on_after(connect_timeout) as scope:
        try:
            stream = await open_stream()
        except OSError as exc:
            raise ConnectError(
                CloseReason.ERROR, f"cannot connect to {where}: {_why(exc)}"
            ) from exc
        # (TLS over a real socket stays on trionet's socket path; over a
        # simulated network it is trio.SSLStream: see Transport.upgraded.)
        plain: Transport = (
            SocketTransport.from_trio_socket(stream.socket)
            if isinstance(stream, trio.SocketStream)
            else SimulatedTransport(stream)
        )
        if ssl_context is None:
            conn = Connection._over(plain, framing)
            conn._tls = tls_settings
            return conn
        transport: Transport = plain
        try:
            transport = plain.upgraded(
                ssl_context,
                server_side=False,
                server_hostname=server_hostname,
                require_close_notify=require_close_notify,
            )
            await transport.do_handshake()
        except (trio.BrokenResourceError, OSError) as exc:
            await transport.aclose_forcefully()
            cause = exc.__cause__ or exc
            raise ConnectError(
                CloseReason.ERROR, f"TLS handshake with {where} failed: {cause}"
            ) from cause
        except BaseException:
            await transport.aclose_forcefully()
            raise
        conn = Connection._over(transport, framing)
        conn._tls = tls_settings
        return conn
    assert scope.cancelled_caught
    raise ConnectError(
        CloseReason.TIMEOUT,
        f"connecting to {where} timed out after {connect_timeout} s",
    )


class _Closable(Protocol):
    async def aclose(self) -> None: ...


_C = TypeVar("_C", bound=_Closable)


class Connecting(Generic[_C]):
    """What every ``connect_*`` returns: ``await`` it for the connection, or
    use it with ``async with`` (which closes the connection at the end).  No
    background task either way, so exceptions raised in the block reach the
    caller as themselves."""

    def __init__(self, connect: Callable[[], Awaitable[_C]]) -> None:
        self._connect = connect
        self._conn: _C | None = None

    def __await__(self) -> Generator[Any, None, _C]:
        return self._connect().__await__()

    async def __aenter__(self) -> _C:
        self._conn = await self._connect()
        return self._conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._conn is not None
        await self._conn.aclose()


class connect_tcp(Connecting[Connection]):
    """Connect to a TCP server; use with ``async with`` or ``await``.

    ::

        lines = trionet.Lines()
        async with trionet.connect_tcp("127.0.0.1", port, framing=lines) as conn:
            await conn.send("hello")
            print(await conn.receive())

    ``await connect_tcp(...)`` returns the open :class:`Connection`, which the
    caller then closes.  No background task is started, so exceptions raised in
    the ``async with`` block reach the caller as themselves.

    Args:
        host: name or address to connect to.
        port: TCP port.
        framing: the connection's framing (:class:`Lines`, :class:`Frames` or None).
        ssl_context: speak TLS with this context (the server's certificate is
            checked against ``server_hostname``, default ``host``).
        server_hostname: the name the server's certificate must carry, here
            and in a later :meth:`Connection.start_tls`.
        connect_timeout: seconds allowed for connecting (and the TLS handshake).
        require_close_notify: over TLS (from the start, or after
            :meth:`Connection.start_tls`), treat a server that closes
            without TLS's close_notify as an error (ERROR) even between
            messages; by default that is a clean end there.
        local_address: bind the client's socket to this local IP address
            (of the same family as the server's) before connecting; the
            port is chosen by the system.  For hosts with several
            addresses, and for servers that tell clients apart by address.

    Raises:
        ConnectError: connecting failed; ``.reason`` is
            :attr:`CloseReason.TIMEOUT` for a timeout, :attr:`CloseReason.ERROR`
            otherwise (a ``local_address`` that cannot be bound included),
            with the :class:`OSError` as ``__cause__``.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        framing: Framing | None = None,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        connect_timeout: float = 10.0,
        require_close_notify: bool = False,
        local_address: str | None = None,
    ) -> None:
        super().__init__(
            partial(
                _connect,
                partial(_open_tcp_stream, host, port, local_address),
                format_address((host, port)),
                framing,
                ssl_context,
                server_hostname or host,
                connect_timeout,
                require_close_notify,
            )
        )


class connect_unix(Connecting[Connection]):
    """Connect to a UNIX domain socket server; use with ``async with`` or
    ``await``, as :func:`connect_tcp`.

    ::

        async with trionet.connect_unix("/run/app.sock", framing=lines) as conn:
            await conn.send("hello")

    The connection is the same as over TCP (and as fast a path);
    :attr:`Connection.peer_credentials` says which process, user and group
    runs the server.

    Args:
        path: the server's socket file.  Connecting needs write permission
            on it.
        framing: the connection's framing (:class:`Lines`, :class:`Frames` or None).
        ssl_context: speak TLS with this context.  A socket file has no host
            name, so give ``server_hostname`` unless the context does not
            check host names.
        server_hostname: the name the server's certificate must carry.
        connect_timeout: seconds allowed for connecting (and the TLS handshake).
        require_close_notify: as for :func:`connect_tcp`.

    Raises:
        ConnectError: connecting failed (no such file, nobody listening,
            permission denied, timeout); ``.reason`` as for
            :func:`connect_tcp`.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        framing: Framing | None = None,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        connect_timeout: float = 10.0,
        require_close_notify: bool = False,
    ) -> None:
        path = os.fspath(path)
        super().__init__(
            partial(
                _connect,
                partial(_open_unix_stream, path),
                format_address(path),
                framing,
                ssl_context,
                server_hostname,
                connect_timeout,
                require_close_notify,
            )
        )
