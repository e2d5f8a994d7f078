"""Fault-injection wrappers for any trio stream.

How this works
--------------

Each wrapper holds a ``transport_stream`` (any :class:`trio.abc.Stream`) and is
itself a :class:`trio.abc.HalfCloseableStream`, so it can stand wherever the
wrapped stream stood: under a trionet ``Connection``, under another wrapper,
or in a hand-written test.  The shared base class owns what every wrapper must
get right for the stream contract -- argument checks on ``receive_some``,
:class:`trio.BusyResourceError` for concurrent calls on one side (a wrapper
that buffers or sleeps cannot rely on the inner stream to notice),
:class:`trio.ClosedResourceError` after :meth:`aclose`, and waking any task the
wrapper itself parked (a delay or a stall) when the stream is closed.  The
subclasses override only the hooks ``_receive`` and, for the send side,
``_send_all`` / ``_wait_send_all_might_not_block`` / ``_send_eof``.

One class per wrapper, always half-closeable: ``send_eof`` is forwarded when
the wrapped stream is a :class:`trio.abc.HalfCloseableStream` and raises
:class:`TypeError` otherwise (see ``can_send_eof``).

No wrapper ever loses a byte it took from the wrapped stream: bytes read but
not yet delivered (because of ``max_bytes``, a chunk boundary or a cancelled
delay) stay buffered for the next ``receive_some``.  ``ResetAfter`` and
``StallAfter`` never read past their limit at all: they ask the wrapped stream
for at most the bytes still allowed.
"""

from __future__ import annotations

import errno
import math
import operator
import os
import random
from types import TracebackType
from typing import NoReturn

import trio

__all__ = ["ChunkedStream", "DelayedStream", "ResetAfter", "StallAfter"]


def _check_count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _reset_error(nbytes: int) -> trio.BrokenResourceError:
    cause = ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET))
    error = trio.BrokenResourceError(
        f"connection reset (injected by ResetAfter after {nbytes} bytes received)"
    )
    error.__cause__ = cause
    return error


class _Guard:
    """Raises BusyResourceError when two tasks use one side at once."""

    __slots__ = ("_busy", "_what")

    def __init__(self, what: str) -> None:
        self._what = what
        self._busy = False

    def __enter__(self) -> None:
        if self._busy:
            raise trio.BusyResourceError(
                f"another task is already {self._what} on this stream"
            )
        self._busy = True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._busy = False


