"""connect_tcp: a client Connection, with no background task."""

from __future__ import annotations

import os
import socket
import ssl
import sys
from collections.abc import Generator
from types import TracebackType
from typing import Any

import trio

from ._codec import Framing
from ._connection import Connection
from ._exceptions import CloseReason, ConnectError
from ._transport import SocketTransport
from ._util import format_address

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["connect_tcp"]


def _why(exc: OSError) -> str:
    """The operating system's reasons a connect failed, e.g. "Connection refused".

    trio reports "all attempts ... failed" and keeps each attempt's error in
    an exception group behind it; the reasons are in those.
    """
    reasons: list[str] = []
    pending: list[BaseException] = [exc]
    if exc.__cause__ is not None:
        pending.append(exc.__cause__)
    while pending:
        error = pending.pop(0)
        if isinstance(error, BaseExceptionGroup):
            pending.extend(error.exceptions)
        elif isinstance(error, OSError) and error.errno is not None:
            # (A resolver error's errno is no OS error number.)
            reason = (
                str(error.strerror)
                if isinstance(error, socket.gaierror)
                else os.strerror(error.errno)
            )
            if reason not in reasons:
                reasons.append(reason)
    return "; ".join(reasons) if reasons else str(exc)


async def _connect(
    host: str,
    port: int,
    framing: Framing | None,
    ssl_context: ssl.SSLContext | None,
    server_hostname: str | None,
    connect_timeout: float,
) -> Connection:
    where = format_address((host, port))
    with trio.move_on_after(connect_timeout) as scope:
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            raise ConnectError(
                CloseReason.ERROR, f"cannot connect to {where}: {_why(exc)}"
            ) from exc
        if ssl_context is None:
            return Connection._over(
                SocketTransport.from_trio_socket(stream.socket), framing
            )
        tls = trio.SSLStream(
            stream, ssl_context, server_hostname=server_hostname or host
        )
        try:
            await tls.do_handshake()
        except (trio.BrokenResourceError, OSError) as exc:
            await trio.aclose_forcefully(stream)
            cause = exc.__cause__ or exc
            raise ConnectError(
                CloseReason.ERROR, f"TLS handshake with {where} failed: {cause}"
            ) from cause
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return Connection(tls, framing=framing)
    assert scope.cancelled_caught
    raise ConnectError(
        CloseReason.TIMEOUT,
        f"connecting to {where} timed out after {connect_timeout} s",
    )


class connect_tcp:
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
        server_hostname: the name the server's certificate must carry.
        connect_timeout: seconds allowed for connecting (and the TLS handshake).

    Raises:
        ConnectError: connecting failed; ``.reason`` is
            :attr:`CloseReason.TIMEOUT` for a timeout, :attr:`CloseReason.ERROR`
            otherwise, with the :class:`OSError` as ``__cause__``.

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
    ) -> None:
        self._args = (
            host,
            port,
            framing,
            ssl_context,
            server_hostname,
            connect_timeout,
        )
        self._conn: Connection | None = None

    def __await__(self) -> Generator[Any, None, Connection]:
        return _connect(*self._args).__await__()

    async def __aenter__(self) -> Connection:
        self._conn = await _connect(*self._args)
        return self._conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._conn is not None
        await self._conn.aclose()
