"""Wire format v1 of named channels.  Sans-IO: bytes in, bytes out, no trio.

How this works
--------------
Every channel message travels as one :class:`~trionet.Frames` frame (a 4-byte
big-endian length, then the frame payload).  The frame payload is::

    byte  0         1         2         3         4 .. 4+n-1      4+n ..
          +---------+---------+-------------------+---------------+------------+
          | version |  flags  |  name length n    |  name         |  data      |
          |  0x01   |  0x00   |  u16, big-endian  |  n bytes of   |  the rest  |
          |         |         |  1 <= n <= 255    |  UTF-8        |  (bytes)   |
          +---------+---------+-------------------+---------------+------------+

* ``version`` is 1.  Anything else is refused.
* ``flags`` is reserved and must be 0 in version 1; a receiver refuses other
  values, so a later revision can give them meaning without being misread.
* ``n`` is between 1 and :data:`MAX_NAME_LENGTH` (255); the two bytes leave
  room for a later revision to raise that limit.
* The name is strict UTF-8 (no surrogates).  Names are compared as exact
  strings: no case folding or Unicode normalisation.
* ``data`` is everything after the name, possibly nothing.  It is opaque
  bytes: a str given to :func:`encode` travels as its UTF-8 encoding and the
  receiver gets bytes back.

:func:`decode` checks all of this and raises :class:`~trionet.ProtocolError`
with a message naming the fault; it never raises anything else for any input.
"""

from __future__ import annotations

import functools
import struct

from .._codec import as_bytes
from .._exceptions import MessageTooLarge, ProtocolError

__all__ = [
    "FRAME_HEADER_SIZE",
    "MAX_NAME_LENGTH",
    "PREFIX_SIZE",
    "VERSION",
    "channel_header",
    "decode",
    "encode",
    "encode_frame",
]

#: The wire format version this module speaks.
VERSION = 1
#: The longest channel name, in bytes of UTF-8.
MAX_NAME_LENGTH = 255
#: Bytes before the name: version, flags and the name length.
PREFIX_SIZE = 4
#: Bytes of the length prefix of the :class:`~trionet.Frames` frame around it.
FRAME_HEADER_SIZE = 4

_PREFIX = struct.Struct(">BBH")


@functools.lru_cache(maxsize=1024)
def channel_header(channel: str) -> bytes:
    """The bytes that precede the data of every message on ``channel``.

    Also the one place that checks a channel name given by our caller.

    Raises:
        TypeError: ``channel`` is not a str.
        ValueError: ``channel`` is empty, cannot be encoded as UTF-8 (lone
            surrogates), or is longer than :data:`MAX_NAME_LENGTH` bytes.
    """
    if not isinstance(channel, str):
        raise TypeError(f"channel name must be a str, not {type(channel).__name__}")
    if not channel:
        raise ValueError("channel name must not be empty")
    try:
        name = channel.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"channel name {channel!r} is not encodable as UTF-8") from exc
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(
            f"channel name is {len(name)} bytes of UTF-8; "
            f"the limit is {MAX_NAME_LENGTH}"
        )
    return _PREFIX.pack(VERSION, 0, len(name)) + name


def encode(channel: str, data: bytes | bytearray | memoryview | str) -> bytes:
    """The frame payload of one message: header, then ``data`` (str as UTF-8).

    Raises:
        TypeError: ``channel`` is not a str or ``data`` is not bytes-like or str.
        ValueError: the channel name is invalid (see :func:`channel_header`).
    """
    return channel_header(channel) + as_bytes(data)


def encode_frame(
    channel: str, data: bytes | bytearray | memoryview | str, max_size: int
) -> bytes:
    """One whole frame on the wire: the 4-byte length prefix and the payload.

    Built with a single copy of ``data``, which matters for large messages.

    Raises:
        MessageTooLarge: the frame payload would be larger than ``max_size``;
            nothing is returned.
        TypeError, ValueError: as for :func:`encode`.
    """
    header = channel_header(channel)
    body = as_bytes(data)
    size = len(header) + len(body)
    if size > max_size:
        raise MessageTooLarge(
            f"message of {len(body)} bytes on channel {channel!r} does not fit "
            f"max_size={max_size} (the channel header takes {len(header)} bytes)"
        )
    return b"".join((size.to_bytes(FRAME_HEADER_SIZE, "big"), header, body))


def decode(payload: bytes | bytearray | memoryview) -> tuple[str, bytes]:
    """Split one received frame payload into ``(channel, data)``.

    Raises:
        ProtocolError: the payload is not a valid version 1 channel message;
            the message says what is wrong.  Nothing else is ever raised.
    """
    size = len(payload)
    if size < PREFIX_SIZE:
        raise ProtocolError(
            f"channel frame of {size} bytes is shorter than "
            f"the {PREFIX_SIZE}-byte channel header"
        )
    version, flags, length = _PREFIX.unpack_from(payload)
    if version != VERSION:
        raise ProtocolError(
            f"channel frame has wire format version {version}; "
            f"this side speaks version {VERSION}"
        )
    if flags:
        raise ProtocolError(
            f"channel frame has flags 0x{flags:02x}; version {VERSION} defines none"
        )
    if length == 0:
        raise ProtocolError("channel frame has an empty channel name")
    if length > MAX_NAME_LENGTH:
        raise ProtocolError(
            f"channel name length {length} is over the limit of {MAX_NAME_LENGTH} bytes"
        )
    end = PREFIX_SIZE + length
    if end > size:
        raise ProtocolError(
            f"channel name length {length} runs past the end of the {size}-byte frame"
        )
    try:
        channel = str(payload[PREFIX_SIZE:end], "utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(
            f"channel name is not valid UTF-8 ({exc.reason} at byte {exc.start})"
        ) from exc
    return channel, bytes(payload[end:])
