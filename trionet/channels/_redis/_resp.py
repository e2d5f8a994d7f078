"""RESP2, the Redis protocol, as far as the backplane needs it.  Sans-IO.

How this works
--------------
Commands go out as arrays of bulk strings (:func:`encode_command`).  Replies
come back through a :class:`RespReader`, fed whatever arrived; it reads them
in one of two ways:

* :meth:`RespReader.next_event` returns one item at a time: a scalar, or an
  array's header (:class:`ArrayHeader`) followed, on later calls, by its
  elements.  XREAD replies are read this way, so each stream entry is handed
  over as soon as it is complete and a large reply is never held whole.
* :meth:`RespReader.next_reply` returns a whole reply with its arrays built as
  lists, refusing one that grows past ``max_reply`` bytes.  For the small
  replies of AUTH, INFO, EXEC and the like.

Both return :data:`NEED_DATA` when the buffer ends inside an item; the next
call, after more :meth:`~RespReader.feed`, carries on where it stopped.  Do not
switch from one to the other inside a reply.

Guarantees, as for the connection's own receive buffer (it is the same
:class:`~trionet._codec.ReceiveBuffer`): time linear in the bytes fed however
they were chunked, and nothing allocated from an announced length.  A type
line longer than 64 KiB is refused as soon as the buffer proves it; a bulk
string longer than ``max_bulk`` is not buffered at all -- its bytes are
discarded as they arrive and :class:`Skipped` stands in its place.  Anything
that is not RESP2 raises :class:`~trionet.ProtocolError`, and a reader that
failed stays failed: the connection must be dropped.
"""

from __future__ import annotations

import re
from typing import Final, TypeAlias, final

import attrs

from ..._codec._buffer import ReceiveBuffer
from ..._exceptions import LineTooLong, ProtocolError

__all__ = [
    "NEED_DATA",
    "ArrayHeader",
    "Event",
    "NeedData",
    "Reply",
    "ReplyError",
    "RespReader",
    "Skipped",
    "encode_command",
]

#: The longest type line (``$123``, ``+OK``, ``-ERR ...``) accepted, in bytes.
MAX_LINE = 64 * 1024
#: Arrays nested deeper than this in one reply are refused by next_reply.
MAX_DEPTH = 8
_INTEGER = re.compile(rb"-?[0-9]{1,19}")
_CRLF = b"\r\n"


@final
class NeedData:
    """The buffer ends inside a reply: feed more bytes and ask again."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


@final
@attrs.frozen
class ArrayHeader:
    """An array of ``length`` elements starts; they are the next events."""

    length: int


@final
@attrs.frozen
class ReplyError:
    """An error reply (``-ERR ...``): Redis refused one command."""

    message: str

    @property
    def code(self) -> str:
        """The first word, by convention the kind of error (``WRONGPASS``)."""
        return self.message.split(" ", 1)[0]


@final
@attrs.frozen
class Skipped:
    """A bulk string of ``length`` bytes, over ``max_bulk``, was discarded."""

    length: int


Event: TypeAlias = "int | bytes | str | ArrayHeader | ReplyError | Skipped | None"
Reply: TypeAlias = "int | bytes | str | ReplyError | Skipped | list[Reply] | None"


def encode_command(*args: bytes | str | int) -> bytes:
    """One command as RESP: an array of bulk strings (str as UTF-8)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, int):
            arg = b"%d" % arg
        out += (b"$%d\r\n" % len(arg), arg, _CRLF)
    return b"".join(out)


