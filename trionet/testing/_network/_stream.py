"""Connections and listeners of a memory network.

How this works
--------------
A connection is two :class:`Pipe` objects, one per direction, and a
:class:`MemoryStream` at each end that sends into one pipe and receives
from the other.  A pipe holds the bytes its sender has written and its
receiver has not read yet -- in flight or arrived -- and never more than its
``capacity``: that bound is the socket buffers of a real connection, so a
receiver that stops reading makes ``send_all`` wait once the pipe is full,
just as the kernel does.  Each chunk written is stamped with the time it
arrives (latency, jitter and bandwidth of its route, never earlier than the
chunk before it: TCP stays in order); the receiver takes only chunks whose
time has come, and takes none while its route is cut (a partition, a host
down).  Nothing runs in the background: a receiver that waits sleeps until
the first chunk's arrival time or until something changes (more bytes, an
end of stream, a reset, a change of the network's faults).

Closing follows the kernel:

* ``send_eof`` (or a close with nothing unread) ends the stream after the
  bytes already written, like a FIN;
* closing with bytes still unread resets the connection, like an RST:
  what the closing end had not read is dropped, and so is what it sent that
  has not arrived yet; the peer reads what had arrived, then its receive
  (and its next send) raises :class:`trio.BrokenResourceError` caused by
  :class:`ConnectionResetError` -- once the RST can reach it: not across a
  partition (a reset the network injects, or a host going down, is seen at
  once, after the bytes that had arrived);
* sending to a peer that has closed its end is accepted once (the bytes go
  nowhere); later sends raise :class:`trio.BrokenResourceError` caused by
  :class:`BrokenPipeError`, as after the peer's RST.

A listener holds a bounded backlog of connections made but not yet
accepted; a client that finds it full waits, as a client whose SYN the
kernel dropped does, until there is room or its connect timeout runs out.
"""

from __future__ import annotations

import errno
import math
import operator
import os
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from ..._network import SimulatedListener, SimulatedStream
from ..._transport import Address, PeerCredentials
from .._faults import _Guard
from ._records import LiveConnection

if TYPE_CHECKING:
    from ._hosts import Route

__all__ = ["MemoryListener", "MemoryStream", "Pipe", "stream_pair"]

#: Bytes a receive returns at most when the caller does not say.
RECEIVE_SIZE = 65536
#: Bytes a refused client may have sent that are dropped before the end of
#: stream (what the kernel server does, too: see ``_refuse`` in _server.py).
REFUSED_DRAIN = 256 * 1024


def _error(code: int, text: str = "") -> OSError:
    message = os.strerror(code) + (f" ({text})" if text else "")
    if code == errno.ECONNRESET:
        return ConnectionResetError(code, message)
    if code == errno.EPIPE:
        return BrokenPipeError(code, message)
    if code == errno.ECONNREFUSED:
        return ConnectionRefusedError(code, message)
    return OSError(code, message)


def _broken(code: int) -> trio.BrokenResourceError:
    cause = _error(code, "memory network")
    error = trio.BrokenResourceError(f"connection failed: {cause.strerror}")
    error.__cause__ = cause
    return error


