"""tinyproto's wire protocol: deployed tinyproto peers talk to trionet unchanged.

Servers and clients that speak exactly what tinyproto 2.0.1 and 3.0 speak
(both releases use the same bytes), built on :func:`trionet.serve_tcp` and
:class:`trionet.Connection`::

    async def echo(conn: trionet.compat.tinyproto.TinyprotoConnection) -> None:
        async for message in conn:                    # each transmission
            await conn.transmit(b"Echo back: " + message)

    async with trionet.compat.tinyproto.open_tinyproto_server(echo, 9123) as server:
        ...

How this works
--------------
The wire format, as tinyproto's source writes it:

* **Handshake.**  On connect each side sends one byte ``ff`` and reads one
  byte, which must be ``ff``.  Both send at once; neither waits first.
* **A transmission.**  The sender writes the size as 4 bytes, big-endian.
  The receiver answers one byte: ``ff`` to accept, ``00`` to refuse (tinyproto
  refuses sizes over ``0xF0FFFFFF``; trionet also refuses sizes over
  ``max_size``).  Only after ``ff`` does the sender write the body, which is
  exactly ``size`` bytes.
* **Half duplex.**  Between a size and its body the answer byte travels the
  other way, so the two sides must never transmit at the same time: one side
  asks, the other answers (request/response).  A :class:`trio.Lock` makes sure
  that this side never runs a transmit and a receive at the same time.
* **Connection limit (tinyproto 2.0.1).**  A server at its limit sends 254
  NUL bytes instead of its ``ff`` and closes the connection (its code sends
  ``bytearray(0xfe)``).  A client reads the first one as a failed handshake.

Receiving keeps its place across cancellation: the size is only peeked at
until it is accepted, and once the ``ff`` is sent the body is read with
``receive_exactly``, which loses nothing when cancelled; the next
:meth:`TinyprotoConnection.receive` picks up where the cancelled one
stopped.  A transmit cancelled after its size went out cannot be resumed
(the peer's answer is on its way), so that closes the connection with
:attr:`~trionet.CloseReason.ERROR`.

.. versionadded:: 0.1
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, TypeAlias

import attrs
import trio

from .._client import connect_tcp
from .._codec import as_bytes
from .._connection import Connection
from .._exceptions import (
    CloseReason,
    ConnectError,
    FrameTooLarge,
    MessageTooLarge,
    ProtocolError,
)
from .._options import positive_or_none
from .._util import format_address, server_in_block
from ._common import (
    CompatConnection,
    CompatServer,
    Connector,
    TcpOptions,
    abort,
    close_after_flush,
    expect_byte,
    serve_over_tcp,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "DEFAULT_ACK_TIMEOUT",
    "DEFAULT_MAX_SIZE",
    "LIMIT_REPLY",
    "PROTOCOL_MAX_SIZE",
    "TinyprotoConnection",
    "TinyprotoServer",
    "connect_tinyproto",
    "handle",
    "open_tinyproto_server",
    "serve_tinyproto",
]

#: The largest size tinyproto can announce: ``0xF0FFFFFF`` bytes (a little
#: over 3.7 GiB).  Larger sizes are refused by every tinyproto receiver.
PROTOCOL_MAX_SIZE = 0xF0FFFFFF
#: The largest message a trionet receiver accepts unless told otherwise (16 MiB).
DEFAULT_MAX_SIZE = 16 * 1024 * 1024
#: Seconds a transmit waits for the receiver's ``ff`` / ``00``.
DEFAULT_ACK_TIMEOUT = 30.0
#: Seconds a server waits for a client's handshake byte unless the
#: ``handshake_timeout`` server option says otherwise.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: What tinyproto 2.0.1 sends a client over its connection limit, and what
#: a trionet tinyproto server sends it too: 254 NUL bytes.
LIMIT_REPLY = bytes(254)

_OK = b"\xff"
_REFUSE = b"\x00"

Handler: TypeAlias = Callable[["TinyprotoConnection"], Awaitable[object]]


@attrs.frozen(kw_only=True)
class _Settings:
    max_size: int = attrs.field(
        default=DEFAULT_MAX_SIZE,
        validator=[
            attrs.validators.instance_of(int),
            attrs.validators.ge(0),
            attrs.validators.le(PROTOCOL_MAX_SIZE),
        ],
    )
    ack_timeout: float | None = attrs.field(
        default=DEFAULT_ACK_TIMEOUT, validator=positive_or_none
    )
    handshake_timeout: float | None = attrs.field(
        default=DEFAULT_HANDSHAKE_TIMEOUT, validator=positive_or_none
    )
    max_connections: int | None = attrs.field(default=None, validator=positive_or_none)


def _size_header(size: int) -> bytes:
    return size.to_bytes(4, "big")


class TinyprotoConnection(CompatConnection[bytes]):
    """One tinyproto connection, its handshake done.

    A server hands one to its handler; :func:`connect_tinyproto` gives one to
    a client; :func:`handle` makes one from a :class:`trionet.Connection`.
    Like the seed's connection, it has :meth:`transmit` and :meth:`receive`;
    ``async for message in conn`` receives until the peer closes.

    **One at a time.**  tinyproto is half duplex: :meth:`transmit` and
    :meth:`receive` take a lock, so a transmit started while another task
    waits in :meth:`receive` waits until that message has arrived.  The two
    *sides* must take turns too (request/response): if both transmit at once,
    each reads the other's size as its answer, and the connection fails with
    a :class:`~trionet.ProtocolError` or refuses a message it should not.

    States of a receive -- what the next :meth:`receive` does in each, and
    what cancelling it there leaves:

    * **idle**: peeks at the 4-byte size.  Over ``max_size``: answers
      ``00``, closes the connection with PROTOCOL_ERROR and raises
      :class:`~trionet.FrameTooLarge`.  Otherwise takes the size: **size
      taken**.  Cancelled: nothing consumed.
    * **size taken**: answers ``ff``: **accepted**.  Cancelled: still
      **size taken**.
    * **accepted**: receives exactly ``size`` bytes and returns them:
      **idle**.  Cancelled: still **accepted**, with the bytes that arrived.

    .. versionadded:: 0.1
    """

    __slots__ = ("_accepted", "_lock", "_settings", "_size")

    def __init__(self, conn: Connection, settings: _Settings) -> None:
        # (Not public: a connection is only a tinyproto connection once the
        # handshake is done; handle() and connect_tinyproto() do it.)
        super().__init__(conn)
        conn.framing = None
        self._settings = settings
        self._lock = trio.Lock()
        # The size of the message being received, once its header is taken.
        self._size: int | None = None
        # Whether that size was answered with ff.
        self._accepted = False

    @property
    def max_size(self) -> int:
        """The largest message this side accepts, in bytes (inclusive)."""
        return self._settings.max_size

    # ---------------------------------------------------------------- sending

    async def transmit(self, data: bytes | bytearray | memoryview | str) -> None:
        """Send one message: its size, the receiver's ``ff``, then the body.

        ``data`` is bytes-like, or a str sent as UTF-8.  Returns once the body
        is on its way (a server's connection queues it; a client's hands it
        to the kernel).

        Raises:
            MessageTooLarge: ``data`` is over :data:`PROTOCOL_MAX_SIZE` (nothing
                was sent), or the peer answered ``00``: it refused the size,
                and the body was not sent.  The connection stays usable.
            ProtocolError: the peer answered neither ``ff`` nor ``00`` (it was
                transmitting too, or does not speak tinyproto); the connection
                is closed with :attr:`~trionet.CloseReason.PROTOCOL_ERROR`.
            ConnectionClosed: the connection is closed, or the peer gave no
                answer within ``ack_timeout`` seconds (closed with
                :attr:`~trionet.CloseReason.TIMEOUT`).
            RuntimeError: a :meth:`receive` was cancelled in the middle of the
                peer's message; receive the rest of it first.
        """
        payload = as_bytes(data)
        size = len(payload)
        if size > PROTOCOL_MAX_SIZE:
            raise MessageTooLarge(
                f"message of {size} bytes is larger than tinyproto's limit "
                f"of {PROTOCOL_MAX_SIZE}"
            )
        async with self._lock:
            if self._size is not None:
                raise RuntimeError(
                    "the peer's message is half received (a receive was "
                    "cancelled); receive the rest of it before transmitting"
                )
            conn = self._conn
            await conn.send_all(_size_header(size))
            answer = await expect_byte(
                conn, self._settings.ack_timeout, "answer to a transmission"
            )
            if answer == _REFUSE:
                raise MessageTooLarge(
                    f"the peer refused a message of {size} bytes; nothing of "
                    "it was sent"
                )
            if answer != _OK:
                abort(conn, CloseReason.PROTOCOL_ERROR)
                raise ProtocolError(
                    f"the peer answered a transmission with {answer.hex()}, "
                    "not ff or 00 (is it transmitting at the same time?)"
                )
            await conn.send_all(payload)

    # -------------------------------------------------------------- receiving

    async def receive(self) -> bytes:
        """Receive one message: answer its size with ``ff``, then take the body.

        Raises:
            FrameTooLarge: the peer announced more than ``max_size`` bytes;
                it was answered ``00`` and the connection closed with
                :attr:`~trionet.CloseReason.PROTOCOL_ERROR`.
            IncompleteMessage: the stream ended inside a message.
            ConnectionClosed: the stream ended between messages, or the
                connection is closed.
        """
        async with self._lock:
            conn = self._conn
            if self._size is None:
                size = int.from_bytes(await conn.peek(4), "big")
                if size > self._settings.max_size:
                    await self._refuse(size)
                await conn.receive_exactly(4)  # buffered: returns at once
                self._size, self._accepted = size, False
            if not self._accepted:
                await conn.send_all(_OK)
                self._accepted = True
            body = await conn.receive_exactly(self._size)
            self._size = None
            return body

    async def _refuse(self, size: int) -> None:
        limit = self._settings.max_size
        await self._conn.send_all(_REFUSE)
        await close_after_flush(self._conn, CloseReason.PROTOCOL_ERROR)
        raise FrameTooLarge(
            f"the peer announced a message of {size} bytes; max_size is {limit} "
            "(answered 00)"
        )


async def _handshake(conn: Connection, within: float | None) -> bytes:
    """Send ``ff`` and return the peer's handshake byte."""
    await conn.send_all(_OK)
    return await expect_byte(conn, within, "tinyproto handshake")