class _FaultStream(trio.abc.HalfCloseableStream):
    """Shared plumbing of the fault-injection wrappers (not public)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        if not isinstance(stream, trio.abc.Stream):
            raise TypeError(
                f"expected a trio.abc.Stream to wrap, not {type(stream).__name__}"
            )
        #: The wrapped stream.
        self.transport_stream = stream
        self._closed = False
        self._closed_event = trio.Event()
        self._receive_guard = _Guard("receiving")
        self._send_guard = _Guard("sending")

    @property
    def can_send_eof(self) -> bool:
        """Whether :meth:`send_eof` works: the wrapped stream is half-closeable."""
        return isinstance(self.transport_stream, trio.abc.HalfCloseableStream)

    # -- helpers for the subclasses ------------------------------------------

    def _raise_if_closed(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this stream was closed")

    async def _checkpoint_open(self) -> None:
        """A checkpoint, then ClosedResourceError if the stream is closed."""
        await trio.lowlevel.checkpoint()
        self._raise_if_closed()

    async def _wait_closed(self) -> NoReturn:
        """Block until the stream is closed (or cancelled), then raise."""
        await self._closed_event.wait()
        raise trio.ClosedResourceError("this stream was closed")

    async def _sleep_unless_closed(self, seconds: float) -> None:
        with trio.move_on_after(seconds):
            await self._closed_event.wait()
        self._raise_if_closed()

    # -- hooks ----------------------------------------------------------------

    async def _receive(self, max_bytes: int | None) -> bytes | bytearray:
        raise NotImplementedError  # pragma: no cover

    async def _send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport_stream.send_all(data)

    async def _wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def _send_eof(self) -> None:
        inner = self.transport_stream
        if not isinstance(inner, trio.abc.HalfCloseableStream):
            raise TypeError(
                f"cannot send_eof: the wrapped {type(inner).__name__} is not a "
                "trio.abc.HalfCloseableStream"
            )
        await inner.send_eof()

    # -- the trio.abc.HalfCloseableStream interface --------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """Receive bytes, with this wrapper's fault applied.

        Args:
            max_bytes: The most bytes to return, or None for "the wrapper
                chooses".

        Returns:
            At least one byte, or ``b""`` at end of stream.

        Raises:
            ValueError: ``max_bytes`` is less than 1.
            trio.BusyResourceError: another task is receiving on this stream.
            trio.ClosedResourceError: this stream was closed.
            trio.BrokenResourceError: the wrapped stream broke, or the wrapper
                injected a reset.

        .. versionadded:: 0.1
        """
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        with self._receive_guard:
            if self._closed:
                await self._checkpoint_open()
            return await self._receive(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data`` through the wrapped stream.

        Raises:
            trio.BusyResourceError: another task is sending on this stream.
            trio.ClosedResourceError: this stream was closed.
            trio.BrokenResourceError: the wrapped stream broke, or the wrapper
                injected a reset.

        .. versionadded:: 0.1
        """
        with self._send_guard:
            if self._closed:
                await self._checkpoint_open()
            await self._send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        """Block until a :meth:`send_all` might not block.

        .. versionadded:: 0.1
        """
        with self._send_guard:
            if self._closed:
                await self._checkpoint_open()
            await self._wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        """Close the sending side of the wrapped stream.

        Raises:
            TypeError: the wrapped stream is not a
                :class:`trio.abc.HalfCloseableStream` (see :attr:`can_send_eof`).

        .. versionadded:: 0.1
        """
        with self._send_guard:
            if self._closed:
                await self._checkpoint_open()
            await self._send_eof()

    async def aclose(self) -> None:
        """Close this wrapper and the wrapped stream.

        Tasks blocked in this wrapper's delay or stall wake with
        :class:`trio.ClosedResourceError`.

        .. versionadded:: 0.1
        """
        self._closed = True
        self._closed_event.set()
        await self.transport_stream.aclose()