class Pipe:
    """One direction of a connection: bytes on their way, bounded."""

    __slots__ = (
        "capacity",
        "eof_at",
        "last_arrival",
        "live",
        "nbytes",
        "readable",
        "receiver_closed",
        "reset",
        "reset_routed",
        "route",
        "segments",
        "to_server",
        "writable",
    )

    def __init__(
        self, route: Route, capacity: int, live: LiveConnection, to_server: bool
    ) -> None:
        self.route = route
        self.capacity = capacity
        self.live = live
        self.to_server = to_server
        # [arrival time, bytes not yet read], arrival times non-decreasing.
        self.segments: deque[list[float | memoryview]] = deque()
        self.nbytes = 0
        self.last_arrival = -math.inf
        #: When the end of stream arrives; None until the sender ends it.
        self.eof_at: float | None = None
        self.reset = False
        # Whether the reset is a packet (an RST), which a partition holds up.
        self.reset_routed = False
        self.receiver_closed = False
        self.readable = trio.lowlevel.ParkingLot()
        self.writable = trio.lowlevel.ParkingLot()

    def _arrival(self, size: int) -> float:
        arrival = max(self.route.arrival(trio.current_time(), size), self.last_arrival)
        self.last_arrival = arrival
        return arrival

    def put(self, data: memoryview) -> None:
        self.live.sent(self.to_server, data)
        if self.reset:
            return  # (an RST not seen yet: the bytes are lost)
        self.segments.append([self._arrival(len(data)), data])
        self.nbytes += len(data)
        self.readable.unpark_all()

    def finish(self) -> None:
        """The sender is done: the end of stream follows the bytes written."""
        if self.eof_at is None:
            self.eof_at = self._arrival(0)
            self.readable.unpark_all()

    def abort(self, routed: bool, *, keep_arrived: bool = True) -> None:
        """A reset; both ends' waiters wake to see it.

        Bytes that have arrived stay readable before it, as in a kernel's
        receive buffer (unless ``keep_arrived`` is false: nobody will read
        them); bytes still on their way are lost.  ``routed``: the reset is
        an RST one end sent, which a partition holds up.
        """
        if not self.reset:
            self.reset = True
            self.reset_routed = routed
        elif not routed:
            self.reset_routed = False
        segments = self.segments
        if keep_arrived:
            now = trio.current_time()
            while segments and segments[-1][0] > now:  # type: ignore[operator]
                view = segments.pop()[1]
                assert isinstance(view, memoryview)
                self.nbytes -= len(view)
        else:
            segments.clear()
            self.nbytes = 0
        self.wake()

    def reset_seen(self) -> bool:
        """Whether the reset has reached the ends."""
        return self.reset and (not self.reset_routed or self.route.deliverable())

    def wake(self) -> None:
        self.readable.unpark_all()
        self.writable.unpark_all()

    def take(self, max_bytes: int, limit: float) -> bytes:
        """Remove and return up to ``max_bytes`` of the bytes arrived by ``limit``."""
        pieces: list[memoryview] = []
        wanted = max_bytes
        segments = self.segments
        while wanted and segments and segments[0][0] <= limit:  # type: ignore[operator]
            segment = segments[0]
            view = segment[1]
            assert isinstance(view, memoryview)
            if len(view) <= wanted:
                segments.popleft()
                pieces.append(view)
                wanted -= len(view)
            else:
                pieces.append(view[:wanted])
                segment[1] = view[wanted:]
                wanted = 0
        taken = max_bytes - wanted
        if taken:
            self.nbytes -= taken
            self.writable.unpark_all()
        return b"".join(pieces)

    def next_arrival(self) -> float:
        """When the next thing (bytes or end of stream) arrives."""
        if self.segments:
            arrival = self.segments[0][0]
            assert isinstance(arrival, float)
            return arrival
        return math.inf if self.eof_at is None else self.eof_at


