"""socket.engine 1.0.0's wire format: deployed peers talk to trionet unchanged.

A host (server) and clients that exchange JSON values on named channels the
way socket.engine does, built on :func:`trionet.serve_tcp` and
:class:`trionet.Connection`::

    async def handler(conn: trionet.compat.socketengine.EngineConnection) -> None:
        async for channel, value in conn:        # also keeps conn.get() current
            if channel == "test":
                await conn.write("reply", f"got {value}")

    async with trionet.compat.socketengine.open_engine_server(handler, 8080) as server:
        print(server.get_ALL("test"))            # each client's latest value
        await server.write_ALL("status", "ready")

How this works
--------------
The wire format is one JSON object per line::

    {"type": "<channel>", "data": <any JSON value>}\\n

written by ``json.dumps`` with its default separators (``", "`` and
``": "``) and ``ensure_ascii=True``.  Images travel on the channel
``"__image"`` as base64 text (of a PNG, as socket.engine's ``writeImg``
makes them); socket.engine sends its next image only after a message on
``"__ack"`` (``{"type": "__ack", "data": "__ack"}``), which trionet sends
back for every ``"__image"`` it reads, on both sides.

The old reader (socket.engine's own, in every deployed peer) decodes each
256-byte chunk it receives as UTF-8 on its own, parses each line with
``json.loads`` and indexes it as a dict; a character split across two
chunks or a line that is not an object kills its thread, and one line that
is not JSON at all is glued to every later line, so that peer never parses
anything again.  So trionet only ever sends it ASCII-escaped JSON objects,
whole lines, nothing else.

Reading, trionet is more careful than the old reader: a line that is not
UTF-8, not JSON, not an object, or has no string ``"type"`` or no
``"data"``, is skipped and counted (:attr:`EngineConnection.ignored`); the
next line is read normally.  Lines are bounded by ``max_length`` (a longer
one is a :class:`~trionet.LineTooLong` and closes the connection with
PROTOCOL_ERROR), and the latest values kept per channel by ``max_stored``.

There is no reader task: values arrive (and :meth:`EngineConnection.get`
and :meth:`EngineGroup.get_ALL` change) as a task reads the connection with
``async for`` or :meth:`EngineConnection.receive`.  A server handler is that
task.

.. versionadded:: 0.1
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, TypeAlias

import attrs
import trio

from .._client import connect_tcp
from .._codec import Lines
from .._connection import Connection
from .._exceptions import CloseReason, ConnectionClosed, ProtocolError
from .._util import server_in_block
from ._common import (
    CompatConnection,
    CompatServer,
    Connector,
    TcpOptions,
    abort,
    serve_over_tcp,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "ACK",
    "DEFAULT_MAX_LENGTH",
    "DEFAULT_MAX_STORED",
    "IMAGE",
    "EngineConnection",
    "EngineGroup",
    "EngineServer",
    "connect_engine",
    "decode",
    "encode",
    "handle",
    "open_engine_server",
    "serve_engine",
]

logger = logging.getLogger("trionet")

#: The longest line accepted or sent, in bytes, without its ``\\n`` (16 MiB:
#: a base64 image of up to 12 MiB of PNG).
DEFAULT_MAX_LENGTH = 16 * 1024 * 1024
#: The most JSON text, in bytes, whose values one connection keeps as the
#: latest of their channels (64 MiB).
DEFAULT_MAX_STORED = 64 * 1024 * 1024
#: The channel socket.engine sends images on.
IMAGE = "__image"
#: The channel of the answer to an image.
ACK = "__ack"

#: What each latest value costs toward ``max_stored`` besides its line.
_ENTRY_COST = 256
_ACK_LINE = b'{"type": "__ack", "data": "__ack"}'

Handler: TypeAlias = Callable[["EngineConnection"], Awaitable[object]]


def encode(channel: str, value: object) -> bytes:
    """One message as socket.engine writes it, without the ``\\n``.

    ``json.dumps({"type": channel, "data": value})`` with the default
    separators and ``ensure_ascii=True``: ASCII only, one line.

    Raises:
        TypeError: ``channel`` is not a str, or ``value`` is not
            JSON-serialisable.
        ValueError: ``value`` holds a circular reference.
    """
    if not isinstance(channel, str):
        raise TypeError(f"channel must be a str, not {type(channel).__name__}")
    text = json.dumps({"type": channel, "data": value}, ensure_ascii=True)
    return text.encode("ascii")


def decode(line: bytes) -> tuple[str, Any] | None:
    """The ``(channel, value)`` of one received line, or None if it is not a
    socket.engine message (not UTF-8, not JSON, not an object with a string
    ``"type"`` and a ``"data"``).  Never raises."""
    try:
        message = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(message, dict):
        return None
    channel = message.get("type")
    if not isinstance(channel, str) or "data" not in message:
        return None
    return channel, message["data"]


@attrs.frozen(kw_only=True)
class _Settings:
    max_length: int = attrs.field(
        default=DEFAULT_MAX_LENGTH,
        validator=[attrs.validators.instance_of(int), attrs.validators.ge(64)],
    )
    max_stored: int = attrs.field(
        default=DEFAULT_MAX_STORED,
        validator=[attrs.validators.instance_of(int), attrs.validators.ge(1)],
    )

    @property
    def framing(self) -> Lines:
        return Lines(max_length=self.max_length)


class EngineConnection(CompatConnection[tuple[str, Any]]):
    """One socket.engine connection: JSON values on named channels.

    A server hands one to its handler; :func:`connect_engine` gives one to a
    client; :func:`handle` makes one from a :class:`trionet.Connection`.

    * ``async for channel, value in conn`` reads messages until the peer
      closes; :meth:`receive` reads one.
    * :meth:`get` is socket.engine's ``get``: the latest value received on a
      channel (it changes as the connection is read).
    * :meth:`write` is socket.engine's ``write`` (and ``writeLock``: writes
      from several tasks never interleave).

    .. versionadded:: 0.1
    """

    __slots__ = ("_ignored", "_latest", "_settings", "_stored", "_unanswered")

    def __init__(self, conn: Connection, settings: _Settings) -> None:
        # (Not public: use handle(), serve_engine() or connect_engine().)
        super().__init__(conn)
        conn.framing = settings.framing
        self._settings = settings
        # channel -> (latest value, what it costs toward max_stored)
        self._latest: dict[str, tuple[Any, int]] = {}
        self._stored = 0
        self._ignored = 0
        # An image taken from the stream whose __ack was not sent yet (the
        # send was cancelled): the next receive answers and returns it.
        self._unanswered: tuple[str, Any] | None = None

    @property
    def ignored(self) -> int:
        """Lines received that were not socket.engine messages, and skipped."""
        return self._ignored

    @property
    def channels(self) -> list[str]:
        """Every channel a value arrived on, in order of first arrival."""
        return list(self._latest)

    def get(self, channel: str) -> Any:
        """The latest value received on ``channel``, or None if none was.

        (A JSON ``null`` received on the channel is None too, as in
        socket.engine.)  Never waits.
        """
        entry = self._latest.get(channel)
        return None if entry is None else entry[0]

    async def write(self, channel: str, value: object) -> None:
        """Send ``value`` (any JSON value) on ``channel``.

        Raises:
            TypeError: ``channel`` is not a str or ``value`` is not
                JSON-serialisable; nothing was sent.
            MessageTooLarge: the line is longer than ``max_length``; nothing
                was sent.
            ConnectionClosed: the connection is closed.
        """
        await self._conn.send(encode(channel, value))

    async def receive(self) -> tuple[str, Any]:
        """Receive the next message: ``(channel, value)``.

        Lines that are not socket.engine messages are skipped and counted
        in :attr:`ignored`.  An ``"__image"`` is answered with ``"__ack"``
        before it is returned.  A cancelled receive loses nothing: if it is
        cancelled while answering an image, the next one returns that image.

        Raises:
            ProtocolError: a line was longer than ``max_length``, or the
                latest values would hold more than ``max_stored`` bytes; the
                connection is closed with PROTOCOL_ERROR.
            IncompleteMessage: the stream ended inside a line.
            ConnectionClosed: the stream ended, or the connection is closed.
        """
        if self._unanswered is not None:
            return await self._answer(self._unanswered)
        conn = self._conn
        while True:
            line = await conn.receive()
            message = decode(line)
            if message is None:
                self._ignored += 1
                logger.debug("%r: skipped a line that is not a message", self)
                continue
            self._keep(*message, len(line))
            if message[0] == IMAGE:
                return await self._answer(message)
            return message

    async def _answer(self, image: tuple[str, Any]) -> tuple[str, Any]:
        # The image is out of the stream already: until its __ack is sent,
        # keep it for the next receive, so that a cancellation here loses
        # nothing.  A peer that is gone gets no answer, but the image it
        # sent is still delivered; the next receive reports the end.
        self._unanswered = image
        with contextlib.suppress(ConnectionClosed):
            await self._conn.send(_ACK_LINE)
        self._unanswered = None
        return image

    def _keep(self, channel: str, value: Any, size: int) -> None:
        cost = size + _ENTRY_COST
        old = self._latest.pop(channel, None)
        stored = self._stored - (0 if old is None else old[1]) + cost
        if stored > self._settings.max_stored:
            abort(self._conn, CloseReason.PROTOCOL_ERROR)
            raise ProtocolError(
                f"the latest values of {len(self._latest) + 1} channels would "
                f"hold {stored} bytes; max_stored is {self._settings.max_stored}"
            )
        self._latest[channel] = (value, cost)
        self._stored = stored


class EngineGroup:
    """The clients of one socket.engine host: ``get_ALL`` and ``write_ALL``.

    :func:`serve_engine` makes one for its clients (an :class:`EngineServer`).
    Make one yourself to serve socket.engine clients on a port that speaks
    other protocols too, and pass it to :func:`handle` with each connection
    a server hands to its handler (:meth:`write_ALL` queues on them the way
    :meth:`trionet.Server.broadcast` does, which only a server's
    connections can).

    Args:
        max_length: the longest line :meth:`write_ALL` sends, in bytes.

    .. versionadded:: 0.1
    """

    def __init__(self, *, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        self._framing = _Settings(max_length=max_length).framing
        self._members: dict[Connection, EngineConnection] = {}

    @property
    def clients(self) -> list[EngineConnection]:
        """A snapshot of the clients being served (their handler is
        running), oldest first: socket.engine's ``getClients``."""
        return list(self._members.values())

    def get_ALL(self, channel: str) -> list[Any]:
        """The latest value of ``channel`` from each client that sent one,
        oldest client first; ``[]`` if none did.

        As in socket.engine: one value per client, and reading takes
        nothing (the next call returns the same values until new ones
        arrive).  Clients whose latest value is ``null`` are left out.
        """
        values = (econn.get(channel) for econn in self.clients)
        return [value for value in values if value is not None]

    async def write_ALL(self, channel: str, value: object) -> None:
        """Send ``value`` on ``channel`` to every client, waiting on none.

        The line is encoded once.  A client whose outgoing queue is full is
        closed with :attr:`~trionet.CloseReason.SLOW_CONSUMER`; the others
        still get the line.

        Raises:
            TypeError: ``channel`` is not a str or ``value`` is not
                JSON-serialisable; nobody was sent anything.
            MessageTooLarge: the line is longer than ``max_length``; nobody
                was sent anything.
        """
        await self._deliver(encode(channel, value))

    async def _deliver(self, line: bytes) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        data = self._framing.encode(line)
        for conn in list(self._members):
            conn._offer(data)
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def _serve(
        self, conn: Connection, handler: Handler, settings: _Settings
    ) -> None:
        econn = EngineConnection(conn, settings)
        self._members[conn] = econn
        try:
            await handler(econn)
        finally:
            del self._members[conn]


