"""Framing configurations: how messages are cut out of a byte stream.

A framing is a frozen value.  It knows how to encode one outgoing message and
how to extract one incoming message from a :class:`ReceiveBuffer`; it holds no
state of its own, so one framing may serve any number of connections.
"""

from __future__ import annotations

from typing import TypeAlias

import attrs

from .._exceptions import LineTooLong, MessageTooLarge
from ._buffer import ReceiveBuffer

__all__ = ["Frames", "Framing", "Lines", "as_bytes"]


def as_bytes(data: bytes | bytearray | memoryview | str) -> bytes:
    """``data`` as bytes: str is encoded as UTF-8, buffers are copied once."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    raise TypeError(f"expected bytes or str, not {type(data).__name__}")


def _check_delimiter(
    instance: Lines, attribute: attrs.Attribute[bytes], value: bytes
) -> None:
    if not isinstance(value, bytes) or not value:
        raise ValueError(f"delimiter must be non-empty bytes, not {value!r}")


@attrs.frozen
class Lines:
    """Delimiter-terminated lines.

    Lines are returned without their delimiter.  A line longer than
    ``max_length`` bytes (not counting the delimiter) raises
    :class:`LineTooLong`, and the verdict is the same however the bytes were
    chunked.

    With ``strip_cr=True`` one ``\\r`` right before the delimiter is part of
    the line ending and is removed too, so ``Lines(strip_cr=True)`` reads
    lines ended by ``\\n`` and by ``\\r\\n`` alike (as most line protocols
    do).  That ``\\r`` does not count toward ``max_length``: the limit is on
    what the line holds, whichever ending it had.  Sending is unchanged
    (:meth:`encode` appends the delimiter alone).

    Args:
        delimiter: the bytes that end a line.
        max_length: the longest line accepted, in bytes, without the delimiter
            (and without the removed ``\\r``).
        strip_cr: also remove one ``\\r`` that comes right before the
            delimiter.

    .. versionadded:: 0.1
    """

    delimiter: bytes = attrs.field(default=b"\n", validator=_check_delimiter)
    max_length: int = attrs.field(
        default=65536,
        validator=[attrs.validators.instance_of(int), attrs.validators.ge(0)],
    )
    strip_cr: bool = attrs.field(
        default=False, validator=attrs.validators.instance_of(bool)
    )

    def encode(self, data: bytes | bytearray | memoryview | str) -> bytes:
        """One line on the wire: ``data`` followed by the delimiter.

        Raises:
            ValueError: ``data`` contains the delimiter.
            MessageTooLarge: ``data`` is longer than ``max_length``.
        """
        payload = data if type(data) is bytes else as_bytes(data)
        if len(payload) > self.max_length:
            raise MessageTooLarge(
                f"line of {len(payload)} bytes is longer than "
                f"max_length={self.max_length}"
            )
        wire = payload + self.delimiter
        # The first delimiter on the wire must be the one appended (a
        # delimiter like b"\n\n" could otherwise start inside the payload).
        if wire.find(self.delimiter) != len(payload):
            raise ValueError(
                f"line contains the delimiter {self.delimiter!r} "
                "(or ends with part of it)"
            )
        return wire

    def extract(self, buffer: ReceiveBuffer) -> bytes | None:
        """Remove one line from ``buffer``, or return None if none is complete."""
        if not self.strip_cr:
            return buffer.extract_line(self.delimiter, self.max_length)
        # The buffer may let one byte more through (the \r); a line that
        # used it without ending in \r is too long.
        try:
            line = buffer.extract_line(self.delimiter, self.max_length + 1)
        except LineTooLong:
            raise _too_long(None, self.max_length) from None
        if line is None:
            return None
        if line.endswith(b"\r"):
            return line[:-1]
        if len(line) > self.max_length:
            raise _too_long(line, self.max_length)
        return line

    def extract_all(self, buffer: ReceiveBuffer) -> list[bytes]:
        """Remove every complete line from ``buffer`` at once.

        Lines before a too-long one are returned first; the next call raises
        :class:`LineTooLong` for it.
        """
        if not self.strip_cr:
            return buffer.extract_lines(self.delimiter, self.max_length)
        try:
            lines = buffer.extract_lines(self.delimiter, self.max_length + 1)
        except LineTooLong:
            raise _too_long(None, self.max_length) from None
        out: list[bytes] = []
        for index, line in enumerate(lines):
            if line.endswith(b"\r"):
                out.append(line[:-1])
            elif len(line) > self.max_length:
                if not out:
                    raise _too_long(line, self.max_length)
                # Give this line and those after it back, as they arrived,
                # so that the next call reaches this one and raises.
                delimiter = self.delimiter
                buffer.unread(b"".join(rest + delimiter for rest in lines[index:]))
                break
            else:
                out.append(line)
        return out


def _too_long(line: bytes | None, max_length: int) -> LineTooLong:
    # (The buffer's own message would name the limit it was given: one more.)
    if line is None:
        return LineTooLong(
            f"line longer than max_length={max_length} bytes "
            "(not counting its line end)"
        )
    return LineTooLong(
        f"line of {len(line)} bytes is longer than max_length={max_length}"
    )


_HEADER_SIZES = (1, 2, 4, 8)


@attrs.frozen
class Frames:
    """Length-prefixed frames: a big-endian unsigned length, then the payload.

    Args:
        max_size: the largest payload accepted, in bytes.  A received header
            announcing more raises :class:`FrameTooLarge` before any of the body
            is read; sending more raises :class:`MessageTooLarge` before
            anything is sent.
        header_size: bytes in the length prefix: 1, 2, 4 or 8.

    Raises:
        ValueError: ``header_size`` is not 1, 2, 4 or 8, or ``max_size`` cannot
            be expressed in a header of that size.

    .. versionadded:: 0.1
    """

    max_size: int = attrs.field(
        default=16 * 1024 * 1024,
        validator=[attrs.validators.instance_of(int), attrs.validators.ge(0)],
    )
    header_size: int = attrs.field(
        default=4, validator=attrs.validators.in_(_HEADER_SIZES)
    )

    def __attrs_post_init__(self) -> None:
        limit = (1 << (8 * self.header_size)) - 1
        if self.max_size > limit:
            raise ValueError(
                f"max_size={self.max_size} cannot be expressed in a "
                f"{self.header_size}-byte header (at most {limit})"
            )

    def header(self, size: int) -> bytes:
        """The length prefix of a ``size``-byte payload.

        Raises:
            MessageTooLarge: ``size`` is over ``max_size``.
        """
        if size > self.max_size:
            raise MessageTooLarge(
                f"frame of {size} bytes is larger than max_size={self.max_size}"
            )
        return size.to_bytes(self.header_size, "big")

    def encode(self, data: bytes | bytearray | memoryview | str) -> bytes:
        """One frame on the wire: the length prefix, then ``data``.

        Raises:
            MessageTooLarge: ``data`` is larger than ``max_size``.
        """
        payload = data if type(data) is bytes else as_bytes(data)
        size = len(payload)
        if size > self.max_size:
            self.header(size)  # raises MessageTooLarge
        return size.to_bytes(self.header_size, "big") + payload

    def extract(self, buffer: ReceiveBuffer) -> bytes | None:
        """Remove one frame's payload from ``buffer``, or return None."""
        return buffer.extract_frame(self.header_size, self.max_size)

    def extract_all(self, buffer: ReceiveBuffer) -> list[bytes]:
        """Remove every complete frame from ``buffer`` at once."""
        return buffer.extract_frames(self.header_size, self.max_size)


#: A framing configuration: :class:`Lines` or :class:`Frames`.
Framing: TypeAlias = Lines | Frames