async def handle(
    conn: Connection,
    handler: Handler,
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    ack_timeout: float | None = DEFAULT_ACK_TIMEOUT,
    handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
) -> None:
    """Speak tinyproto, as a server, over a connection you already have.

    Does the handshake, then runs ``handler`` with the
    :class:`TinyprotoConnection`.  This is how one port serves several
    protocols: a :func:`trionet.serve_tcp` handler that sees ``ff`` with
    :meth:`~trionet.Connection.peek` passes the connection on (the ``ff`` it
    peeked at is the client's handshake, still unread)::

        async def route(conn: trionet.Connection) -> None:
            if await conn.peek(1) == b"\\xff":
                await trionet.compat.tinyproto.handle(conn, echo)

    Args:
        conn: a connection from a server (or any connection whose peer is a
            tinyproto client).
        handler: ``async def handler(conn: TinyprotoConnection)``.
        max_size: the largest message accepted, in bytes (inclusive; at most
            :data:`PROTOCOL_MAX_SIZE`).  A larger one is answered ``00``.
        ack_timeout: seconds a transmit waits for the client's answer (None:
            no limit); then the connection is closed with TIMEOUT.
        handshake_timeout: seconds to wait for the client's ``ff`` (None: no
            limit).

    Raises:
        ProtocolError: the client's handshake byte was not ``ff`` (the
            connection is closed with PROTOCOL_ERROR).
        ConnectionClosed: the connection ended, or no handshake came in
            time (TIMEOUT).

    .. versionadded:: 0.1
    """
    settings = _Settings(
        max_size=max_size, ack_timeout=ack_timeout, handshake_timeout=handshake_timeout
    )
    await _serve_connection(conn, handler, settings)


