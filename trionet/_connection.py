"""Connection: a transport, one shared receive buffer, a send path and a close reason.

How this works
--------------
Receiving.  Every receive mode reads the same :class:`ReceiveBuffer`.  A
receive first tries to cut a whole message out of what is already buffered and
returns it without passing through the scheduler (it still raises if the task
was cancelled); only when the buffer holds no whole message does it ask the
transport for more.  Bytes already received are appended to the buffer before
anything can be cancelled, so a cancelled receive loses nothing.  The body of
a large message is received outside the buffer (:mod:`._receive_direct`).

Sending.  A connection sends through one of two send paths (see
:mod:`._sending`): a bounded queue drained by a writer task for connections a
server owns, a FIFO lock for clients.

Closing.  The close reason is committed once, when the connection closes,
from the first cause.  A peer's clean end of stream only marks the receiving
side finished (:attr:`Connection.eof_received`); if this side then closes
normally, the reason is CLOSED_BY_PEER, but a SHUTDOWN, TIMEOUT,
SLOW_CONSUMER or ERROR that cuts this side short is the reason instead.
Everything accepted for sending is flushed before the transport closes, for
at most the flush timeout; what cannot be flushed in time is dropped with a
forceful close (the writer task is cancelled, the socket closed at once) and
the connection ends with TIMEOUT.  No close ever waits without a bound.

Upgrading to TLS (:meth:`Connection.start_tls`).  The transport is replaced
under the same Connection, so the buffer, framing, counters, close reason and
send path go on.  The order is what makes it safe: refuse if any received
byte is still unread (it came in plaintext and must never pass for protected
bytes); hold receives (as if a receive were running) and pause the send path
-- what was accepted is written in plaintext first, later sends and
broadcasts wait in a held queue (or on the send lock); swap in a TLS
transport over the same socket or stream; handshake, bounded; then resume the
send path, whose held bytes now go out over TLS.  A handshake that fails,
times out or is cancelled closes the connection, so a half-negotiated stream
is never used.
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, TypeVar

import attrs
import trio

from ._as_stream import ConnectionStream
from ._codec import Frames, Framing, Lines, ReceiveBuffer, as_bytes
from ._codec._buffer import _SMALL_FRAME, large_frame_end
from ._exceptions import (
    CloseReason,
    ConnectError,
    ConnectionClosed,
    IncompleteMessage,
    ProtocolError,
    StartTLSRefused,
)
from ._receive_direct import large_body, receive_direct
from ._sending import (
    DEFAULT_FLUSH_TIMEOUT,
    DEFAULT_SEND_QUEUE_SIZE,
    LOCKED,
    MAX_BATCH_BYTES,
    LockedSendPath,
    QueuedSendPath,
    SendQueue,
)
from ._transport import Address, PeerCredentials, StreamTransport, Transport
from ._util import format_address

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "DEFAULT_FLUSH_TIMEOUT",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_SEND_QUEUE_SIZE",
    "Connection",
    "ConnectionStatistics",
    "TlsSettings",
]

logger = logging.getLogger("trionet")

#: Sends that may go straight to the kernel before one passes through the scheduler.
SENDS_PER_YIELD = 256
#: A frame payload of at least this many bytes is sent after its header with
#: one scatter-gather write instead of being joined to it (a copy).
SCATTER_MIN = 16 * 1024
#: Seconds a TLS handshake may take, unless the server or the caller says otherwise.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0

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


def _frames_of(framing: Framing | None) -> Frames | None:
    return framing if isinstance(framing, Frames) else None


def _encode_many(
    framing: Framing | None, messages: Iterable[BytesLike | str]
) -> tuple[bytes, int]:
    """Every message of ``messages`` encoded and joined, and how many there
    were; the same checks (and errors) as ``framing.encode`` for each."""
    payloads = [m if type(m) is bytes else as_bytes(m) for m in messages]
    if not payloads:
        return b"", 0
    if framing is None:
        return b"".join(payloads), len(payloads)
    if isinstance(framing, Frames):
        limit = framing.max_size
        header = framing.header_size
    else:
        limit = framing.max_length
        delimiter = framing.delimiter
        if _overlaps_itself(delimiter):
            return b"".join(map(framing.encode, payloads)), len(payloads)
    if max(map(len, payloads)) > limit:
        # (The first one too large raises, as its own encode would.)
        for payload in payloads:
            framing.encode(payload)
    if isinstance(framing, Frames):
        parts: list[bytes] = []
        append = parts.append
        for payload in payloads:
            append(len(payload).to_bytes(header, "big"))
            append(payload)
        return b"".join(parts), len(payloads)
    wire = delimiter.join(payloads) + delimiter
    # A delimiter that does not overlap itself is found exactly once per
    # line unless a line contains it.
    if wire.count(delimiter) != len(payloads):
        for payload in payloads:
            framing.encode(payload)  # raises ValueError for the first bad one
    return wire, len(payloads)


def _overlaps_itself(delimiter: bytes) -> bool:
    return any(delimiter[:k] == delimiter[-k:] for k in range(1, len(delimiter)))


class _Batches:
    """What :meth:`Connection.batches` returns: an async iterator of batches."""

    __slots__ = ("_conn",)

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def __aiter__(self) -> _Batches:
        return self

    def __anext__(self) -> Coroutine[object, None, list[bytes]]:
        return self._conn._next_batch(True)


@attrs.frozen(kw_only=True)
class TlsSettings:
    """What :meth:`Connection.start_tls` uses when the caller does not say:
    known from how the connection was made.  One object per server (shared
    by its connections), one per client connection."""

    #: Whether this is the server's side of the connection.
    server_side: bool
    #: Seconds the handshake may take.
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    #: Whether a TLS end of stream without close_notify is an error.
    require_close_notify: bool = False
    #: The name the server's certificate must carry (client side).
    server_hostname: str | None = None


@attrs.frozen(kw_only=True)
class ConnectionStatistics:
    """A snapshot of a :class:`Connection`'s counters.

    .. versionadded:: 0.1
    """

    #: Bytes received from the peer.
    bytes_received: int
    #: Bytes written to the transport (accepted by the kernel, or by the stream).
    bytes_sent: int
    #: Messages accepted for sending and not yet written (0 without a queue).
    queued_messages: int
    #: Bytes accepted for sending and not yet written (0 without a queue).
    queued_bytes: int
    #: Whether the peer has finished sending (end of stream arrived).
    eof_received: bool
    #: Whether this side has finished sending (:meth:`Connection.send_eof`).
    eof_sent: bool


class Connection:
    """One byte stream with line, sized and framed receive modes.

    Build one over any :class:`trio.abc.Stream` (or get one from
    :func:`connect_tcp` or a server's handler)::

        conn = trionet.Connection(stream, framing=trionet.Lines())
        await conn.send(b"hello")
        reply = await conn.receive()

    Receive modes may be mixed freely: they all read one buffer.  Sends from
    several tasks never interleave the bytes of two messages.

    **States.**  Each direction finishes on its own; :attr:`close_reason` is
    set once, when the connection is closed:

    ==============  ========================  =====================  ==========
    state           receiving                 sending                close
                                                                     reason
    ==============  ========================  =====================  ==========
    open            works                     works                  None
    peer finished   buffered messages, then   works                  None
    (eof_received)  end of stream
    we finished     works                     raises                 None
    (eof_sent)                                ConnectionClosed
    flushing        works until closed        raises                 None
    (aclose runs)                             ConnectionClosed
    closed          raises ConnectionClosed   raises                 set
                                              ConnectionClosed
    ==============  ========================  =====================  ==========

    Transitions: the peer's end of stream (open → peer finished);
    :meth:`send_eof` (open → we finished); :meth:`aclose` or a server
    handler returning (→ flushing → closed); a failure, timeout, protocol
    error, eviction or shutdown (→ closed at once, dropping what was queued).
    The reason is the first cause: a normal close after the peer finished
    sending is :attr:`CloseReason.CLOSED_BY_PEER`; a TIMEOUT, ERROR,
    SHUTDOWN or SLOW_CONSUMER that cuts this side short is that reason
    instead, even after the peer finished.  A flush that runs out of time
    (``flush_timeout``) closes forcefully, with TIMEOUT.

    :meth:`start_tls` may run in the open state (and after the peer
    finished, to be refused): while it runs, receives raise
    :exc:`trio.BusyResourceError` and sends wait; it returns to the open
    state over TLS, or closes the connection (PROTOCOL_ERROR for unread
    plaintext, ERROR or TIMEOUT for a handshake that failed).

    Args:
        stream: the stream to speak over.  Closing the connection closes it.
        framing: what :meth:`receive`, :meth:`send` and ``async for`` use:
            :class:`Lines`, :class:`Frames`, or None for raw bytes.

    .. versionadded:: 0.1
    """

    __slots__ = (
        "__weakref__",
        "_batch_ok",
        "_bytes_received",
        "_bytes_sent",
        "_cork",
        "_cork_bytes",
        "_eof",
        "_eof_sent",
        "_framing",
        "_last_receive",
        "_message_started",
        "_on_closed",
        "_peer_first",
        "_queue",
        "_ready",
        "_reason",
        "_receive_buffer",
        "_receiving",
        "_send_closed",
        "_send_lock",
        "_send_path",
        "_sends_since_yield",
        "_tls",
        "_transport",
        "_transport_closed",
        "idle_timeout",
        "message_timeout",
    )

    def __init__(
        self, stream: trio.abc.Stream, *, framing: Framing | None = None
    ) -> None:
        self._setup(StreamTransport(stream), framing, LOCKED)

    @classmethod
    def _over(
        cls,
        transport: Transport,
        framing: Framing | None,
        send_path: QueuedSendPath | LockedSendPath = LOCKED,
    ) -> Connection:
        self = cls.__new__(cls)
        self._setup(transport, framing, send_path)
        return self

    def _setup(
        self,
        transport: Transport,
        framing: Framing | None,
        send_path: QueuedSendPath | LockedSendPath,
    ) -> None:
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
        self._eof = False  # the peer finished sending
        self._eof_sent = False  # this side finished sending
        self._peer_first = False  # ... and the peer finished first
        self._send_closed = False  # no more sends: eof sent, closing or closed
        self._transport_closed = False
        self._receiving = False
        self._send_path = send_path
        # Created when first needed (server connections never need the lock).
        self._send_lock: trio.StrictFIFOLock | None = None
        self._queue: SendQueue | None = None
        self._sends_since_yield = 0
        self._cork: list[bytes] | None = None
        #: Told once, as soon as the connection closes (its server's bookkeeping).
        self._on_closed: _Owner | None = None
        self._cork_bytes = 0
        #: Seconds without receiving anything before the connection is closed
        #: with TIMEOUT (checked while a receive waits, and while a send waits
        #: for the peer to read); None for no limit.
        self.idle_timeout: float | None = None
        #: Seconds allowed to complete one message once its first byte has
        #: arrived, else the connection is closed with TIMEOUT; None for no limit.
        self.message_timeout: float | None = None
        self._last_receive = 0.0
        self._message_started: float | None = None
        self._bytes_received = 0
        self._bytes_sent = 0
        #: The defaults of start_tls (None: made by hand, the side unknown).
        self._tls: TlsSettings | None = None

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

        Set once, when the connection closes, from the first cause (see the
        table of states above).  While only one direction has finished it is
        still None: see :attr:`eof_received` and :attr:`eof_sent`.
        """
        return self._reason

    @property
    def eof_received(self) -> bool:
        """Whether the peer has finished sending: its end of stream arrived.

        Messages already buffered can still be received; this side can still
        send.
        """
        return self._eof

    @property
    def eof_sent(self) -> bool:
        """Whether this side has finished sending (:meth:`send_eof`)."""
        return self._eof_sent

    @property
    def local_address(self) -> Address | None:
        """This side's address as ``getsockname()`` gives it (None off sockets)."""
        return self._transport.local_address

    @property
    def remote_address(self) -> Address | None:
        """The peer's address as ``getpeername()`` gives it (None off sockets).

        A UNIX socket's address is its path (``""`` for a client's unnamed
        end).
        """
        return self._transport.remote_address

    @property
    def peer_credentials(self) -> PeerCredentials | None:
        """The process, user and group at the other end of a UNIX socket,
        as the kernel recorded them when the connection was made (Linux's
        ``SO_PEERCRED``).

        None for every other transport (TCP, in-memory streams), and where
        the operating system does not report them.  Over TLS on a UNIX
        socket they are those of the socket underneath.
        """
        return self._transport.peer_credentials

    def as_stream(self) -> ConnectionStream:
        """This connection as a :class:`trio.abc.HalfCloseableStream` (raw
        bytes), for code written against trio's stream interfaces.  See
        :class:`ConnectionStream`."""
        return ConnectionStream(self)

    def statistics(self) -> ConnectionStatistics:
        """A snapshot of the connection's counters."""
        queue = self._queue
        return ConnectionStatistics(
            bytes_received=self._bytes_received,
            bytes_sent=self._bytes_sent,
            queued_messages=0 if queue is None else queue.messages,
            queued_bytes=0 if queue is None else queue.nbytes,
            eof_received=self._eof,
            eof_sent=self._eof_sent,
        )

    def __repr__(self) -> str:
        state = "open" if self._reason is None else self._reason.name
        return f"<trionet.Connection {self.remote_address} {state}>"

    def _set_reason(self, reason: CloseReason) -> None:
        if self._reason is None:
            if reason is CloseReason.CLOSED_BY_HOST and self._peer_first:
                # A normal close after the peer finished first.
                reason = CloseReason.CLOSED_BY_PEER
            self._reason = reason

    def _closed_error(self) -> ConnectionClosed:
        if self._reason is None and self._eof_sent and not self._transport_closed:
            return ConnectionClosed(
                CloseReason.CLOSED_BY_HOST,
                "this side has finished sending (send_eof was called)",
            )
        return ConnectionClosed(self._reason or CloseReason.CLOSED_BY_HOST)

    def _close_now(self, reason: CloseReason) -> None:
        """Record ``reason`` (if first) and close at once, without awaiting:
        what is queued is dropped and the writer task cancelled.

        Waiting receivers and senders wake with :class:`ConnectionClosed`.  A
        stream that cannot be closed without awaiting is closed forcefully
        in the background (or by :meth:`aclose`, which waits for that).
        """
        self._set_reason(reason)
        self._send_closed = True
        self._cork = None
        queue = self._queue
        if queue is not None:
            self._queue = None
            queue.close(self._closed_error())
        if not self._transport_closed:
            self._mark_closed()
            if not self._transport.close():
                path = self._send_path
                if isinstance(path, QueuedSendPath):
                    with contextlib.suppress(RuntimeError):  # (nursery closed)
                        path.nursery.start_soon(self._transport.aclose_forcefully)

    def _mark_closed(self) -> None:
        self._transport_closed = True
        self._send_closed = True
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
            self._peer_first = not self._eof_sent
        self._bytes_received += count

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
        if not self._receive_buffer:
            return ConnectionClosed(reason)
        partial = self._receive_buffer.extract_some()
        if self._transport.ragged_eof:
            # A TLS stream cut inside a message, without close_notify: it
            # may have been truncated on purpose, so it is no clean end.
            self._close_now(CloseReason.ERROR)
            reason = CloseReason.ERROR
        return IncompleteMessage(reason, partial)

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
                if (frames is not None or exactly) and large_body(
                    self, frames, exactly
                ):
                    return await self._receive_large(frames, exactly)
                sock = self._fast_socket()
                if sock is None:
                    await self._fill()
                    continue
                # SocketTransport.receive_into, inlined so that an idle
                # connection waits here and holds fewer coroutine frames
                # (and this frame few locals: it is the one an idle
                # connection keeps).
                try:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    chunk = self._transport.receive_chunk_nowait()
                    while chunk is None:
                        await trio.lowlevel.wait_readable(sock)
                        chunk = self._transport.receive_chunk_nowait()
                except _TRANSPORT_ERRORS as exc:
                    raise self._broken(exc) from exc
                if frames is None or len(chunk) <= _SMALL_FRAME or buffer:
                    # (No new locals: the frame an idle connection waits in
                    # stays as small as it was.)
                    buffer.feed(chunk)
                    self._filled(len(chunk))
                    continue
                # Maybe a large frame, whole: a helper, for the same reason.
                message = self._take_chunk(chunk, frames)
                if message is not None:
                    return message
        except ConnectionClosed as exc:
            raise _iteration_end(exc, iterating) from exc.__cause__
        finally:
            self._receiving = False

    async def _receive_large(self, frames: Frames | None, exactly: int) -> bytes:
        # (Not inline: a local of its own would enlarge the frame of every
        # receive that waits.)
        body = large_body(self, frames, exactly)
        assert body is not None
        return await receive_direct(self, *body)

    def _take_chunk(self, chunk: memoryview, frames: Frames | None) -> bytes | None:
        """Buffer a received chunk (of the thread's scratch buffer); return
        the large frame at its front if it arrived whole: copied out of the
        chunk once, not into the buffer and out again."""
        count = len(chunk)
        buffer = self._receive_buffer
        if frames is not None and count and not buffer:
            end = large_frame_end(chunk, frames.header_size, frames.max_size)
            if end:
                buffer.feed(chunk[end:])
                self._filled(count)
                self._message_started = None
                return bytes(chunk[frames.header_size : end])
        buffer.feed(chunk)
        self._filled(count)
        return None

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
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
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

    # ---------------------------------------------------------------- batches

    async def receive_batch(self) -> list[bytes]:
        """Receive every whole message already received, at least one: a
        list of messages of :attr:`framing`, in order.

        For throughput: one call (and one pass through the scheduler at
        most) per received chunk instead of per message.  A batch holds what
        arrived, so it is bounded by the bytes received, never by a count
        the peer chose.  With ``framing=None`` a batch is one chunk of raw
        bytes.  Messages before a bad one (a line too long, a frame too
        large) are returned first; the call after raises.  A cancelled call
        loses nothing.

        Raises:
            ConnectionClosed: the stream ended (CLOSED_BY_PEER) or the
                connection is closed.
            IncompleteMessage: the stream ended inside a message.
            ProtocolError: as :meth:`receive` (the connection is closed).

        .. versionadded:: 0.1
        """
        return await self._next_batch(False)

    def batches(self) -> AsyncIterator[list[bytes]]:
        """``async for batch in conn.batches()``: :meth:`receive_batch` in
        a loop, ending when the peer closes cleanly between messages (as
        ``async for message in conn`` does)::

            async for batch in conn.batches():
                await conn.send_many(batch)

        .. versionadded:: 0.1
        """
        return _Batches(self)

    async def _next_batch(self, iterating: bool) -> list[bytes]:
        ready = self._ready
        if ready is not None and not self._transport_closed:
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._ready is ready:  # (a receive in another task may take it)
                self._ready = None
                return list(ready)
        result = await self._receive_message(
            self._extract_all, _frames_of(self._framing), iterating=iterating
        )
        # (A large frame received outside the buffer comes back alone.)
        return result if isinstance(result, list) else [result]

    def _extract_all(self, buffer: ReceiveBuffer) -> list[bytes] | None:
        if not buffer:
            return None
        framing = self._framing
        if framing is None:
            return [buffer.extract_some()]
        return framing.extract_all(buffer) or None

    # ---------------------------------------------------------------- sending

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
        if type(data) is bytes and len(data) >= SCATTER_MIN:
            await self._send_parts(framing.header(len(data)), data)
        else:
            await self._send(framing.encode(data))

    async def send(self, message: BytesLike | str) -> None:
        """Send one message of :attr:`framing` (raw bytes when it is None).

        On a connection a server handed to its handler, this returns once the
        message is queued; it waits while the connection's outgoing queue is
        full (``send_queue_size`` messages or ``send_queue_bytes`` bytes).  A
        wait longer than :attr:`idle_timeout` for the peer to read closes the
        connection with TIMEOUT.

        Raises:
            ConnectionClosed: the connection is closed, or this side already
                sent its end of stream (:meth:`send_eof`).
        """
        framing = self._framing
        if (
            type(framing) is Frames  # (first: for lines, the only check)
            and len(message) >= SCATTER_MIN
            and type(message) is bytes
        ):
            await self._send_parts(framing.header(len(message)), message)
            return
        data = as_bytes(message) if framing is None else framing.encode(message)
        # (_send's body, inlined, and try_push's corked case too: this is
        # the hottest path of a server that answers pipelined requests, and a
        # coroutine call costs about a fifth of it.)
        await trio.lowlevel.checkpoint_if_cancelled()
        cork = self._cork
        if cork is not None and not self._send_closed:
            cork.append(data)
            self._cork_bytes += len(data)
            if self._cork_bytes >= MAX_BATCH_BYTES:
                self._uncork()
        elif not self._send_path.try_push(self, data):
            await self._send_path.send_slow(self, data)
        self._sends_since_yield += 1
        if self._sends_since_yield >= SENDS_PER_YIELD:
            self._sends_since_yield = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def send_many(self, messages: Iterable[BytesLike | str]) -> None:
        """Send messages of :attr:`framing` (raw bytes when it is None), in
        order, joined into as few writes as possible.

        The counterpart of :meth:`receive_batch` for throughput: the
        messages are encoded and checked first (nothing is sent if any is
        refused), then handed on as one unit.

        On a connection a server handed to its handler, **either every
        message is accepted or none is**: if this raises -- cancelled while
        it waits for room, or the connection closed -- none of them was
        accepted and no byte of them goes out; if it returns, all were, and
        they go out whole and in order.  The batch counts as its messages
        and bytes against ``send_queue_size`` and ``send_queue_bytes`` and
        waits, whole, until the queue is under both bounds (so it may go
        over them by one batch); a wait longer than :attr:`idle_timeout`
        closes the connection with TIMEOUT.

        On a client connection the call returns once the kernel has taken
        every byte.  As with :meth:`send`, a cancellation (or failure) while
        the kernel takes them closes the connection (ERROR) at once: the
        peer then has a prefix of the messages, each whole, and the end of
        the stream -- the message cut short, if any, reaches it as
        :exc:`IncompleteMessage`, never followed by other bytes.

        Raises:
            ValueError, MessageTooLarge: a message cannot be encoded (as
                :meth:`send`); nothing was sent.
            ConnectionClosed: the connection is closed, or this side already
                sent its end of stream.

        .. versionadded:: 0.1
        """
        data, count = _encode_many(self._framing, messages)
        await trio.lowlevel.checkpoint_if_cancelled()
        if not count:
            return
        path = self._send_path
        if not path.try_push_many(self, data, count):
            await path.send_slow(self, data, count)
        self._sends_since_yield += count
        if self._sends_since_yield >= SENDS_PER_YIELD:
            self._sends_since_yield = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def _send_parts(self, header: bytes, payload: bytes) -> None:
        # A large frame: its header and payload go out with one sendmsg
        # where possible, so the payload is never copied.
        await trio.lowlevel.checkpoint_if_cancelled()
        path = self._send_path
        if not path.try_push_parts(self, header, payload):
            await path.send_slow(self, header, 1, payload)
        self._sends_since_yield += 1
        if self._sends_since_yield >= SENDS_PER_YIELD:
            self._sends_since_yield = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def _send(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._send_path.try_push(self, data):
            await self._send_path.send_slow(self, data)
        self._sends_since_yield += 1
        if self._sends_since_yield >= SENDS_PER_YIELD:
            self._sends_since_yield = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    def _uncork(self) -> None:
        cork = self._cork
        if cork is not None:
            self._cork = None
            path = self._send_path
            assert isinstance(path, QueuedSendPath)
            path.write_or_queue(
                self, cork[0] if len(cork) == 1 else b"".join(cork), len(cork)
            )

    def _uncork_soon(self) -> None:
        # Runs from the scheduler once the corking task has yielded.
        if not self._transport_closed:
            with contextlib.suppress(ConnectionClosed):
                self._uncork()

    def _offer(self, data: bytes) -> bool:
        """Queue already-encoded bytes without waiting, for a broadcast.

        Returns whether they were accepted; a connection over its broadcast
        headroom (or stalled) is closed as a slow consumer instead.
        """
        path = self._send_path
        if not isinstance(path, QueuedSendPath):
            raise RuntimeError("broadcasts need a connection owned by a server")
        return path.offer(self, data)

    async def send_eof(self) -> None:
        """Flush what is queued, then half-close: the peer sees end of stream.

        Receiving still works afterwards; sending raises
        :class:`ConnectionClosed` (the connection stays open).  A second call
        does nothing.  Waiting for the queue to drain is bounded like a close
        (``flush_timeout``) and by :attr:`idle_timeout`; when that runs out the
        connection is closed with TIMEOUT.

        Raises:
            TypeError: the stream cannot half-close (TLS cannot).
            ConnectionClosed: the connection is closed, or the flush ran out
                of time.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._eof_sent and not self._transport_closed:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        if self._send_closed:
            raise self._closed_error()
        if not self._transport.can_send_eof:
            raise TypeError(f"{self._transport.describe()} cannot half-close")
        self._send_closed = self._eof_sent = True
        with contextlib.suppress(ConnectionClosed):
            self._uncork()
        now = trio.current_time()
        deadline = now + self._send_path.limits.flush_timeout
        if self.idle_timeout is not None:
            deadline = min(deadline, now + self.idle_timeout)
        with trio.move_on_at(deadline) as scope:
            queue = self._queue
            if queue is not None:
                await queue.drained.wait()
            async with self._lock():
                if self._transport_closed:
                    raise self._closed_error()
                try:
                    await self._transport.send_eof()
                except _TRANSPORT_ERRORS as exc:
                    raise self._broken(exc) from exc
        if scope.cancelled_caught:
            self._close_now(CloseReason.TIMEOUT)
            raise self._closed_error()

    def _lock(self) -> trio.StrictFIFOLock:
        lock = self._send_lock
        if lock is None:
            lock = self._send_lock = trio.StrictFIFOLock()
        return lock

    # -------------------------------------------------------------------- TLS

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        *,
        server_side: bool | None = None,
        server_hostname: str | None = None,
        handshake_timeout: float | None = None,
    ) -> None:
        """Upgrade the connection to TLS in place (STARTTLS); return once the
        handshake is done.

        The same connection goes on over TLS: its framing, receive modes,
        counters, send queue and close reason.  Typically the two sides
        agree on the upgrade in plaintext first, then both call this::

            # server side, in a handler
            line = await conn.receive_line()
            if line == b"STARTTLS":
                await conn.send_line("220 go ahead")
                await conn.start_tls(server_context)

            # client side
            await conn.send_line("STARTTLS")
            assert (await conn.receive_line()).startswith(b"220")
            await conn.start_tls(client_context)

        **Nothing unprotected passes for protected.**  If any received byte
        is still unread when this is called (say, a client that sent
        ``STARTTLS`` and a command behind it without waiting for the
        answer), the upgrade is refused: :class:`StartTLSRefused` is raised
        and the connection closed with :attr:`CloseReason.PROTOCOL_ERROR`.
        Those bytes came in plaintext, and reading them after the upgrade
        would let anyone on the path inject commands (CVE-2011-0411).

        **Sends.**  What was sent before this call goes out first, in
        plaintext (waiting at most ``flush_timeout``, like a close, and at
        most :attr:`idle_timeout`; then the connection is closed with
        TIMEOUT).  Sends from other tasks and broadcasts made during the
        handshake wait, and go out over TLS once it is done.  No receive may
        run meanwhile (:exc:`trio.BusyResourceError`).

        Args:
            ssl_context: the TLS settings: a server-side context (with a
                certificate) on the server's side of the connection, a
                client-side one on the client's.
            server_side: which side of the handshake this is.  Known for
                the connections a server hands to its handler (True) and
                those :func:`connect_tcp` and :func:`connect_unix` make
                (False); a :class:`Connection` made by hand must say.
            server_hostname: the name the server's certificate must carry
                (client side).  Default: the host given to
                :func:`connect_tcp`; a UNIX socket has none, so pass one
                unless the context does not check host names.
            handshake_timeout: seconds the handshake may take.  Default:
                the server's ``handshake_timeout`` option for its
                connections, else 10.

        The rule of the server's ``require_close_notify`` option applies to
        its connections after the upgrade, as it does to connections that
        were TLS from the start.  After the upgrade :meth:`send_eof` is
        refused (TLS cannot half-close).

        Raises:
            StartTLSRefused: received bytes were still unread (see above).
            ConnectError: the handshake failed (``.reason`` ERROR, the TLS
                error as ``__cause__``) or timed out (TIMEOUT); the
                connection is closed with that reason.  Cancelling the
                handshake closes the connection too (ERROR): a half-made
                TLS session cannot be used.
            ConnectionClosed: the connection is closed, this side has sent
                its end of stream, or the peer had finished sending.
            ValueError: ``server_side`` is needed and missing,
                ``ssl_context`` does not fit (a client context that checks
                host names without ``server_hostname``), or the connection
                already speaks TLS over its socket.  The connection is left
                as it was.
            trio.BusyResourceError: another task is receiving.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        settings = self._tls
        if server_side is None:
            if settings is None:
                raise ValueError(
                    "start_tls: pass server_side=True or False; this connection "
                    "was made by hand, so which side it is is not known"
                )
            server_side = settings.server_side
        if handshake_timeout is None:
            handshake_timeout = (
                DEFAULT_HANDSHAKE_TIMEOUT
                if settings is None
                else settings.handshake_timeout
            )
        elif not handshake_timeout > 0:
            raise ValueError(
                f"handshake_timeout must be > 0, not {handshake_timeout!r}"
            )
        if not server_side and server_hostname is None and settings is not None:
            server_hostname = settings.server_hostname
        if self._receiving:
            raise trio.BusyResourceError(
                "another task is receiving; start_tls cannot run beside it"
            )
        if self._send_closed:
            raise self._closed_error()
        self._unready()
        unread = len(self._receive_buffer)
        if unread:
            logger.info(
                "%r: refusing to start TLS with %d unread plaintext bytes buffered",
                self,
                unread,
            )
            self._close_now(CloseReason.PROTOCOL_ERROR)
            raise StartTLSRefused(unread)
        if self._eof:
            self._close_now(CloseReason.CLOSED_BY_HOST)  # (CLOSED_BY_PEER)
            raise ConnectionClosed(
                self._reason or CloseReason.CLOSED_BY_PEER,
                "cannot start TLS: the peer has finished sending",
            )
        upgraded = self._transport.upgraded(
            ssl_context,
            server_side=server_side,
            server_hostname=server_hostname,
            require_close_notify=settings is not None and settings.require_close_notify,
        )
        path = self._send_path
        deadline = trio.current_time() + path.limits.flush_timeout
        if self.idle_timeout is not None:
            deadline = min(deadline, trio.current_time() + self.idle_timeout)
        self._receiving = True  # (no receive may run during the upgrade)
        try:
            await path.pause(self, deadline)
            try:
                self._transport = upgraded
                await self._handshake(upgraded, handshake_timeout)
            finally:
                path.resume(self)
        finally:
            self._receiving = False
        self._batch_ok = True

    async def _handshake(self, transport: Transport, seconds: float) -> None:
        """Run the TLS handshake of :meth:`start_tls`; on any failure the
        connection is closed before this raises."""
        where = format_address(self.remote_address)
        try:
            with trio.move_on_after(seconds) as scope:
                await transport.do_handshake()
        except _TRANSPORT_ERRORS as exc:
            if self._transport_closed:  # (closed by another task meanwhile)
                raise self._closed_error() from exc
            cause = exc.__cause__ or exc
            logger.info("%r: TLS handshake failed: %r", self, cause)
            await self._close_at_once(CloseReason.ERROR)
            raise ConnectError(
                CloseReason.ERROR, f"TLS handshake with {where} failed: {cause}"
            ) from cause
        except BaseException:
            await self._close_at_once(CloseReason.ERROR)
            raise
        if scope.cancelled_caught:
            logger.info("%r: TLS handshake timed out", self)
            await self._close_at_once(CloseReason.TIMEOUT)
            raise ConnectError(
                CloseReason.TIMEOUT,
                f"TLS handshake with {where} timed out after {seconds} s",
            )

    async def _close_at_once(self, reason: CloseReason) -> None:
        """:meth:`_close_now`, and wait for a stream that cannot be closed
        without awaiting (shielded: this may run in a cancelled task)."""
        self._close_now(reason)
        if not self._transport.closed:
            with trio.CancelScope(shield=True):
                await self._transport.aclose_forcefully()

    # ---------------------------------------------------------------- closing

    async def _finish(self, reason: CloseReason, scope: trio.CancelScope) -> None:
        """Close with ``reason`` after flushing what is queued.

        Flushing and the transport's own graceful close (TLS close_notify) run
        inside ``scope``, whose deadline bounds them (the caller may shield
        it, or move its deadline earlier while it runs).  When the deadline
        passes first, the connection is closed forcefully.  Either way the
        stream has been closed when this returns.
        """
        if not self._transport_closed:
            self._send_closed = True
            with contextlib.suppress(ConnectionClosed):
                self._uncork()
            with scope:
                queue = self._queue
                if queue is not None:
                    await queue.drained.wait()
                if not self._transport_closed:
                    self._set_reason(reason)
                    self._mark_closed()
                    with contextlib.suppress(*_TRANSPORT_ERRORS):
                        await self._transport.aclose()
            if not self._transport_closed:
                queue = self._queue
                unsent = 0 if queue is None else queue.nbytes
                logger.info(
                    "%r: flush timed out after %s s; closing with %d bytes unsent",
                    self,
                    self._send_path.limits.flush_timeout,
                    unsent,
                )
                if reason is CloseReason.CLOSED_BY_HOST:
                    reason = CloseReason.TIMEOUT
                self._close_now(reason)
        with trio.CancelScope(shield=True):
            if not self._transport.closed:
                await self._transport.aclose_forcefully()
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()

    async def aclose(self) -> None:
        """Close the connection after flushing everything queued for sending.

        The reason is :attr:`CloseReason.CLOSED_BY_HOST` (CLOSED_BY_PEER if
        the peer had finished sending first) unless something else closed it
        first.  Flushing and the transport's close take at most
        ``flush_timeout`` seconds (5 by default), even if the calling task is
        cancelled; what is still queued then is dropped, the stream is closed
        forcefully, and the reason is TIMEOUT.  The stream has been closed
        when this returns.
        """
        deadline = trio.current_time() + self._send_path.limits.flush_timeout
        await self._finish(
            CloseReason.CLOSED_BY_HOST, trio.CancelScope(shield=True, deadline=deadline)
        )
        await trio.lowlevel.checkpoint_if_cancelled()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
