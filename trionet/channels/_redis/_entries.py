"""The backplane's wire format: one Redis stream entry per message.  Sans-IO.

How this works
--------------
Every message goes into the stream ``<channel_prefix>:broadcast`` as one
entry (``XADD``) with these fields, in this order:

``origin``
    The publishing backplane's id: 32 lowercase hex digits, random for each
    :class:`~trionet.channels.RedisBackplane` object.  Optional for other
    publishers (at most 64 bytes of anything).
``seq``
    The publisher's sequence number in decimal ASCII: 1 for its first
    message, then +1 for each message.  Present exactly when ``origin`` is.
``message``
    The message itself, the bytes given to ``broadcast`` / ``publish``
    (before the server's framing).  Required.

Other fields are ignored, so a later version can add some.  With ``origin``
and ``seq`` a receiver delivers each sequence number once (a copy sent again
after a Redis restart is dropped as a duplicate) and counts a hole in the
numbers as missed messages.  Without them an entry is delivered once -- a
stream entry is read once -- with no gap detection.

:class:`Sequences` is the receiver's memory of the last number delivered per
origin; :func:`decode_entry` checks an entry's fields.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final, final

import attrs

__all__ = [
    "MAX_ORIGIN_SIZE",
    "MAX_SEQ",
    "MalformedEntry",
    "Sequences",
    "StreamEntry",
    "decode_entry",
    "encode_entry",
]

FIELD_ORIGIN: Final = b"origin"
FIELD_SEQ: Final = b"seq"
FIELD_MESSAGE: Final = b"message"
#: The longest origin accepted, in bytes.
MAX_ORIGIN_SIZE = 64
#: The largest sequence number (a signed 64-bit integer).
MAX_SEQ = 2**63 - 1


class MalformedEntry(ValueError):
    """A stream entry that is not a backplane message; it is dropped."""


@final
@attrs.frozen
class StreamEntry:
    """A decoded entry: who published it (if it says), and the message."""

    origin: bytes | None
    seq: int | None
    message: bytes


def encode_entry(origin: bytes, seq: int) -> tuple[bytes, bytes, bytes, bytes]:
    """The fields before ``message`` for entry ``seq`` of ``origin``."""
    return (FIELD_ORIGIN, origin, FIELD_SEQ, b"%d" % seq)


def decode_entry(fields: list[object]) -> StreamEntry:
    """Check the field/value list of one stream entry.

    Raises:
        MalformedEntry: no ``message``; ``origin`` without ``seq`` or the
            other way round; an origin over 64 bytes; a ``seq`` that is not a
            decimal number from 1 to 2**63 - 1; a value that is not a string.
    """
    if len(fields) % 2:
        raise MalformedEntry("an odd number of field names and values")
    found: dict[bytes, bytes] = {}
    for index in range(0, len(fields), 2):
        name, value = fields[index], fields[index + 1]
        if not isinstance(name, bytes) or not isinstance(value, bytes):
            raise MalformedEntry("a field that is not a string (or too long)")
        found.setdefault(name, value)
    message = found.get(FIELD_MESSAGE)
    if message is None:
        raise MalformedEntry("no 'message' field")
    origin = found.get(FIELD_ORIGIN)
    seq_text = found.get(FIELD_SEQ)
    if origin is None and seq_text is None:
        return StreamEntry(None, None, message)
    if origin is None or seq_text is None:
        raise MalformedEntry("'origin' and 'seq' go together")
    if not origin or len(origin) > MAX_ORIGIN_SIZE:
        raise MalformedEntry(f"an origin of {len(origin)} bytes (1 to 64 allowed)")
    if not (seq_text.isascii() and seq_text.isdigit() and len(seq_text) <= 19):
        raise MalformedEntry(f"seq {seq_text[:24]!r} is not a decimal number")
    seq = int(seq_text)
    if not 1 <= seq <= MAX_SEQ:
        raise MalformedEntry(f"seq {seq} is out of range (1 to 2**63 - 1)")
    return StreamEntry(origin, seq, message)


@final
class Sequences:
    """The last sequence number delivered for each origin (the most recent
    ``max_origins`` origins; an origin forgotten starts afresh)."""

    __slots__ = ("_last", "_max_origins")

    def __init__(self, max_origins: int) -> None:
        self._last: OrderedDict[bytes, int] = OrderedDict()
        self._max_origins = max_origins

    def __len__(self) -> int:
        return len(self._last)

    def last(self, origin: bytes) -> int | None:
        """The last number delivered for ``origin``, or None."""
        return self._last.get(origin)

    def check(self, origin: bytes, seq: int) -> int | None:
        """Record that ``seq`` of ``origin`` is delivered now.

        Returns:
            None if it was delivered before (or is older than the last one
            delivered): do not deliver it.  Otherwise how many numbers were
            skipped since the last one delivered -- 0 for the next in line,
            and 0 for the first message seen from an origin (what came
            before this backplane listened is not missed).
        """
        last = self._last.get(origin)
        if last is not None and seq <= last:
            return None
        self._last[origin] = seq
        self._last.move_to_end(origin)
        if len(self._last) > self._max_origins:
            self._last.popitem(last=False)
        return 0 if last is None else seq - last - 1
