"""The receive buffer that every receive mode reads from.

How this works
--------------
A connection owns one ``ReceiveBuffer``.  Bytes from the transport are
appended with :meth:`ReceiveBuffer.feed`; the ``extract_*`` methods remove one
whole message from the front, or return ``None`` ("need more data") and leave
the buffer untouched.  Because all modes read the same buffer, a caller may
read a header line, then exactly N bytes of body, then a frame.

Every method runs in time linear in the bytes it is given, however those bytes
were chunked:

* Removing from the front is ``del buf[:n]``, which CPython's bytearray does
  in O(1) by moving its start pointer.
* A line search never rescans bytes it already searched: ``_scan`` remembers
  how far the last unsuccessful search got (for the delimiter it searched for).
* Frames are cut out of the buffer without a copy per header: a precompiled
  ``struct`` reads each length in place.  Small payloads are sliced out of
  one ``bytes`` copy of a window of the buffer (one slice each is much cheaper
  than a memoryview per payload); large ones are copied straight out.
* Limits are checked before more is buffered: a frame header announcing more
  than ``max_size`` is refused as soon as the header is complete, and a line
  with no delimiter is refused as soon as the buffer proves it too long.  Only
  what actually arrived is ever held; nothing is allocated from an announced
  length.

The verdict on a line's length is the same however the bytes were chunked: a
line is too long exactly when more than ``max_length`` bytes precede its
delimiter.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, TypeAlias

from .._exceptions import FrameTooLarge, LineTooLong

__all__ = ["ReceiveBuffer"]

# Reads the big-endian length at an offset: ``(length,) = read(buf, offset)``.
_HeaderReader: TypeAlias = Callable[
    [bytes | bytearray | memoryview, int], tuple[Any, ...]
]

_HEADER_READERS: dict[int, _HeaderReader] = {
    size: struct.Struct(fmt).unpack_from
    for size, fmt in ((1, ">B"), (2, ">H"), (4, ">I"), (8, ">Q"))
}

# Taking at least this many bytes goes through a memoryview (one copy);
# below it, a bytearray slice then ``bytes`` (two copies) is cheaper.
_COPY_THROUGH_VIEW = 8192

# extract_frames slices payloads out of ``bytes`` copies of at most
# ``_WINDOW`` buffered bytes; a payload of more than ``_SMALL_FRAME`` bytes
# that would start a window is copied straight out of the buffer instead.
# (``_WINDOW`` must hold a header and a small payload.)
_WINDOW = 128 * 1024
_SMALL_FRAME = 4096


def _header_reader(header_size: int) -> _HeaderReader:
    reader = _HEADER_READERS.get(header_size)
    if reader is not None:
        return reader

    def read(buffer: bytes | bytearray | memoryview, offset: int) -> tuple[int]:
        return (int.from_bytes(buffer[offset : offset + header_size], "big"),)

    return read


def _overlaps_itself(delimiter: bytes) -> bool:
    """Whether a proper prefix of ``delimiter`` is also its suffix."""
    return any(delimiter[:k] == delimiter[-k:] for k in range(1, len(delimiter)))


def _lines_fit(
    region: bytes, lines: list[bytes], delimiter: bytes, max_length: int
) -> bool:
    """Whether no line of ``lines`` (``region`` split at ``delimiter``) is too long.

    ``delimiter`` must not overlap itself.  Measuring every line is cheap for
    a few lines; many short lines under a large limit are checked faster by
    :func:`_fits_by_hops`.
    """
    if len(region) <= max_length:
        return True
    # A hop costs about as much as measuring 8 lines, and there are at most
    # 2 * len(region) / (max_length + 1) of them.
    if len(lines) * (max_length + 1) < 16 * len(region):
        return max(map(len, lines)) <= max_length
    return _fits_by_hops(region, delimiter, max_length)


def _fits_by_hops(region: bytes, delimiter: bytes, max_length: int) -> bool:
    """Whether no line of ``region`` split at ``delimiter`` is too long.

    Hops from line start to line start, each time to just after the last
    delimiter that ends a line short enough: every line hopped over fits, and
    two hops cover more than ``max_length`` bytes.  ``delimiter`` must not
    overlap itself.
    """
    width = len(delimiter)
    start = 0
    # ``start`` begins a line and moves forward on each pass, so this ends.
    while len(region) - start > max_length:
        end = region.rfind(delimiter, start, start + max_length + width)
        if end < 0:
            return False
        start = end + width
    return True


def large_frame_end(chunk: memoryview, header_size: int, max_size: int) -> int:
    """Where the frame at the front of ``chunk`` ends, if it is whole, its
    payload larger than a small frame, and its header within ``max_size``;
    else 0.  (For cutting a large payload straight out of a received chunk:
    one copy instead of two.)"""
    size = len(chunk)
    if size <= header_size + _SMALL_FRAME:
        return 0
    length: int = _header_reader(header_size)(chunk, 0)[0]
    end = header_size + length
    if length <= _SMALL_FRAME or length > max_size or end > size:
        return 0
    return end


class ReceiveBuffer:
    """A bytearray with whole-message extraction for each receive mode."""

    __slots__ = ("_data", "_scan", "_scan_delimiter")

    def __init__(self) -> None:
        self._data = bytearray()
        # Bytes before this offset hold no complete ``_scan_delimiter``.
        self._scan = 0
        self._scan_delimiter = b""

    def __len__(self) -> int:
        return len(self._data)

    def __bool__(self) -> bool:
        return bool(self._data)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes."""
        self._data += data

    def unread(self, data: bytes) -> None:
        """Put ``data`` back at the front (bytes taken out but not consumed)."""
        if data:
            self._data[0:0] = data
            self._scan = 0

    def peek(self) -> bytes:
        """A copy of everything buffered (for error reports)."""
        return bytes(self._data)

    def peek_exactly(self, n: int) -> bytes | None:
        """A copy of the first ``n`` bytes, or None if fewer are buffered.

        Removes nothing.
        """
        data = self._data
        if len(data) < n:
            return None
        if n < _COPY_THROUGH_VIEW:
            return bytes(data[:n])
        with memoryview(data) as view:
            return bytes(view[:n])

    def _take(self, start: int, stop: int, consumed: int) -> bytes:
        # Return data[start:stop] and drop the first ``consumed`` bytes.
        data = self._data
        if start == 0 and stop == len(data):
            out = bytes(data)
        elif stop - start < _COPY_THROUGH_VIEW:
            out = bytes(data[start:stop])
        else:
            with memoryview(data) as view:
                out = bytes(view[start:stop])
        if consumed == len(data):
            data.clear()
        else:
            del data[:consumed]
        self._scan = max(0, self._scan - consumed)
        return out

    def extract_some(self, max_bytes: int | None = None) -> bytes:
        """Remove and return up to ``max_bytes`` buffered bytes (all if None)."""
        if max_bytes is None or max_bytes >= len(self._data):
            max_bytes = len(self._data)
        return self._take(0, max_bytes, max_bytes)

    def extract_exactly(self, n: int) -> bytes | None:
        """Remove and return exactly ``n`` bytes, or None if fewer are buffered."""
        if len(self._data) < n:
            return None
        return self._take(0, n, n)

    def extract_line(self, delimiter: bytes, max_length: int) -> bytes | None:
        """Remove and return one line without its delimiter, or None.

        Raises:
            LineTooLong: more than ``max_length`` bytes come before the delimiter,
                or the buffer already holds more than a line may be with no
                delimiter in it.
        """
        data = self._data
        if delimiter != self._scan_delimiter:
            self._scan_delimiter = delimiter
            self._scan = 0
        index = data.find(delimiter, self._scan)
        if index < 0:
            width = len(delimiter)
            if len(data) >= max_length + width:
                raise LineTooLong(
                    f"line longer than max_length={max_length} bytes "
                    f"(no delimiter in the first {len(data)} bytes)"
                )
            self._scan = max(0, len(data) - width + 1)
            return None
        if index > max_length:
            raise LineTooLong(
                f"line of {index} bytes is longer than max_length={max_length}"
            )
        self._scan = 0
        return self._take(0, index, index + len(delimiter))

    def extract_lines(self, delimiter: bytes, max_length: int) -> list[bytes]:
        """Remove and return every complete line at once (maybe none).

        Lines before a too-long one are returned first; the next call raises
        :class:`LineTooLong` for it.
        """
        data = self._data
        if delimiter != self._scan_delimiter:
            self._scan_delimiter = delimiter
            self._scan = 0
        last = data.rfind(delimiter, self._scan)
        if last < 0 or _overlaps_itself(delimiter):
            # (A delimiter like b"\n\n" can overlap itself, and then split()
            # would not cut where a left-to-right search does.)
            lines = []
            try:
                while (line := self.extract_line(delimiter, max_length)) is not None:
                    lines.append(line)
            except LineTooLong:
                if not lines:
                    raise
            return lines
        with memoryview(data) as view:
            region = bytes(view[:last])
        lines = region.split(delimiter)
        if not _lines_fit(region, lines, delimiter, max_length):
            good = 0
            while len(lines[good]) <= max_length:
                good += 1
            if good == 0:
                self.extract_line(delimiter, max_length)  # raises LineTooLong
            del lines[good:]
            width = len(delimiter)
            consumed = sum(map(len, lines)) + width * good
        else:
            consumed = last + len(delimiter)
        if consumed == len(data):
            data.clear()
        else:
            del data[:consumed]
        self._scan = 0
        return lines

    def frame_length(self, header_size: int, max_size: int) -> int | None:
        """The length announced by a complete frame header at the front, or None.

        Raises:
            FrameTooLarge: the header announces more than ``max_size`` bytes.
        """
        data = self._data
        if len(data) < header_size:
            return None
        length: int = _header_reader(header_size)(data, 0)[0]
        if length > max_size:
            raise FrameTooLarge(
                f"frame header announces {length} bytes; max_size is {max_size}"
            )
        return length

    def extract_frame(self, header_size: int, max_size: int) -> bytes | None:
        """Remove and return one length-prefixed frame's payload, or None.

        Raises:
            FrameTooLarge: the header announces more than ``max_size`` bytes
                (raised as soon as the header is buffered, before the body).
        """
        length = self.frame_length(header_size, max_size)
        if length is None:
            return None
        end = header_size + length
        if len(self._data) < end:
            return None
        return self._take(header_size, end, end)

    def extract_frames(self, header_size: int, max_size: int) -> list[bytes]:
        """Remove and return every complete frame's payload at once (maybe none).

        Frames before a bad header are returned first; the next call raises
        :class:`FrameTooLarge` for it.
        """
        data = self._data
        size = len(data)
        read = _header_reader(header_size)
        out: list[bytes] = []
        append = out.append
        pos = 0
        length: int
        with memoryview(data) as view:
            while size - pos >= header_size:
                (length,) = read(data, pos)
                end = pos + header_size + length
                if length > max_size or end > size:
                    break
                if length > _SMALL_FRAME:
                    append(bytes(view[pos + header_size : end]))
                    pos = end
                    continue
                # Copy a window once and slice every payload that lies wholly
                # inside it; the frame that does not (or a bad header) is
                # looked at again by the outer loop.  The window holds at
                # least this small frame, so each pass makes progress.
                window = bytes(view[pos : pos + _WINDOW])
                limit = len(window)
                start = 0
                while limit - start >= header_size:
                    (length,) = read(window, start)
                    end = start + header_size + length
                    if length > max_size or end > limit:
                        break
                    append(window[start + header_size : end])
                    start = end
                pos += start
        if not out:
            frame = self.extract_frame(header_size, max_size)  # may raise
            return [] if frame is None else [frame]
        if pos == size:
            data.clear()
        else:
            del data[:pos]
        self._scan = 0
        return out

    def missing_for_frame(self, header_size: int, max_size: int) -> int:
        """How many more bytes the frame at the front needs (at least 1)."""
        length = self.frame_length(header_size, max_size)
        if length is None:
            return header_size - len(self._data)
        return max(1, header_size + length - len(self._data))