class ChunkedStream(_FaultStream):
    """Delivers received bytes cut into small chunks.

    With ``chunk_size``, the byte stream is cut every ``chunk_size`` bytes;
    with ``seed``, it is cut after random lengths in ``1..max_chunk`` drawn
    from ``random.Random(seed)``, so the same seed gives the same cuts.  The
    cut points are offsets in the byte stream, not in each read: if a chunk
    is cut short (the wrapped stream had no more bytes yet, or ``max_bytes``
    was smaller), the next ``receive_some`` finishes that chunk first.
    Chunks are never joined across reads of the wrapped stream: waiting to
    fill a chunk could deadlock a request/response exchange.

    Every byte is delivered, in order; end of stream is passed on after the
    buffered bytes.  Sends are forwarded unchanged.

    ::

        stream = ChunkedStream(server_stream, chunk_size=1)  # one byte at a time

    Args:
        stream: The stream to wrap.
        chunk_size: Cut every ``chunk_size`` bytes (at least 1).
        seed: Cut after random lengths from ``random.Random(seed)`` instead.
            Give exactly one of ``chunk_size`` and ``seed``.
        max_chunk: The longest random chunk (at least 1; used with ``seed``).

    Raises:
        ValueError: neither or both of ``chunk_size`` and ``seed`` were
            given, or a size is below 1.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        chunk_size: int | None = None,
        seed: int | None = None,
        max_chunk: int = 64,
    ) -> None:
        super().__init__(stream)
        if (chunk_size is None) == (seed is None):
            raise ValueError("give exactly one of chunk_size and seed")
        _check_count("max_chunk", max_chunk, 1)
        self._random: random.Random | None = None
        if chunk_size is not None:
            self._chunk_size = _check_count("chunk_size", chunk_size, 1)
        else:
            self._chunk_size = 0
            self._random = random.Random(seed)
        self._max_chunk = max_chunk
        self._buffer = bytearray()
        self._left_in_chunk = 0

    def _next_chunk_length(self) -> int:
        if self._random is None:
            return self._chunk_size
        return self._random.randint(1, self._max_chunk)

    async def _receive(self, max_bytes: int | None) -> bytes | bytearray:
        if self._buffer:
            await self._checkpoint_open()
        else:
            data = await self.transport_stream.receive_some()
            if not data:
                return b""
            self._buffer += data
        if self._left_in_chunk == 0:
            self._left_in_chunk = self._next_chunk_length()
        size = min(len(self._buffer), self._left_in_chunk)
        if max_bytes is not None:
            size = min(size, max_bytes)
        chunk = bytes(self._buffer[:size])
        del self._buffer[:size]
        self._left_in_chunk -= size
        return chunk


class DelayedStream(_FaultStream):
    """Waits ``delay`` seconds before delivering each received chunk.

    The delay starts once the wrapped stream has returned bytes; each
    ``receive_some`` that returns data waits once (so wrap a
    :class:`ChunkedStream` to delay every small chunk).  End of stream is
    passed on without delay.  If the wait is cancelled, the bytes stay
    buffered and the next ``receive_some`` waits the full delay again.
    Sends are forwarded unchanged.

    The wait uses trio's clock, so under :class:`trio.testing.MockClock`
    (pytest-trio's ``autojump_clock``) it takes no real time.

    Args:
        stream: The stream to wrap.
        delay: Seconds to wait before each chunk (finite, at least 0).

    Raises:
        ValueError: ``delay`` is negative, infinite or NaN.

    .. versionadded:: 0.1
    """

    def __init__(self, stream: trio.abc.Stream, delay: float) -> None:
        super().__init__(stream)
        if isinstance(delay, bool) or not isinstance(delay, (int, float)):
            raise TypeError(f"delay must be a number, not {type(delay).__name__}")
        if not (math.isfinite(delay) and delay >= 0):
            raise ValueError(f"delay must be finite and >= 0, got {delay!r}")
        self._delay = float(delay)
        self._buffer = bytearray()

    async def _receive(self, max_bytes: int | None) -> bytes | bytearray:
        if not self._buffer:
            data = await self.transport_stream.receive_some(max_bytes)
            if not data:
                return b""
            self._buffer += data
        await self._sleep_unless_closed(self._delay)
        size = len(self._buffer) if max_bytes is None else max_bytes
        chunk = bytes(self._buffer[:size])
        del self._buffer[:size]
        return chunk


class ResetAfter(_FaultStream):
    """Delivers the first ``nbytes`` received, then acts like a reset connection.

    Once ``nbytes`` bytes have been received through the wrapper, the next
    ``receive_some`` -- and every send from then on -- raises
    :class:`trio.BrokenResourceError` chained from a
    :class:`ConnectionResetError`, as a reset socket would; it never reads
    past ``nbytes`` from the wrapped stream.  With ``nbytes=0`` the stream is
    reset from the start.  If the wrapped stream ends first, its end of stream
    is passed on.

    Only this side sees the reset: the peer notices nothing until this
    wrapper is closed.

    Args:
        stream: The stream to wrap.
        nbytes: How many bytes to deliver before the reset (at least 0).

    Raises:
        ValueError: ``nbytes`` is negative.

    .. versionadded:: 0.1
    """

    def __init__(self, stream: trio.abc.Stream, nbytes: int) -> None:
        super().__init__(stream)
        self._nbytes = _check_count("nbytes", nbytes, 0)
        self._remaining = nbytes

    @property
    def is_reset(self) -> bool:
        """Whether the ``nbytes`` have been received, so every call now fails."""
        return self._remaining == 0

    async def _raise_reset(self) -> NoReturn:
        await self._checkpoint_open()
        raise _reset_error(self._nbytes)

    async def _receive(self, max_bytes: int | None) -> bytes | bytearray:
        if self._remaining == 0:
            await self._raise_reset()
        limit = self._remaining
        if max_bytes is not None:
            limit = min(limit, max_bytes)
        data = await self.transport_stream.receive_some(limit)
        self._remaining -= len(data)
        return data

    async def _send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._remaining == 0:
            await self._raise_reset()
        await self.transport_stream.send_all(data)

    async def _wait_send_all_might_not_block(self) -> None:
        if self._remaining == 0:
            await self._raise_reset()
        await self.transport_stream.wait_send_all_might_not_block()

    async def _send_eof(self) -> None:
        if self._remaining == 0:
            await self._raise_reset()
        await super()._send_eof()


class StallAfter(_FaultStream):
    """Delivers the first ``nbytes`` received, then stalls like a slow peer.

    After ``nbytes`` bytes have been received through the wrapper, every
    ``receive_some`` blocks until it is cancelled or the wrapper is closed
    (then it raises :class:`trio.ClosedResourceError`).  It never reads past
    ``nbytes`` from the wrapped stream.  If the wrapped stream ends first,
    its end of stream is passed on.

    With ``stall_sends_after``, the send side stalls too: the first
    ``stall_sends_after`` bytes are sent, then ``send_all`` (after sending
    the part that still fits), ``wait_send_all_might_not_block`` and
    ``send_eof`` block the same way.

    Args:
        stream: The stream to wrap.
        nbytes: Bytes to deliver before receives stall (at least 0), or None
            to never stall receives.
        stall_sends_after: Bytes to send before sends stall (at least 0), or
            None (the default) to never stall sends.

    Raises:
        ValueError: a count is negative, or both are None.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        nbytes: int | None,
        *,
        stall_sends_after: int | None = None,
    ) -> None:
        super().__init__(stream)
        if nbytes is None and stall_sends_after is None:
            raise ValueError("nothing to stall: give nbytes or stall_sends_after")
        if nbytes is not None:
            _check_count("nbytes", nbytes, 0)
        if stall_sends_after is not None:
            _check_count("stall_sends_after", stall_sends_after, 0)
        self._receive_left = nbytes
        self._send_left = stall_sends_after

    @property
    def receive_stalled(self) -> bool:
        """Whether receives now block (the ``nbytes`` have been received)."""
        return self._receive_left == 0

    @property
    def send_stalled(self) -> bool:
        """Whether sends now block (``stall_sends_after`` bytes were sent)."""
        return self._send_left == 0

    async def _receive(self, max_bytes: int | None) -> bytes | bytearray:
        left = self._receive_left
        if left is None:
            return await self.transport_stream.receive_some(max_bytes)
        if left == 0:
            await self._wait_closed()
        limit = left if max_bytes is None else min(max_bytes, left)
        data = await self.transport_stream.receive_some(limit)
        self._receive_left = left - len(data)
        return data

    async def _send_all(self, data: bytes | bytearray | memoryview) -> None:
        left = self._send_left
        if left is None:
            await self.transport_stream.send_all(data)
            return
        if left == 0:
            await self._wait_closed()
        octets = memoryview(data).cast("B")
        head = octets[:left]
        await self.transport_stream.send_all(head)
        self._send_left = left - len(head)
        if len(octets) > len(head):
            await self._wait_closed()

    async def _wait_send_all_might_not_block(self) -> None:
        if self._send_left == 0:
            await self._wait_closed()
        await self.transport_stream.wait_send_all_might_not_block()

    async def _send_eof(self) -> None:
        if self._send_left == 0:
            await self._wait_closed()
        await super()._send_eof()
