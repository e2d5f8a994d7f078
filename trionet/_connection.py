"""Connection: a transport, one shared receive buffer, a send path and a close reason.

How this works
--------------
Receiving.  Every receive mode reads the same :class:`ReceiveBuffer`.  A
receive first tries to cut a whole message out of what is already buffered and
returns it without passing through the scheduler (it still raises if the task
was cancelled); only when the buffer holds no whole message does it ask the
transport for more.  Bytes already received are appended to the buffer before
anything can be cancelled, so a cancelled receive loses nothing.

Sending.  A connection owned by a server (one with a *writer nursery*) has a
bounded outgoing queue.  A send that finds the queue empty writes straight to
the socket without waiting; whatever the kernel does not take goes into the
queue, drained by a writer task that joins everything queued into as few
socket sends as it can.  While the queue exists every send appends to it:
``send*`` waits while the queue is full (backpressure on that sender only),
and a broadcast, which must never wait, closes a connection whose queue is
full with :attr:`CloseReason.SLOW_CONSUMER`.  Order is the queue's order, for
sends and broadcasts alike.  The queue and its writer task exist only while
there is something to write, so an idle connection costs no task.

A connection with no writer nursery (a client: it has no background task, so
exceptions in the caller's block are never wrapped in an ExceptionGroup)
writes under a FIFO lock instead, and ``send*`` returns once the kernel took
the bytes.

Closing.  The first cause sets ``close_reason``, once.  A clean end of stream
from the peer sets :attr:`CloseReason.CLOSED_BY_PEER` but leaves the sending
side open, so a half-closing peer still gets its reply.  Everything the
connection accepted for sending is flushed before the socket closes (bounded
by the flush timeout).
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
from collections import deque
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, TypeVar

import trio

from ._codec import Frames, Framing, Lines, ReceiveBuffer, as_bytes
from ._exceptions import (
    CloseReason,
    ConnectionClosed,
    IncompleteMessage,
    ProtocolError,
)
from ._transport import Address, SocketTransport, StreamTransport, Transport

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["DEFAULT_SEND_QUEUE_SIZE", "Connection"]

logger = logging.getLogger("trionet")

#: Messages a connection's outgoing queue holds before ``send*`` waits.
DEFAULT_SEND_QUEUE_SIZE = 256
#: Seconds that closing waits for queued messages to reach the kernel.
DEFAULT_FLUSH_TIMEOUT = 5.0
#: The most bytes one write of the writer task joins together.
MAX_BATCH_BYTES = 256 * 1024
#: Sends that may go straight to the kernel before one passes through the scheduler.
SENDS_PER_YIELD = 256
#: A message of which this many bytes have arrived and at least as many are
#: missing receives the rest straight into buffers of its own (fewer copies,
#: fewer and larger recv calls).
DIRECT_RECEIVE_MIN = 256 * 1024

_DEFAULT_LINES = Lines()
_DEFAULT_FRAMES = Frames()

_T = TypeVar("_T")
BytesLike = bytes | bytearray | memoryview

_TRANSPORT_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


def _iteration_end(error: ConnectionClosed, iterating: bool) -> BaseException:
    """What ends ``async for``: StopAsyncIteration when the peer closed
    cleanly between messages, else ``error`` itself."""
    if (
        iterating
        and error.reason is CloseReason.CLOSED_BY_PEER
        and not isinstance(error, IncompleteMessage)
    ):
        return StopAsyncIteration()
    return error


class _Owner(Protocol):
    # (The owner itself, not a bound method: 64 bytes less per connection.)
    def _connection_closed(self, conn: Connection, /) -> None: ...


def _checked_framing(framing: Framing | None) -> Framing | None:
    if framing is not None and not isinstance(framing, Lines | Frames):
        raise TypeError(f"framing must be Lines, Frames or None, not {framing!r}")
    return framing


class Connection:
    """One byte stream with line, sized and framed receive modes.

    Build one over any :class:`trio.abc.Stream` (or get one from
    :func:`connect_tcp` or a server's handler)::

        conn = trionet.Connection(stream, framing=trionet.Lines())
        await conn.send(b"hello")
        reply = await conn.receive()

    Receive modes may be mixed freely: they all read one buffer.  Sends from
    several tasks never interleave the bytes of two messages.

    Args:
        stream: the stream to speak over.
        framing: what :meth:`receive`, :meth:`send` and ``async for`` use:
            :class:`Lines`, :class:`Frames`, or None for raw bytes.

    .. versionadded:: 0.1
    """

    __slots__ = (
        "__weakref__",
        "_batch_ok",
        "_cork",
        "_cork_bytes",
        "_drained",
        "_eof",
        "_flush_timeout",
        "_framing",
        "_last_receive",
        "_message_started",
        "_on_closed",
        "_queue_receive",
        "_queue_send",
        "_queue_size",
        "_ready",
        "_reason",
        "_receive_buffer",
        "_receiving",
        "_send_lock",
        "_sends_since_yield",
        "_transport",
        "_transport_closed",
        "_writer_nursery",
        "bytes_received",
        "bytes_sent",
        "idle_timeout",
        "message_timeout",
    )

    def __init__(
        self, stream: trio.abc.Stream, *, framing: Framing | None = None
    ) -> None:
        self._setup(StreamTransport(stream), framing)

    @classmethod
    def _over(
        cls,
        transport: Transport,
        framing: Framing | None,
        *,
        writer_nursery: trio.Nursery | None = None,
        send_queue_size: int = DEFAULT_SEND_QUEUE_SIZE,
        flush_timeout: float = DEFAULT_FLUSH_TIMEOUT,
    ) -> Connection:
        self = cls.__new__(cls)
        self._setup(transport, framing)
        self._writer_nursery = writer_nursery
        self._queue_size = send_queue_size
        self._flush_timeout = flush_timeout
        return self

    def _setup(self, transport: Transport, framing: Framing | None) -> None:
        self._transport = transport
        self._framing = _checked_framing(framing)
        self._receive_buffer = ReceiveBuffer()
        # Messages of ``_framing`` already cut from the buffer, in order, by a
        # batched receive; given back to the buffer if another mode is used.
        # None when there are none (an empty deque is 760 bytes).
        self._ready: deque[bytes] | None = None
        # Whether a receive may cut every whole message at once.  Off after
        # messages were given back, until more bytes arrive: each byte is cut
        # in a batch at most once, so mixing modes stays linear.
        self._batch_ok = True
        self._reason: CloseReason | None = None
        self._eof = False
        self._transport_closed = False
        self._receiving = False
        # Created by the first send that needs it (server connections never do).
        self._send_lock: trio.StrictFIFOLock | None = None
        self._sends_since_yield = 0
        self._writer_nursery: trio.Nursery | None = None
        self._queue_size = DEFAULT_SEND_QUEUE_SIZE
        self._flush_timeout = DEFAULT_FLUSH_TIMEOUT
        self._queue_send: trio.MemorySendChannel[bytes | memoryview] | None = None
        self._queue_receive: trio.MemoryReceiveChannel[bytes | memoryview] | None = None
        self._drained: trio.Event | None = None
        self._cork: list[bytes] | None = None
        #: Told once, as soon as the connection closes (its server's bookkeeping).
        self._on_closed: _Owner | None = None
        self._cork_bytes = 0
        #: Seconds without receiving anything before the connection is closed
        #: with TIMEOUT (checked while a receive waits, and while a send of a
        #: server connection waits on a full queue); None for no limit.
        self.idle_timeout: float | None = None
        #: Seconds allowed to complete one message once its first byte has
        #: arrived, else the connection is closed with TIMEOUT; None for no limit.
        self.message_timeout: float | None = None
        self._last_receive = 0.0
        self._message_started: float | None = None
        self.bytes_received = 0
        self.bytes_sent = 0

    # ------------------------------------------------------------------ state

    @property
    def framing(self) -> Framing | None:
        """What :meth:`receive`, :meth:`send` and ``async for`` use: a
        :class:`Lines`, a :class:`Frames`, or None for raw bytes.  May be
        changed between messages."""
        return self._framing

    @framing.setter
    def framing(self, framing: Framing | None) -> None:
        framing = _checked_framing(framing)
        self._unready()
        self._framing = framing

    def _unready(self) -> None:
        # Give messages cut by a batched receive back to the buffer, encoded
        # as they arrived, so that another receive mode sees the raw bytes.
        ready = self._ready
        if ready is not None:
            self._ready = None
            framing = self._framing
            assert framing is not None
            self._receive_buffer.unread(b"".join(map(framing.encode, ready)))
            self._batch_ok = False

    @property
    def close_reason(self) -> CloseReason | None:
        """Why the connection ended, or None while it is open.

        Set once, from the first cause.  A peer's clean end of stream sets
        :attr:`CloseReason.CLOSED_BY_PEER` while this side may still send.
        """
        return self._reason

    @property
    def local_address(self) -> Address | None:
        """This side's address as ``getsockname()`` gives it (None off sockets)."""
        return self._transport.local_address

    @property
    def remote_address(self) -> Address | None:
        """The peer's address as ``getpeername()`` gives it (None off sockets)."""
        return self._transport.remote_address

    @property
    def send_queue_length(self) -> int:
        """Messages waiting in the outgoing queue (0 when there is no queue)."""
        if self._queue_send is None:
            return 0
        return self._queue_send.statistics().current_buffer_used

    def __repr__(self) -> str:
        state = "open" if self._reason is None else self._reason.name
        return f"<trionet.Connection {self.remote_address} {state}>"

    def _set_reason(self, reason: CloseReason) -> None:
        if self._reason is None:
            self._reason = reason

    def _closed_error(self) -> ConnectionClosed:
        return ConnectionClosed(self._reason or CloseReason.CLOSED_BY_HOST)

    def _close_now(self, reason: CloseReason) -> None:
        """Record ``reason`` (if first) and close the transport without awaiting.

        Waiting receivers and senders wake with :class:`ConnectionClosed`.
        """
        self._set_reason(reason)
        if self._queue_send is not None:
            self._queue_send.close()
        if not self._transport_closed:
            self._mark_closed()
            if not self._transport.close() and self._writer_nursery is not None:
                self._writer_nursery.start_soon(self._transport.aclose)

    def _mark_closed(self) -> None:
        self._transport_closed = True
        if self._on_closed is not None:
            self._on_closed._connection_closed(self)

    def _broken(self, exc: BaseException) -> ConnectionClosed:
        # The one place that turns a transport failure into a close reason.
        if isinstance(exc, trio.ClosedResourceError) or self._transport_closed:
            error = self._closed_error()
        else:
            self._close_now(CloseReason.ERROR)
            error = ConnectionClosed(
                self._reason or CloseReason.ERROR, f"connection failed: {exc!r}"
            )
        error.__cause__ = exc
        return error

    # -------------------------------------------------------------- receiving

    def _fast_socket(self) -> socket.socket | None:
        """The socket to read without :meth:`_fill`, when a receive needs no
        more than that: no timeouts to watch, nothing corked, still open."""
        if (
            self.idle_timeout is None
            and self.message_timeout is None
            and self._cork is None
            and not self._transport_closed
        ):
            return self._transport.fast_socket
        return None

    async def _fill(self, into: memoryview | None = None) -> int:
        """Read one chunk into the buffer (or into ``into``); 0 at end of stream."""
        if self._eof:
            return 0
        if self._transport_closed:
            raise self._closed_error()
        buffer = self._receive_buffer
        try:
            if self._cork is not None:
                self._uncork()
            if self.idle_timeout is None and self.message_timeout is None:
                count = await self._transport.receive_into(buffer, into)
            else:
                with trio.move_on_at(self._receive_deadline()) as scope:
                    count = await self._transport.receive_into(buffer, into)
                if scope.cancelled_caught:
                    self._close_now(CloseReason.TIMEOUT)
                    raise self._closed_error()
        except _TRANSPORT_ERRORS as exc:
            raise self._broken(exc) from exc
        self._filled(count)
        return count

    def _filled(self, count: int) -> None:
        """Account for ``count`` bytes just received (0: end of stream)."""
        self._sends_since_yield = 0
        self._batch_ok = True
        if self.idle_timeout is not None:
            self._last_receive = trio.current_time()
        if count == 0:
            self._eof = True
            self._set_reason(CloseReason.CLOSED_BY_PEER)
        self.bytes_received += count

    def _receive_deadline(self) -> float:
        deadline = math.inf
        if self.idle_timeout is not None:
            if not self._last_receive:
                self._last_receive = trio.current_time()
            deadline = self._last_receive + self.idle_timeout
        if self.message_timeout is not None and (
            self._receive_buffer or self._message_started is not None
        ):
            if self._message_started is None:
                self._message_started = trio.current_time()
            deadline = min(deadline, self._message_started + self.message_timeout)
        return deadline

    def _end_of_stream_error(self) -> ConnectionClosed:
        reason = self._reason or CloseReason.CLOSED_BY_PEER
        if self._receive_buffer:
            return IncompleteMessage(reason, self._receive_buffer.extract_some())
        return ConnectionClosed(reason)

    async def _receive_message(
        self,
        extract: Callable[[ReceiveBuffer], _T | None] | None,
        frames: Frames | None = None,
        exactly: int = 0,
        *,
        iterating: bool = False,
    ) -> _T | bytes:
        """Cut one message with ``extract`` (None: a batch of :attr:`framing`),
        receiving until one is whole.

        ``iterating``: for ``async for``, which ends (StopAsyncIteration) when
        the peer closed cleanly between messages.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving")
        if self._transport_closed:
            raise _iteration_end(self._closed_error(), iterating)
        self._unready()
        self._receiving = True
        buffer = self._receive_buffer
        waited = False
        try:
            while True:
                try:
                    message = (
                        self._extract_batch(buffer)
                        if extract is None
                        else extract(buffer)
                    )
                except ProtocolError:
                    self._close_now(CloseReason.PROTOCOL_ERROR)
                    raise
                if message is not None:
                    self._message_started = None
                    return message
                if self._eof:
                    raise self._end_of_stream_error()
                if frames is not None or exactly:
                    body = self._large_body(frames, exactly)
                    if body is not None:
                        return await self._receive_direct(*body)
                sock = self._fast_socket()
                if sock is None:
                    await self._fill()
                    continue
                # SocketTransport.receive_into, inlined so that an idle
                # connection waits here and holds fewer coroutine frames.
                try:
                    if not waited:
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    count = self._transport.receive_nowait(buffer)
                    if count is None:
                        await trio.lowlevel.wait_readable(sock)
                        waited = True
                        continue
                except _TRANSPORT_ERRORS as exc:
                    raise self._broken(exc) from exc
                waited = False
                self._filled(count)
        except ConnectionClosed as exc:
            raise _iteration_end(exc, iterating) from exc.__cause__
        finally:
            self._receiving = False

    def _large_body(
        self, frames: Frames | None, exactly: int
    ) -> tuple[int, int] | None:
        """``(header size, body size)`` of a message to receive directly.

        That is a frame (or ``receive_exactly``) of which at least
        ``DIRECT_RECEIVE_MIN`` bytes have arrived and at least as many are
        still missing.  Waiting for bytes to arrive first keeps the rule that
        memory follows what arrived, never what a header announced.
        """
        buffer = self._receive_buffer
        buffered = len(buffer)
        if buffered < DIRECT_RECEIVE_MIN:
            return None
        if frames is None:
            header, size = 0, exactly
        else:
            header = frames.header_size
            size = buffer.frame_length(header, frames.max_size) or 0
        if header + size - buffered < DIRECT_RECEIVE_MIN:
            return None
        return header, size

    async def _receive_direct(self, header_size: int, size: int) -> bytes:
        """Receive the rest of a large message's body outside the receive buffer.

        The body is read with ``recv_into`` straight into pieces that double
        in size, each no larger than what has arrived so far, and joined once
        at the end.  What arrived goes back to the receive buffer if this is
        cancelled or fails, so nothing is lost.
        """
        buffer = self._receive_buffer
        header = buffer.extract_exactly(header_size) or b""
        pieces: list[bytes | bytearray] = [buffer.extract_some(size)]
        got = len(pieces[0])
        if self.message_timeout is not None and self._message_started is None:
            self._message_started = trio.current_time()
        try:
            while got < size:
                piece = bytearray(min(size - got, got))
                pieces.append(piece)
                filled = 0
                while filled < len(piece):
                    count = await self._fill(memoryview(piece)[filled:])
                    if count == 0:
                        break
                    filled += count
                    got += count
                if filled < len(piece):
                    break  # end of stream
        except BaseException:
            buffer.unread(header + b"".join(pieces)[:got])
            raise
        if got < size:
            buffer.unread(header + b"".join(pieces)[:got])
            raise self._end_of_stream_error()
        self._message_started = None
        return b"".join(pieces)

    async def receive_line(self) -> bytes:
        """Receive one line, without its delimiter.

        Uses :attr:`framing` when it is a :class:`Lines`, else ``Lines()``.

        Raises:
            LineTooLong: the line is longer than ``max_length`` (the connection
                is closed with :attr:`CloseReason.PROTOCOL_ERROR`).
            IncompleteMessage: the stream ended inside the line.
            ConnectionClosed: the stream ended, or the connection is closed.
        """
        framing = self._framing if isinstance(self._framing, Lines) else _DEFAULT_LINES
        return await self._receive_message(framing.extract)

    async def receive_exactly(self, n: int) -> bytes:
        """Receive exactly ``n`` bytes.

        Raises:
            IncompleteMessage: the stream ended before ``n`` bytes arrived.
            ConnectionClosed: the connection is closed.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, not {n}")
        return await self._receive_message(
            lambda buffer: buffer.extract_exactly(n), exactly=n
        )

    async def peek(self, n: int) -> bytes:
        """Wait until ``n`` bytes are buffered and return them, consuming nothing.

        The next receive, in any mode, still gets these bytes: use it to look
        at the start of a stream before deciding how to read it (which
        protocol a client speaks, say).  Up to ``n`` bytes are held in memory,
        so keep ``n`` small.

        Raises:
            IncompleteMessage: the stream ended before ``n`` bytes arrived.
                ``.partial`` is a copy of the bytes that did; unlike the
                receive calls, ``peek`` leaves them buffered, so the next
                receive gets them (``receive_some()`` returns them, a line
                or frame receive raises :class:`IncompleteMessage` again).
            ConnectionClosed: the connection is closed.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, not {n}")
        try:
            return await self._receive_message(lambda buffer: buffer.peek_exactly(n))
        except IncompleteMessage as exc:
            # The end-of-stream error took the partial bytes out of the
            # buffer; a peek consumes nothing, so they go back.
            self._receive_buffer.unread(exc.partial)
            raise

    async def receive_frame(self) -> bytes:
        """Receive one length-prefixed frame's payload.

        Uses :attr:`framing` when it is a :class:`Frames`, else ``Frames()``.

        Raises:
            FrameTooLarge: the header announces more than ``max_size`` (raised
                when the header arrives; the connection is closed with
                :attr:`CloseReason.PROTOCOL_ERROR`).
            IncompleteMessage: the stream ended inside the frame.
            ConnectionClosed: the stream ended, or the connection is closed.
        """
        framing = (
            self._framing if isinstance(self._framing, Frames) else _DEFAULT_FRAMES
        )
        return await self._receive_message(framing.extract, framing)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Receive raw bytes: what is buffered first, else one chunk.

        Returns ``b""`` at the end of the stream, as trio's streams do.

        Raises:
            ConnectionClosed: the connection was closed by this side or failed.
        """
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, not {max_bytes}")

        def extract(buffer: ReceiveBuffer) -> bytes | None:
            if buffer or self._eof:
                return buffer.extract_some(max_bytes)
            return None

        return await self._receive_message(extract)

    async def receive(self) -> bytes:
        """Receive one message of :attr:`framing` (raw bytes when it is None).

        Every whole message of a received chunk is cut at once and handed out
        by later calls without passing through the scheduler.
        """
        if self._ready is not None and not self._transport_closed:
            return await self._pop_ready()
        framing = self._framing
        if framing is None:
            return await self.receive_some()
        frames = framing if isinstance(framing, Frames) else None
        return await self._receive_message(None, frames)

    async def _pop_ready(self) -> bytes:
        await trio.lowlevel.checkpoint_if_cancelled()
        ready = self._ready
        if ready is None:  # (given back to the buffer by another task's receive)
            return await self.receive()
        message = ready.popleft()
        if not ready:
            self._ready = None
        return message

    def _extract_batch(self, buffer: ReceiveBuffer) -> bytes | None:
        framing = self._framing
        assert framing is not None
        if not buffer:
            return None
        message = framing.extract(buffer)
        if message is not None and buffer and self._batch_ok:
            if isinstance(framing, Lines) and framing.strip_cr:
                # No batch: _unready gives cut lines back re-encoded, and a
                # line whose \r was removed would come back without it.
                return message
            # Cut the rest of the chunk now.  Bad bytes among them stay in the
            # buffer, and the receive that reaches them raises.
            with contextlib.suppress(ProtocolError):
                rest = framing.extract_all(buffer)
                if rest:
                    self._ready = deque(rest)
        return message

    def __aiter__(self) -> Connection:
        return self

    def __anext__(self) -> Coroutine[object, None, bytes]:
        """The next message; iteration stops when the peer closes cleanly.

        An end of stream inside a message raises :class:`IncompleteMessage`;
        any other close raises :class:`ConnectionClosed`.
        """
        # (A plain method that hands ``async for`` the coroutine to await:
        # a connection idle in ``async for`` then holds one frame fewer.)
        if self._ready is not None and not self._transport_closed:
            return self._pop_ready()
        framing = self._framing
        if framing is None:
            return self._next_raw()
        frames = framing if isinstance(framing, Frames) else None
        return self._receive_message(None, frames, iterating=True)

    async def _next_raw(self) -> bytes:
        try:
            message = await self.receive_some()
        except ConnectionClosed as exc:
            raise _iteration_end(exc, True) from exc.__cause__
        if not message:
            raise StopAsyncIteration
        return message

    # ---------------------------------------------------------------- sending

    def _check_sendable(self) -> None:
        if self._transport_closed:
            raise self._closed_error()

    async def send_all(self, data: BytesLike) -> None:
        """Send raw bytes, unframed."""
        await self._send(bytes(data) if not isinstance(data, bytes) else data)

    async def send_line(self, data: BytesLike | str) -> None:
        """Send one line: ``data`` (bytes, or str as UTF-8) and the delimiter.

        Raises:
            ValueError: ``data`` contains the delimiter; nothing was sent.
            MessageTooLarge: ``data`` is longer than ``max_length``.
        """
        framing = self._framing if isinstance(self._framing, Lines) else _DEFAULT_LINES
        await self._send(framing.encode(data))

    async def send_frame(self, data: BytesLike | str) -> None:
        """Send one length-prefixed frame.

        Raises:
            MessageTooLarge: ``data`` is larger than ``max_size``; nothing was sent.
        """
        framing = (
            self._framing if isinstance(self._framing, Frames) else _DEFAULT_FRAMES
        )
        await self._send(framing.encode(data))

    async def send(self, message: BytesLike | str) -> None:
        """Send one message of :attr:`framing` (raw bytes when it is None)."""
        framing = self._framing
        data = as_bytes(message) if framing is None else framing.encode(message)
        # (_send's body, inlined, and _try_push's corked case too: this is
        # the hottest path of a server that answers pipelined requests, and a
        # coroutine call costs about a fifth of it.)
        await trio.lowlevel.checkpoint_if_cancelled()
        cork = self._cork
        if cork is not None and not self._transport_closed:
            cork.append(data)
            self._cork_bytes += len(data)
            if self._cork_bytes >= MAX_BATCH_BYTES:
                self._uncork()
        elif not self._try_push(data):
            await self._send_slow(data)
        self._sends_since_yield += 1
        if self._sends_since_yield >= SENDS_PER_YIELD:
            self._sends_since_yield = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def _send(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._try_push(data):
            await self._send_slow(data)
        self._sends_since_yield += 1
        if self._sends_since_yield >= SENDS_PER_YIELD:
            self._sends_since_yield = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    def _try_push(self, data: bytes) -> bool:
        """Hand ``data`` on without waiting: cork, queue, or straight to the kernel.

        Returns False when the caller must wait: the queue is full, or the
        connection has no writer task and sends under its lock.

        Raises:
            ConnectionClosed: the connection is closed or the transport failed.
        """
        if self._transport_closed:
            raise self._closed_error()
        if self._writer_nursery is None:
            return False
        cork = self._cork
        if cork is not None:
            cork.append(data)
            self._cork_bytes += len(data)
            if self._cork_bytes >= MAX_BATCH_BYTES:
                self._uncork()
            return True
        queue = self._queue_send
        if queue is not None:
            try:
                queue.send_nowait(data)
            except trio.WouldBlock:
                return False
            return True
        if self._ready or self._receive_buffer:
            # More input is already here, so the handler is about to send
            # again: hold this back and send the whole batch at once, before
            # the next wait for input or as soon as this task yields.
            self._cork = [data]
            self._cork_bytes = len(data)
            trio.lowlevel.current_trio_token().run_sync_soon(self._uncork_soon)
            return True
        self._write_or_queue(data)
        return True

    async def _send_slow(self, data: bytes) -> None:
        if self._writer_nursery is None:
            await self._send_locked(data)
            return
        assert self._queue_send is not None
        # Backpressure: the queue is full.  A peer that reads nothing for
        # idle_timeout cannot hold this sender for ever.
        deadline = math.inf
        if self.idle_timeout is not None:
            deadline = trio.current_time() + self.idle_timeout
        with trio.move_on_at(deadline) as scope:
            try:
                await self._queue_send.send(data)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                raise self._closed_error() from None
        if scope.cancelled_caught:
            self._close_now(CloseReason.TIMEOUT)
            raise self._closed_error()

    def _uncork(self) -> None:
        cork = self._cork
        if cork is not None:
            self._cork = None
            self._write_or_queue(cork[0] if len(cork) == 1 else b"".join(cork))

    def _uncork_soon(self) -> None:
        # Runs from the scheduler once the corking task has yielded.
        if not self._transport_closed:
            with contextlib.suppress(ConnectionClosed):
                self._uncork()

    def _write_or_queue(self, data: bytes) -> None:
        # No queue: write now; hand what the kernel did not take to a writer task.
        try:
            sent = self._transport.send_nowait(data)
        except _TRANSPORT_ERRORS as exc:
            raise self._broken(exc) from exc
        self.bytes_sent += sent
        if sent < len(data):
            self._start_writer()
            assert self._queue_send is not None
            self._queue_send.send_nowait(memoryview(data)[sent:] if sent else data)

    def send_nowait(self, data: bytes) -> bool:
        """Queue already-encoded bytes without waiting (used by broadcasts).

        A connection whose queue is full is closed with
        :attr:`CloseReason.SLOW_CONSUMER`.  Returns whether the bytes were
        accepted.
        """
        if self._transport_closed:
            return False
        if self._writer_nursery is None:
            raise RuntimeError("send_nowait needs a connection owned by a server")
        try:
            accepted = self._try_push(data)
        except ConnectionClosed:
            return False
        if not accepted:
            logger.info("%r: outgoing queue full; closing as slow consumer", self)
            self._close_now(CloseReason.SLOW_CONSUMER)
            return False
        return True

    def _start_writer(self) -> None:
        assert self._writer_nursery is not None
        self._queue_send, self._queue_receive = trio.open_memory_channel[
            bytes | memoryview
        ](self._queue_size)
        self._drained = trio.Event()
        self._writer_nursery.start_soon(self._writer)

    async def _writer(self) -> None:
        receive = self._queue_receive
        drained = self._drained
        assert receive is not None and drained is not None
        try:
            while True:
                batch: list[bytes | memoryview] = []
                size = 0
                while size < MAX_BATCH_BYTES:
                    try:
                        item = receive.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    batch.append(item)
                    size += len(item)
                if not batch:
                    break
                data = batch[0] if len(batch) == 1 else b"".join(batch)
                try:
                    await self._transport.send_all(data)
                except _TRANSPORT_ERRORS as exc:
                    self._broken(exc)
                    return
                self.bytes_sent += size
        finally:
            # No await between finding the queue empty and dropping it: the
            # next send sees no queue and writes directly, in order.
            if self._queue_receive is receive:
                self._queue_send = self._queue_receive = None
            receive.close()
            drained.set()

    def _lock(self) -> trio.StrictFIFOLock:
        lock = self._send_lock
        if lock is None:
            lock = self._send_lock = trio.StrictFIFOLock()
        return lock

    async def _send_locked(self, data: bytes) -> None:
        lock = self._lock()
        if lock.locked():
            await lock.acquire()
        else:
            lock.acquire_nowait()
        try:
            self._check_sendable()
            try:
                sent = self._transport.send_nowait(data)
                if sent < len(data):
                    await self._send_rest(memoryview(data)[sent:] if sent else data)
            except _TRANSPORT_ERRORS as exc:
                raise self._broken(exc) from exc
            self.bytes_sent += len(data)
        finally:
            lock.release()
        self._sends_since_yield += 1
        if self._sends_since_yield >= SENDS_PER_YIELD:
            self._sends_since_yield = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def _send_rest(self, data: bytes | memoryview) -> None:
        try:
            await self._transport.send_all(data)
        except trio.Cancelled:
            # Part of a message may be on the wire: the stream can no longer
            # be trusted, so end it rather than let the peer decode garbage.
            self._close_now(CloseReason.ERROR)
            raise

    async def send_eof(self) -> None:
        """Flush what is queued, then half-close: the peer sees end of stream.

        Receiving still works afterwards.
        """
        await self._flush()
        self._check_sendable()
        async with self._lock():
            try:
                await self._transport.send_eof()
            except _TRANSPORT_ERRORS as exc:
                raise self._broken(exc) from exc

    # ---------------------------------------------------------------- closing

    async def _flush(self) -> None:
        """Wait until the outgoing queue is empty."""
        drained = self._drained
        if drained is not None:
            await drained.wait()
        else:
            await trio.lowlevel.checkpoint()

    async def _finish(self, reason: CloseReason) -> None:
        """Close with ``reason`` (if first) after flushing what is queued."""
        self._set_reason(reason)
        if not self._transport_closed:
            with contextlib.suppress(ConnectionClosed):
                self._uncork()
            deadline = trio.current_time() + self._flush_timeout
            with trio.CancelScope(shield=True, deadline=deadline) as scope:
                await self._flush()
            if scope.cancelled_caught:
                logger.info("%r: flush timed out; closing with data unsent", self)
        if not self._transport_closed:
            self._mark_closed()
            if self._queue_send is not None:
                self._queue_send.close()
            await self._transport.aclose()
        else:
            await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Close the connection (:attr:`CloseReason.CLOSED_BY_HOST` unless it
        already has a reason), after flushing everything queued for sending."""
        await self._finish(CloseReason.CLOSED_BY_HOST)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


def connection_over_socket(
    sock: trio.socket.SocketType, framing: Framing | None
) -> Connection:
    """A client Connection over a connected trio socket, on the fast path."""
    return Connection._over(SocketTransport.from_trio_socket(sock), framing)