async def _serve_connection(
    conn: Connection, handler: Handler, settings: _Settings
) -> None:
    answer = await _handshake(conn, settings.handshake_timeout)
    if answer != _OK:
        abort(conn, CloseReason.PROTOCOL_ERROR)
        raise ProtocolError(
            f"expected the tinyproto handshake ff, got {answer.hex()}: "
            "the client does not speak tinyproto"
        )
    await handler(TinyprotoConnection(conn, settings))


class TinyprotoServer(CompatServer):
    """A running tinyproto server.  Get one from :func:`serve_tinyproto` or
    :func:`open_tinyproto_server`.

    .. versionadded:: 0.1
    """

    _kind = "tinyproto server"

    def __init__(self, handler: Handler, settings: _Settings) -> None:
        super().__init__()
        self._handler = handler
        self._settings = settings
        self._active: dict[Connection, TinyprotoConnection | None] = {}
        self._refused = 0

    @property
    def max_size(self) -> int:
        """The largest message accepted, in bytes (inclusive)."""
        return self._settings.max_size

    @property
    def connections(self) -> list[TinyprotoConnection]:
        """A snapshot of the connections being served (past their handshake,
        handler running), oldest first: tinyproto's ``active_connections``."""
        return [tconn for tconn in self._active.values() if tconn is not None]

    @property
    def refused(self) -> int:
        """Clients answered with :data:`LIMIT_REPLY` because
        ``max_connections`` were being served."""
        return self._refused

    async def _handle(self, conn: Connection) -> None:
        limit = self._settings.max_connections
        if limit is not None and len(self._active) >= limit:
            await self._turn_away(conn)
            return
        self._active[conn] = None

        async def run(tconn: TinyprotoConnection) -> None:
            self._active[conn] = tconn
            await self._handler(tconn)

        try:
            await _serve_connection(conn, run, self._settings)
        finally:
            del self._active[conn]

    async def _turn_away(self, conn: Connection) -> None:
        # tinyproto 2.0.1's answer at its limit: 254 NUL bytes, then close.
        self._refused += 1
        await conn.send_all(LIMIT_REPLY)
        # Read the client's handshake byte before closing: a socket closed
        # with unread bytes sends a reset, and a reset can destroy the reply
        # before the client reads it.  Closed without them, it gets a FIN.
        timeout = self._settings.handshake_timeout
        with trio.move_on_after(math.inf if timeout is None else timeout):
            await conn.receive_some()


