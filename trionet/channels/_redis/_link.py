"""One connection to Redis: connect, log in, send commands, read replies.

How this works
--------------
A :class:`RedisLink` is a :class:`~trionet.Connection` (made by
:func:`~trionet.connect_tcp`, or over a UNIX socket) plus a
:class:`~._resp.RespReader`.  It is used by one task at a time and never
recovers from a failure: any error, timeout or cancellation while a command
is outstanding leaves it unusable, and its owner closes it and opens a new
one.  That is what makes timeouts safe here -- a reply that arrives late can
never be mistaken for the reply to a later command.

Every failure surfaces as one exception naming its cause:

* :class:`RedisRefused` -- Redis answered and said no in a way that waiting
  will not fix: a wrong password (``WRONGPASS``), a password required
  (``NOAUTH``), an ACL denial (``NOPERM``), a database that does not exist, a
  key of the wrong type, a command it does not know, a TLS certificate that
  does not verify.  Fatal when a backplane starts.
* :class:`LinkError` -- anything else: refused or reset connections, name
  resolution, timeouts, Redis closing the connection, bytes that are not RESP.
  An outage: retry later.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Sequence
from typing import TypeVar, final

import trio

from ..._client import connect_tcp
from ..._connection import Connection
from ..._exceptions import ConnectError, ConnectionClosed, ProtocolError
from ._resp import (
    ArrayHeader,
    Event,
    NeedData,
    Reply,
    ReplyError,
    RespReader,
    encode_command,
)
from ._url import RedisAddress

__all__ = [
    "LinkError",
    "RedisLink",
    "RedisRefused",
    "expect_array",
    "is_refusal",
    "open_link",
]

_T = TypeVar("_T")
#: Bytes asked of the connection per receive.
_CHUNK = 64 * 1024
#: Error codes that mean "not allowed", not "not now".
_REFUSALS = frozenset({"WRONGPASS", "NOAUTH", "NOPERM", "WRONGTYPE"})


class LinkError(Exception):
    """The connection failed (an outage); the message says how."""


class RedisRefused(Exception):
    """Redis refused us for a reason that waiting will not fix."""


def is_refusal(error: ReplyError) -> bool:
    """Whether an error reply is a refusal rather than a passing condition."""
    return error.code in _REFUSALS or error.message.startswith(
        ("ERR unknown command", "ERR DB index", "ERR AUTH", "ERR invalid password")
    )


@final
class RedisLink:
    """One connection to Redis, used by one task at a time."""

    def __init__(self, conn: Connection, reader: RespReader) -> None:
        self._conn = conn
        self._reader = reader
        #: The server's run_id (from INFO), or None if it would not say.
        self.run_id: str | None = None

    async def aclose(self) -> None:
        """Close the connection at once (nothing is ever left to flush)."""
        with trio.CancelScope() as scope:
            scope.cancel()  # no TLS goodbye: the peer may not be listening
            await self._conn.aclose()

    async def send(self, *commands: Sequence[bytes | str | int]) -> None:
        """Send ``commands`` in one write (a pipeline)."""
        data = b"".join(encode_command(*command) for command in commands)
        try:
            await self._conn.send_all(data)
        except (ConnectionClosed, OSError, trio.BrokenResourceError) as exc:
            raise LinkError(f"sending failed: {_reason(exc)}") from exc

    async def next_event(self) -> Event:
        """The next item of a reply (see :meth:`RespReader.next_event`)."""
        return await self._complete(self._reader.next_event)

    async def next_reply(self) -> Reply:
        """The next whole reply; an error reply is returned, not raised."""
        return await self._complete(self._reader.next_reply)

    async def call(self, *command: bytes | str | int) -> Reply:
        """Send one command and return its reply.

        Raises:
            RedisRefused: Redis refused it for good (see :func:`is_refusal`).
            LinkError: the connection failed, or Redis answered with another
                error.
        """
        await self.send(command)
        reply = await self.next_reply()
        if isinstance(reply, ReplyError):
            name = str(command[0])
            if is_refusal(reply):
                raise RedisRefused(f"{name} refused: {reply.message}")
            raise LinkError(f"{name} failed: {reply.message}")
        return reply

    async def _complete(self, step: Callable[[], _T | NeedData]) -> _T:
        # Run a reader step, receiving more until it has what it needs.
        while True:
            try:
                item = step()
            except ProtocolError as exc:
                raise LinkError(str(exc)) from exc
            if not isinstance(item, NeedData):
                return item
            await self._receive()

    async def _receive(self) -> None:
        try:
            data = await self._conn.receive_some(_CHUNK)
        except (ConnectionClosed, OSError, trio.BrokenResourceError) as exc:
            raise LinkError(f"receiving failed: {_reason(exc)}") from exc
        if not data:
            raise LinkError("Redis closed the connection")
        self._reader.feed(data)


async def expect_array(link: RedisLink) -> int | None:
    """Read an array header; its length, or None for a nil array.

    Raises:
        LinkError: the next item is something else.
    """
    event = await link.next_event()
    if event is None or isinstance(event, ArrayHeader):
        return None if event is None else event.length
    if isinstance(event, ReplyError):
        raise LinkError(f"Redis replied {event.message}")
    raise LinkError(f"Redis sent {event!r} where an array was due")


async def open_link(
    address: RedisAddress,
    *,
    ssl_context: ssl.SSLContext | None,
    connect_timeout: float,
    max_bulk: int,
) -> RedisLink:
    """Connect, log in, select the database and ask for the run_id.

    The caller bounds the time taken (``connect_timeout`` is also given to
    the TCP connect, so that its error names the cause).

    Raises:
        RedisRefused: the login or SELECT was refused, or the TLS certificate
            did not verify.
        LinkError: anything else went wrong.
    """
    conn = await _connect(address, ssl_context, connect_timeout)
    link = RedisLink(conn, RespReader(max_bulk=max_bulk, max_reply=max_bulk + _CHUNK))
    try:
        commands: list[tuple[str | int, ...]] = []
        if address.password is not None:
            user = () if address.username is None else (address.username,)
            commands.append(("AUTH", *user, address.password))
        if address.db:
            commands.append(("SELECT", address.db))
        commands.append(("INFO", "server"))
        await link.send(*commands)
        replies = [await link.next_reply() for _ in commands]
        for command, reply in zip(commands, replies, strict=True):
            if isinstance(reply, ReplyError) and (
                command[0] != "INFO" or reply.code in ("NOAUTH", "WRONGPASS")
            ):
                raise RedisRefused(f"{command[0]} refused: {reply.message}")
        info = replies[-1]
        if isinstance(info, bytes):
            link.run_id = _run_id(info)
    except BaseException:
        await link.aclose()
        raise
    return link


async def _connect(
    address: RedisAddress, ssl_context: ssl.SSLContext | None, connect_timeout: float
) -> Connection:
    if address.path is not None:
        try:
            stream = await trio.open_unix_socket(address.path)
        except OSError as exc:
            raise LinkError(
                f"cannot connect to {address.path}: {exc.strerror or exc}"
            ) from exc
        return Connection(stream)
    assert address.host is not None
    if address.tls and ssl_context is None:
        ssl_context = ssl.create_default_context()
    try:
        return await connect_tcp(
            address.host,
            address.port,
            ssl_context=ssl_context if address.tls else None,
            connect_timeout=connect_timeout,
        )
    except ConnectError as exc:
        if isinstance(exc.__cause__, ssl.SSLCertVerificationError):
            raise RedisRefused(str(exc)) from exc
        raise LinkError(str(exc)) from exc


def _run_id(info: bytes) -> str | None:
    for line in info.splitlines():
        if line.startswith(b"run_id:"):
            return line[7:].strip().decode("ascii", "replace") or None
    return None


def _reason(exc: BaseException) -> str:
    cause = exc.__cause__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(exc) or type(exc).__name__