@final
class RespReader:
    """Turns the bytes of RESP2 replies into events or whole replies."""

    __slots__ = (
        "_body",
        "_buffer",
        "_consumed",
        "_discard",
        "_failed",
        "_max_bulk",
        "_max_reply",
        "_reply_start",
        "_stack",
        "_trailer",
    )

    def __init__(self, *, max_bulk: int, max_reply: int) -> None:
        self._buffer = ReceiveBuffer()
        self._max_bulk = max_bulk
        self._max_reply = max_reply
        self._failed: str | None = None
        self._consumed = 0  # bytes taken out of the buffer so far
        self._body: int | None = None  # length of the bulk string being read
        self._discard = 0  # bytes of an oversized bulk string still to drop
        self._trailer: Skipped | None = None  # the CRLF after a skipped bulk
        # next_reply's arrays under construction: (elements, still expected).
        self._stack: list[tuple[list[Reply], int]] = []
        self._reply_start: int | None = None  # where next_reply's reply began

    @property
    def buffered(self) -> int:
        """Bytes received and not yet read."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes."""
        self._buffer.feed(data)

    def next_event(self) -> Event | NeedData:
        """The next scalar or array header, or :data:`NEED_DATA`.

        Raises:
            ProtocolError: the bytes are not RESP2 (or the reader failed before).
        """
        if self._failed is not None:
            raise ProtocolError(self._failed)
        try:
            return self._next_event()
        except ProtocolError as exc:
            self._failed = str(exc)
            raise

    def next_reply(self) -> Reply | NeedData:
        """The next whole reply, or :data:`NEED_DATA`.

        Raises:
            ProtocolError: the bytes are not RESP2, nest arrays more than 8
                deep, or make a reply longer than ``max_reply`` bytes.
        """
        if self._reply_start is None:
            self._reply_start = self._consumed
        while True:
            event = self.next_event()
            if self._consumed - self._reply_start > self._max_reply:
                self._failed = (
                    f"Redis sent a reply of more than {self._max_reply} bytes"
                )
                raise ProtocolError(self._failed)
            if isinstance(event, NeedData):
                return event
            value: Reply
            if isinstance(event, ArrayHeader):
                if event.length:
                    if len(self._stack) == MAX_DEPTH:
                        self._failed = f"Redis nested arrays over {MAX_DEPTH} deep"
                        raise ProtocolError(self._failed)
                    self._stack.append(([], event.length))
                    continue
                value = []
            else:
                value = event
            # Hang the finished value on its array; close arrays now full.
            while self._stack:
                elements, expected = self._stack[-1]
                elements.append(value)
                if len(elements) < expected:
                    break
                self._stack.pop()
                value = elements
            else:
                self._reply_start = None
                return value

    # ------------------------------------------------------------- internals

    def _next_event(self) -> Event | NeedData:
        buffer = self._buffer
        if self._discard:
            dropped = len(buffer.extract_some(self._discard))
            self._consumed += dropped
            self._discard -= dropped
            if self._discard:
                return NEED_DATA
        if self._trailer is not None:
            if self._take(2) is None:
                return NEED_DATA
            skipped, self._trailer = self._trailer, None
            return skipped
        if self._body is not None:
            data = self._take(self._body + 2)
            if data is None:
                return NEED_DATA
            self._body = None
            return data[:-2]
        try:
            line = buffer.extract_line(_CRLF, MAX_LINE)
        except LineTooLong:
            raise ProtocolError(
                f"Redis sent a line of more than {MAX_LINE} bytes"
            ) from None
        if line is None:
            return NEED_DATA
        self._consumed += len(line) + 2
        kind, rest = line[:1], line[1:]
        if kind == b"$":
            length = self._length(rest, "bulk string")
            if length < 0:
                return None
            if length > self._max_bulk:
                self._discard = length
                self._trailer = Skipped(length)
            else:
                self._body = length
            return self._next_event()
        if kind == b"*":
            length = self._length(rest, "array")
            return None if length < 0 else ArrayHeader(length)
        if kind == b"+":
            return rest.decode("utf-8", "replace")
        if kind == b"-":
            return ReplyError(rest.decode("utf-8", "replace"))
        if kind == b":":
            if _INTEGER.fullmatch(rest) is None:
                raise ProtocolError(f"Redis sent an invalid integer {rest[:40]!r}")
            return int(rest)
        raise ProtocolError(f"Redis sent a reply of unknown type {line[:40]!r}")

    def _take(self, size: int) -> bytes | None:
        # ``size`` bytes ending in CRLF, or None until they are all here.
        data = self._buffer.extract_exactly(size)
        if data is None:
            return None
        self._consumed += size
        if not data.endswith(_CRLF):
            raise ProtocolError("Redis sent a bulk string not followed by CRLF")
        return data

    @staticmethod
    def _length(text: bytes, what: str) -> int:
        if _INTEGER.fullmatch(text) is None or int(text) < -1:
            raise ProtocolError(f"Redis sent an invalid {what} length {text[:40]!r}")
        return int(text)