class EngineServer(CompatServer, EngineGroup):
    """A running socket.engine host.  Get one from :func:`serve_engine` or
    :func:`open_engine_server`.

    :meth:`write_ALL` goes through the TCP server's
    :meth:`~trionet.Server.broadcast`, so with a ``backplane`` it reaches the
    clients of every server on it.

    .. versionadded:: 0.1
    """

    _kind = "socket.engine server"

    def __init__(self, handler: Handler, settings: _Settings) -> None:
        CompatServer.__init__(self)
        EngineGroup.__init__(self, max_length=settings.max_length)
        self._handler = handler
        self._settings = settings

    async def _deliver(self, line: bytes) -> None:
        await self.tcp_server.broadcast(line)

    async def _handle(self, conn: Connection) -> None:
        await self._serve(conn, self._handler, self._settings)


async def handle(
    conn: Connection,
    handler: Handler,
    *,
    group: EngineGroup | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    max_stored: int = DEFAULT_MAX_STORED,
) -> None:
    """Speak socket.engine, as the host, over a connection you already have.

    Runs ``handler`` with the :class:`EngineConnection`.  This is how one port
    serves several protocols: a :func:`trionet.serve_tcp` handler that sees
    ``{`` with :meth:`~trionet.Connection.peek` passes the connection on::

        engine_clients = trionet.compat.socketengine.EngineGroup()

        async def route(conn: trionet.Connection) -> None:
            if await conn.peek(1) == b"{":
                await trionet.compat.socketengine.handle(
                    conn, handler, group=engine_clients
                )

    Args:
        conn: a connection from a server.
        handler: ``async def handler(conn: EngineConnection)``.
        group: make the client one of this group's while the handler runs
            (its ``get_ALL`` and ``write_ALL`` include it).
        max_length: the longest line accepted or sent, in bytes.
        max_stored: the most JSON text, in bytes, kept as latest values.

    .. versionadded:: 0.1
    """
    settings = _Settings(max_length=max_length, max_stored=max_stored)
    if group is None:
        await handler(EngineConnection(conn, settings))
    else:
        await group._serve(conn, handler, settings)