class MemoryStream(SimulatedStream):
    """One end of a connection over a :class:`MemoryNetwork`: the
    :class:`trio.abc.HalfCloseableStream` that a :class:`trionet.Connection`
    made over a memory network runs on.

    trionet makes these itself (your code meets them as
    ``connect_tcp``'s and a server's connections); a test may hand one to
    :meth:`MemoryNetwork.reset` or :meth:`MemoryNetwork.record`.  Each
    direction holds at most the network's ``buffer_size`` bytes not yet
    read; closing with bytes unread resets the connection, as a socket does.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        incoming: Pipe,
        outgoing: Pipe,
        local: Address,
        remote: Address,
        credentials: PeerCredentials | None,
        on_closed: Callable[[], None],
    ) -> None:
        self._incoming = incoming
        self._outgoing = outgoing
        self._local = local
        self._remote = remote
        self._credentials = credentials
        self._on_closed = on_closed
        self._closed = False
        self._eof_sent = False
        # Set once a send went to a peer that had closed (its RST came back).
        self._send_broken = False
        self._receive_guard = _Guard("receiving")
        self._send_guard = _Guard("sending")

    def __repr__(self) -> str:
        from ..._util import format_address

        return (
            f"<trionet.testing.MemoryStream {format_address(self._local)} -> "
            f"{format_address(self._remote)}>"
        )

    @property
    def _live(self) -> LiveConnection:
        # (The running record behind this connection's ConnectionRecord.)
        return self._incoming.live

    # ---------------------------------------------------------- SimulatedStream

    def endpoints(
        self,
    ) -> tuple[Address | None, Address | None, PeerCredentials | None]:
        return self._local, self._remote, self._credentials

    def refuse(self) -> None:
        incoming = self._incoming
        if incoming.route.deliverable():
            incoming.take(REFUSED_DRAIN, trio.current_time())
        self._finish_sending()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        incoming, outgoing = self._incoming, self._outgoing
        if incoming.nbytes and not incoming.reset:
            # Unread bytes: the kernel answers a close with a reset.
            incoming.abort(routed=True, keep_arrived=False)
            outgoing.abort(routed=True)
            self._live.ended("reset")
        elif not outgoing.reset:
            outgoing.finish()
        incoming.receiver_closed = True
        incoming.wake()
        outgoing.wake()
        self._on_closed()

    def reset(self) -> None:
        """Reset the connection: both ends see a connection reset at once."""
        self._incoming.abort(routed=False)
        self._outgoing.abort(routed=False)
        self._live.ended("reset")

    # -------------------------------------------------------- trio.abc.Stream

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is None:
            max_bytes = RECEIVE_SIZE
        else:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        with self._receive_guard:
            await trio.lowlevel.checkpoint()
            pipe = self._incoming
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("this stream was closed")
                wake = math.inf
                deliverable = pipe.route.deliverable()
                now = trio.current_time()
                if deliverable and (data := pipe.take(max_bytes, now)):
                    return data
                # (What arrived before a reset is read first, as on Linux.)
                if pipe.reset_seen():
                    raise _broken(errno.ECONNRESET)
                if deliverable:
                    eof_at = pipe.eof_at
                    if not pipe.segments and eof_at is not None and eof_at <= now:
                        return b""
                    wake = pipe.next_arrival()
                with trio.move_on_at(wake):
                    await pipe.readable.park()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._send_guard:
            await trio.lowlevel.checkpoint()
            view = memoryview(bytes(data))
            while True:
                view = view[self._put(view) :]
                if not view:
                    return
                await self._outgoing.writable.park()

    def send_nowait(self, data: bytes | memoryview) -> int:
        if self._send_guard._busy:
            return 0  # (a send_all is waiting: bytes must not overtake it)
        self._check_sending()
        room = self._outgoing.capacity - self._outgoing.nbytes
        return self._put(memoryview(bytes(data[:room])))

    def _put(self, view: memoryview) -> int:
        """Write what fits of ``view`` (bytes of our own) now; return how
        many bytes went."""
        self._check_sending()
        pipe = self._outgoing
        if pipe.receiver_closed:
            # The peer closed its end: these bytes go nowhere, and its
            # reset makes the next send fail.
            if view:
                pipe.live.sent(pipe.to_server, view)
                self._send_broken = True
            return len(view)
        taken = min(len(view), pipe.capacity - pipe.nbytes)
        if taken > 0:
            pipe.put(view[:taken])
        return max(taken, 0)

    async def wait_send_all_might_not_block(self) -> None:
        with self._send_guard:
            await trio.lowlevel.checkpoint()
            pipe = self._outgoing
            while True:
                self._check_sending()
                if pipe.receiver_closed or pipe.nbytes < pipe.capacity:
                    return
                await pipe.writable.park()

    async def send_eof(self) -> None:
        with self._send_guard:
            await trio.lowlevel.checkpoint()
            if self._closed:
                raise trio.ClosedResourceError("this stream was closed")
            if self._outgoing.reset_seen():
                raise _broken(errno.ECONNRESET)
            self._finish_sending()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def _finish_sending(self) -> None:
        if not self._eof_sent:
            self._eof_sent = True
            self._outgoing.finish()

    def _check_sending(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this stream was closed")
        if self._eof_sent:
            raise trio.ClosedResourceError("send_eof was called on this stream")
        if self._outgoing.reset_seen():
            raise _broken(errno.ECONNRESET)
        if self._send_broken:
            raise _broken(errno.EPIPE)


def stream_pair(
    to_server: Pipe,
    to_client: Pipe,
    client: Address,
    server: Address,
    credentials: tuple[PeerCredentials | None, PeerCredentials | None],
    on_closed: Callable[[], None],
) -> tuple[MemoryStream, MemoryStream]:
    """The (client, server) ends of a connection over two pipes."""
    client_end = MemoryStream(
        to_client, to_server, client, server, credentials[0], on_closed
    )
    server_end = MemoryStream(
        to_server, to_client, server, client, credentials[1], on_closed
    )
    return client_end, server_end


class MemoryListener(SimulatedListener):
    """A listening endpoint of a memory network.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        address: Address,
        backlog: int,
        on_closed: Callable[[MemoryListener], None],
        *,
        so_sndbuf: int | None = None,
        so_rcvbuf: int | None = None,
        reuse_port: bool = False,
    ) -> None:
        self._address = address
        self.backlog = backlog
        self._on_closed = on_closed
        self.so_sndbuf = so_sndbuf
        self.so_rcvbuf = so_rcvbuf
        self.reuse_port = reuse_port
        self.closed = False
        self._pending: deque[MemoryStream] = deque()
        self._arrivals = trio.lowlevel.ParkingLot()
        #: Clients waiting for room in the backlog.
        self.room = trio.lowlevel.ParkingLot()

    def __repr__(self) -> str:
        from ..._util import format_address

        return f"<trionet.testing.MemoryListener {format_address(self._address)}>"

    @property
    def bound_ip(self) -> str:
        """The IP address bound (a wildcard address included; "" for UNIX)."""
        address = self._address
        return "" if isinstance(address, str) else str(address[0])

    @property
    def full(self) -> bool:
        return len(self._pending) >= self.backlog

    def enqueue(self, server_end: MemoryStream) -> None:
        self._pending.append(server_end)
        self._arrivals.unpark_all()

    def getsockname(self) -> Address:
        return self._address

    def accept(self) -> tuple[SimulatedStream, Address]:
        if self.closed:
            raise _error(errno.EBADF)
        if not self._pending:
            raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        stream = self._pending.popleft()
        self.room.unpark()
        remote = stream.endpoints()[1]
        assert remote is not None
        return stream, remote

    async def wait_acceptable(self) -> None:
        while not self._pending:
            if self.closed:
                raise trio.ClosedResourceError("the listener was closed")
            await self._arrivals.park()
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        # Connections made but never accepted: the kernel resets them.
        while self._pending:
            stream = self._pending.popleft()
            stream.reset()
            stream.close()
        self._arrivals.unpark_all()
        self.room.unpark_all()
        self._on_closed(self)