async def serve_tinyproto(
    handler: Handler,
    port: int,
    *,
    host: str | Sequence[str] | None = None,
    handler_nursery: trio.Nursery | None = None,
    max_size: int = DEFAULT_MAX_SIZE,
    ack_timeout: float | None = DEFAULT_ACK_TIMEOUT,
    task_status: trio.TaskStatus[TinyprotoServer] = trio.TASK_STATUS_IGNORED,
    **options: Unpack[TcpOptions],
) -> None:
    """Serve tinyproto clients: ``handler(conn)`` runs once per client.

    Use it trio-style; it runs until cancelled or until
    :meth:`TinyprotoServer.aclose` returns::

        async def echo(conn: TinyprotoConnection) -> None:
            async for message in conn:
                await conn.transmit(b"Echo back: " + message)

        server = await nursery.start(serve_tinyproto, echo, 9123)

    Each client's handshake is done before ``handler`` runs.  When the
    handler returns the connection is closed (tinyproto's
    ``self.shutdown = True``); an exception escaping it is logged and closes
    only that connection, as with :func:`trionet.serve_tcp`.

    Args:
        handler: ``async def handler(conn: TinyprotoConnection)``.
        port: TCP port; 0 picks a free one.
        host: address or name to listen on, or a sequence of them (tinyproto's
            ``add_addr``, once per address); None listens on every interface.
        handler_nursery: run connection tasks inside this nursery.
        max_size: the largest message accepted, in bytes (inclusive; at most
            :data:`PROTOCOL_MAX_SIZE`); a larger size is answered ``00``.
        ack_timeout: seconds a transmit waits for the client's answer (None:
            no limit).
        **options: the options of :class:`trionet.ServerOptions` except
            ``framing``.  Two mean what they meant to tinyproto:
            ``max_connections=N`` answers client N+1 with :data:`LIMIT_REPLY`
            and closes it, as tinyproto 2.0.1 did, instead of leaving it in
            the listen backlog; ``handshake_timeout`` (default 10 s) also
            bounds the wait for a client's ``ff``.

    .. versionadded:: 0.1
    """
    settings = _Settings(
        max_size=max_size,
        ack_timeout=ack_timeout,
        handshake_timeout=options.get("handshake_timeout", DEFAULT_HANDSHAKE_TIMEOUT),
        max_connections=options.pop("max_connections", None),
    )
    server = TinyprotoServer(handler, settings)
    await serve_over_tcp(
        server,
        server._handle,
        port,
        host=host,
        handler_nursery=handler_nursery,
        framing=None,
        task_status=task_status,
        options=options,
    )