async def serve_engine(
    handler: Handler,
    port: int,
    *,
    host: str | Sequence[str] | None = None,
    handler_nursery: trio.Nursery | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    max_stored: int = DEFAULT_MAX_STORED,
    task_status: trio.TaskStatus[EngineServer] = trio.TASK_STATUS_IGNORED,
    **options: Unpack[TcpOptions],
) -> None:
    """Serve socket.engine clients: ``handler(conn)`` runs once per client.

    Use it trio-style; it runs until cancelled or until
    :meth:`EngineServer.aclose` returns::

        async def handler(conn: EngineConnection) -> None:
            async for channel, value in conn:
                ...

        server = await nursery.start(serve_engine, handler, 8080)
        await server.write_ALL("status", "ready")

    The handler reads the client (``async for``); while it does,
    :meth:`EngineConnection.get` and :meth:`EngineServer.get_ALL` follow what
    the client wrote.  When it returns the connection is closed; an exception
    escaping it is logged and closes only that connection.

    Args:
        handler: ``async def handler(conn: EngineConnection)``.
        port: TCP port; 0 picks a free one.
        host: address or name to listen on, or a sequence of them; None
            listens on every interface.
        handler_nursery: run connection tasks inside this nursery.
        max_length: the longest line accepted or sent, in bytes.
        max_stored: the most JSON text, in bytes, one connection keeps as
            latest values.
        **options: the options of :class:`trionet.ServerOptions` except
            ``framing``.

    .. versionadded:: 0.1
    """
    settings = _Settings(max_length=max_length, max_stored=max_stored)
    server = EngineServer(handler, settings)
    await serve_over_tcp(
        server,
        server._handle,
        port,
        host=host,
        handler_nursery=handler_nursery,
        framing=settings.framing,
        task_status=task_status,
        options=options,
    )


@asynccontextmanager
async def open_engine_server(
    handler: Handler,
    port: int = 0,
    *,
    host: str | Sequence[str] | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    max_stored: int = DEFAULT_MAX_STORED,
    **options: Unpack[TcpOptions],
) -> AsyncIterator[EngineServer]:
    """A socket.engine host scoped to an ``async with`` block.

    Leaving the block shuts the server down gracefully.  Exceptions raised
    in the block reach the caller as themselves.  Takes the same arguments
    as :func:`serve_engine`.

    .. versionadded:: 0.1
    """
    async with server_in_block(
        serve_engine,
        handler,
        port,
        host=host,
        max_length=max_length,
        max_stored=max_stored,
        **options,
    ) as server:
        yield server


async def _connect(
    host: str, port: int, settings: _Settings, connect_timeout: float
) -> EngineConnection:
    conn = await connect_tcp(host, port, connect_timeout=connect_timeout)
    return EngineConnection(conn, settings)


class connect_engine(Connector[EngineConnection]):
    """Connect to a socket.engine host; use with ``async with`` or ``await``.

    ::

        async with connect_engine("127.0.0.1", 8080) as conn:
            await conn.write("test", "client is connected!")
            async for channel, value in conn:
                ...

    No background task runs: values arrive as the connection is read
    (``async for`` or :meth:`EngineConnection.receive`), and exceptions raised
    in the block reach the caller as themselves.

    Args:
        host: name or address to connect to.
        port: TCP port.
        max_length: the longest line accepted or sent, in bytes.
        max_stored: the most JSON text, in bytes, kept as latest values.
        connect_timeout: seconds allowed for connecting.

    Raises:
        ConnectError: connecting failed (see :func:`trionet.connect_tcp`).

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        max_stored: int = DEFAULT_MAX_STORED,
        connect_timeout: float = 10.0,
    ) -> None:
        settings = _Settings(max_length=max_length, max_stored=max_stored)
        super().__init__(partial(_connect, host, port, settings, connect_timeout))