@asynccontextmanager
async def open_tinyproto_server(
    handler: Handler,
    port: int = 0,
    *,
    host: str | Sequence[str] | None = None,
    max_size: int = DEFAULT_MAX_SIZE,
    ack_timeout: float | None = DEFAULT_ACK_TIMEOUT,
    **options: Unpack[TcpOptions],
) -> AsyncIterator[TinyprotoServer]:
    """A tinyproto server scoped to an ``async with`` block.

    ::

        async with open_tinyproto_server(echo, host="127.0.0.1") as server:
            async with connect_tinyproto("127.0.0.1", server.port) as conn:
                await conn.transmit(b"hello")
                print(await conn.receive())

    Leaving the block shuts the server down gracefully (tinyproto's server
    shutdown "along with all clients"; see :meth:`trionet.Server.aclose`).
    Exceptions raised in the block reach the caller as themselves.  Takes
    the same arguments as :func:`serve_tinyproto`.

    .. versionadded:: 0.1
    """
    async with server_in_block(
        serve_tinyproto,
        handler,
        port,
        host=host,
        max_size=max_size,
        ack_timeout=ack_timeout,
        **options,
    ) as server:
        yield server


async def _connect(
    host: str, port: int, settings: _Settings, connect_timeout: float
) -> TinyprotoConnection:
    where = format_address((host, port))
    with trio.move_on_after(connect_timeout) as scope:
        conn = await connect_tcp(host, port, connect_timeout=connect_timeout)
        try:
            answer = await _handshake(conn, None)
        except BaseException:
            await conn.aclose()
            raise
        if answer == _OK:
            return TinyprotoConnection(conn, settings)
        await conn.aclose()
        if answer == _REFUSE:
            raise ConnectError(
                CloseReason.REJECTED,
                f"{where} refused the connection: its connection limit is reached",
            )
        raise ConnectError(
            CloseReason.PROTOCOL_ERROR,
            f"{where} does not speak tinyproto (handshake byte {answer.hex()})",
        )
    assert scope.cancelled_caught
    raise ConnectError(
        CloseReason.TIMEOUT,
        f"no tinyproto handshake from {where} within {connect_timeout} s",
    )


class connect_tinyproto(Connector[TinyprotoConnection]):
    """Connect to a tinyproto server; use with ``async with`` or ``await``.

    ::

        async with connect_tinyproto("127.0.0.1", 9123) as conn:
            await conn.transmit(b"hello")
            print(await conn.receive())   # b'Echo back: hello'

    The TCP connection and the handshake are done before the block starts.
    No background task runs: as with :func:`trionet.connect_tcp`, exceptions
    raised in the block reach the caller as themselves.

    Args:
        host: name or address to connect to.
        port: TCP port.
        max_size: the largest message accepted from the server, in bytes.
        ack_timeout: seconds a transmit waits for the server's answer.
        connect_timeout: seconds allowed for connecting and the handshake.

    Raises:
        ConnectError: connecting failed.  ``.reason`` is
            :attr:`~trionet.CloseReason.REJECTED` when the server answered
            with tinyproto's connection-limit reply,
            :attr:`~trionet.CloseReason.PROTOCOL_ERROR` when it answered
            something else than ``ff``, :attr:`~trionet.CloseReason.TIMEOUT`
            when connecting or the handshake took too long, and
            :attr:`~trionet.CloseReason.ERROR` when the connection failed.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_size: int = DEFAULT_MAX_SIZE,
        ack_timeout: float | None = DEFAULT_ACK_TIMEOUT,
        connect_timeout: float = 10.0,
    ) -> None:
        settings = _Settings(max_size=max_size, ack_timeout=ack_timeout)
        super().__init__(partial(_connect, host, port, settings, connect_timeout))
