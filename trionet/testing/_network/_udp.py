"""Datagram sockets of a memory network.

How this works
--------------
A :class:`MemoryDatagramSocket` is a ``trionet._network.SimulatedDatagramSocket``:
its calls mean what a non-blocking stdlib UDP socket's do, so trionet's UDP
fast path drives it with the very calls it makes on a kernel socket --
``sendto``/``send`` that return at once, ``recvfrom(bufsize, MSG_TRUNC)``
that raises :class:`BlockingIOError` when nothing has arrived (and reports
a datagram's real size, as Linux does, so ``max_size`` and oversized
datagrams behave as on the kernel) -- and waits with the socket's own
:meth:`~MemoryDatagramSocket.wait_readable` /
:meth:`~MemoryDatagramSocket.wait_writable` in place of trio's.  What the
fast path leaves to a trio socket (binding, connecting, sending to a name)
goes through :class:`MemoryTrioSocket`, the same socket with trio's face.

A send decides the datagram's fate at once, in a fixed order of random
draws on its link's own generator: dropped if either host is down or the
link is partitioned, then lost (``loss``), then duplicated
(``duplicate``); each copy gets its arrival time (latency, jitter,
bandwidth) and perhaps an extra ``reorder_delay`` (``reorder``), and is
queued at the socket bound to the destination -- unless that socket's
receive buffer (``buffer_size`` bytes, or ``SO_RCVBUF`` where set) is full,
as a kernel drops what does not fit.  Nothing runs in the background: a
datagram is readable once its arrival time has come, and a wait for one
sleeps until then.  A send never blocks (no link has a queue of its own to
fill: bandwidth only delays arrivals).  A datagram to a port nobody
listens on is dropped, and a *connected* sender is told, as by ICMP on
Linux: its next receive or send raises :class:`ConnectionRefusedError`
(an unconnected one hears nothing).
"""

from __future__ import annotations

import errno
import heapq
import math
import socket
import zlib
from typing import TYPE_CHECKING, Any

import trio

from ..._network import SimulatedDatagramSocket
from ..._udp._common import Address
from ._records import DatagramFate
from ._stream import _error

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from ._hosts import Host
    from ._sockets import SocketCalls

__all__ = ["MemoryDatagramSocket", "MemoryTrioSocket"]

#: What ``fileno()`` gives for an open memory socket: no descriptor exists.
PSEUDO_DESCRIPTOR = 0x7FFFFFFF
#: The largest datagram an IPv4 and an IPv6 socket send, as on the kernel.
_MAX_PAYLOAD = {socket.AF_INET: 65507, socket.AF_INET6: 65527}
_WILDCARDS = {socket.AF_INET: "0.0.0.0", socket.AF_INET6: "::"}
#: Broadcast addresses: refused without SO_BROADCAST.  With it, the loopback
#: broadcast address reaches the sockets bound to it, and the others are
#: unreachable (the memory network reaches no other machine).
_BROADCAST = ("255.255.255.255", "<broadcast>", "127.255.255.255")
_MSG_TRUNC = getattr(socket, "MSG_TRUNC", 0)
_BUFFER_OPTIONS = {
    (socket.SOL_SOCKET, socket.SO_RCVBUF),
    (socket.SOL_SOCKET, socket.SO_SNDBUF),
}


def _check_address(family: int, address: object, error: type[Exception]) -> None:
    """Refuse an address of the wrong shape, with the stdlib's words (and
    ``error``: TypeError as the socket module, ValueError as trio)."""
    if family == socket.AF_INET:
        if not (isinstance(address, tuple) and len(address) == 2):
            raise error("AF_INET address must be a (host, port) tuple")
    elif not (isinstance(address, tuple) and 2 <= len(address) <= 4):
        raise error(
            "AF_INET6 address must be a (host, port[, flowinfo[, scopeid]]) tuple"
        )
    if not isinstance(address[1], int):
        raise error(f"the port must be an int, not {type(address[1]).__name__}")


class MemoryDatagramSocket(SimulatedDatagramSocket):
    """A UDP socket of a memory network (see the top of this module)."""

    def __init__(self, network: SocketCalls, family: socket.AddressFamily) -> None:
        if family not in _WILDCARDS:
            raise _error(errno.EAFNOSUPPORT)
        self._network = network
        self._family = family
        self.host: Host | None = None
        #: The IP bound (perhaps a wildcard); "" until bound.
        self.bound_ip = ""
        self._port = 0
        self.reuse_port = False
        self.remote: Address | None = None
        self._options: dict[tuple[int, int], int | bytes] = {}
        self._closed = False
        # (arrival, sequence, payload, source)
        self._queue: list[tuple[float, int, bytes, Address]] = []
        self._queued_bytes = 0
        self._sequence = 0
        self._capacity = network.buffer_size
        self._pending_error: OSError | None = None
        self._arrivals = trio.lowlevel.ParkingLot()
        self._face: MemoryTrioSocket | None = None

    def __repr__(self) -> str:
        from ..._util import format_address

        return (
            f"<trionet.testing memory UDP socket {format_address(self.getsockname())}>"
        )

    # ------------------------------------------------------------ the basics

    @property
    def family(self) -> socket.AddressFamily:
        return self._family

    def fileno(self) -> int:
        return -1 if self._closed else PSEUDO_DESCRIPTOR

    def setblocking(self, flag: bool) -> None:
        pass

    def _address(self, ip: str, port: int) -> Address:
        return (ip, port, 0, 0) if self._family == socket.AF_INET6 else (ip, port)

    def _local_ip(self) -> str:
        """The address datagrams come from (a wildcard bind sends from the
        host's own address)."""
        if self.host is None:
            return _WILDCARDS[self._family]
        if self.bound_ip in _WILDCARDS.values():
            own = self.host._address(self._family == socket.AF_INET6)
            return own or self.bound_ip
        return self.bound_ip

    def getsockname(self) -> Address:
        if self.host is None or self.remote is None:
            return self._address(self.bound_ip or _WILDCARDS[self._family], self._port)
        return self._address(self._local_ip(), self._port)

    def getpeername(self) -> Address:
        if self.remote is None:
            raise _error(errno.ENOTCONN)
        return self.remote

    def setsockopt(self, level: int, optname: int, value: int | bytes) -> None:
        if (level, optname) in _BUFFER_OPTIONS and isinstance(value, int):
            # The receive queue holds ``value`` bytes; like Linux, the socket
            # reports twice the value asked for (the kernel books that much
            # for its bookkeeping; a memory socket has none to book).
            if optname == socket.SO_RCVBUF:
                self._capacity = value
            value *= 2
        self._options[(level, optname)] = value

    def getsockopt(self, level: int, optname: int) -> int | bytes:
        default = self._capacity if (level, optname) in _BUFFER_OPTIONS else 0
        return self._options.get((level, optname), default)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.host is not None:
            bound = self.host._bound.get(("udp", self._port), [])
            if self in bound:
                bound.remove(self)
        self._queue.clear()
        self._queued_bytes = 0
        self._arrivals.unpark_all()

    def _check_open(self) -> None:
        if self._closed:
            raise _error(errno.EBADF)

    def _raise_pending(self) -> None:
        error, self._pending_error = self._pending_error, None
        if error is not None:
            raise error

    def trio_socket(self) -> MemoryTrioSocket:
        if self._face is None:
            self._face = MemoryTrioSocket(self)
        return self._face

    # ------------------------------------------------------ binding, connecting

    def bind(self, address: Any) -> None:
        self._check_open()
        if self.host is not None:
            raise _error(errno.EINVAL, "already bound")
        self._network._bind_datagram(self, str(address[0]), int(address[1]))

    def bound(self, host: Host, ip: str, port: int) -> None:
        """Called by the network once it has registered the socket."""
        self.host, self.bound_ip, self._port = host, ip, port

    def connect(self, address: Any) -> None:
        self._check_open()
        ip = self._network._datagram_destination(self._family, str(address[0]))
        if self.host is None:
            self._network._bind_datagram(self, _WILDCARDS[self._family], 0)
        self.remote = self._address(ip, int(address[1]))

    # ---------------------------------------------------------------- sending

    def send(self, data: Buffer) -> int:
        return self.sendto(data, None)

    def sendto(self, data: Buffer, address: Any) -> int:
        """Send at once (a memory socket never blocks); ``address`` None:
        to the connected remote.  A name is resolved in the network, as the
        stdlib would resolve it (blocking) on the kernel."""
        self._check_open()
        self._raise_pending()
        payload = bytes(data)
        if address is None:
            if self.remote is None:
                raise _error(errno.EDESTADDRREQ)
            destination = self.remote
        else:
            _check_address(self._family, address, TypeError)
            host = str(address[0])
            if host in _BROADCAST and not self._options.get(
                (socket.SOL_SOCKET, socket.SO_BROADCAST)
            ):
                raise _error(errno.EACCES)
            ip = self._network._datagram_destination(self._family, host)
            destination = self._address(ip, int(address[1]))
        if len(payload) > _MAX_PAYLOAD[self._family]:
            raise _error(errno.EMSGSIZE)
        if self.host is None:
            self._network._bind_datagram(self, _WILDCARDS[self._family], 0)
        source = self._address(self._local_ip(), self._port)
        self._network._send_datagram(self, source, destination, payload)
        return len(payload)

    def unreachable(self) -> None:
        """A datagram of ours found nobody (ICMP port unreachable): a
        connected socket reports it on its next call, as the kernel does."""
        if self.remote is not None:
            self._pending_error = _error(errno.ECONNREFUSED)
            self._arrivals.unpark_all()

    async def wait_writable(self) -> None:
        # A send never blocks: only a pass through the scheduler, as the
        # kernel's poll reports a writable socket at once.
        if self._closed:
            raise trio.ClosedResourceError("the socket was closed")
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise trio.ClosedResourceError("the socket was closed")

    # --------------------------------------------------------------- receiving

    def accepts_from(self, source: Address) -> bool:
        """Whether a datagram from ``source`` is for this socket (a
        connected socket hears only its remote)."""
        return self.remote is None or self.remote == source

    def enqueue(self, arrival: float, payload: bytes, source: Address) -> DatagramFate:
        if self._queued_bytes + len(payload) > self._capacity:
            return "overflow"
        self._sequence += 1
        heapq.heappush(self._queue, (arrival, self._sequence, payload, source))
        self._queued_bytes += len(payload)
        self._arrivals.unpark_all()
        return "delivered"

    def _next_arrival(self) -> float:
        """When the next datagram (or error) is readable: now or earlier if
        one is; infinity if nothing is on its way."""
        if self._pending_error is not None:
            return -math.inf
        return self._queue[0][0] if self._queue else math.inf

    def recvfrom(self, bufsize: int, flags: int = 0) -> tuple[bytes, Address]:
        self._check_open()
        self._raise_pending()
        queue = self._queue
        if not queue or queue[0][0] > trio.current_time():
            raise BlockingIOError(errno.EAGAIN, "no datagram has arrived")
        _arrival, _number, payload, source = heapq.heappop(queue)
        self._queued_bytes -= len(payload)
        if len(payload) > bufsize and not flags & _MSG_TRUNC:
            # Cut short, as the kernel does (with MSG_TRUNC, the stdlib's
            # bytes have the datagram's real length).
            payload = payload[:bufsize]
        return payload, source

    async def wait_readable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the socket was closed")
        if self._next_arrival() <= trio.current_time():
            # Readable already: a pass through the scheduler all the same.
            await trio.lowlevel.checkpoint()
        else:
            while True:
                with trio.move_on_at(self._next_arrival()):
                    await self._arrivals.park()
                if self._closed or self._next_arrival() <= trio.current_time():
                    break
        if self._closed:
            raise trio.ClosedResourceError("the socket was closed")

    def pick_key(self, source: Address) -> int:
        """Which of several sockets sharing a port (reuse_port) takes a
        datagram: always the same one for one sender, as the kernel's hash."""
        return zlib.crc32(repr(source).encode())


class MemoryTrioSocket(trio.socket.SocketType):
    """A :class:`MemoryDatagramSocket` as a trio socket: what ``open_udp``
    binds and connects, ``Datagram.socket`` gives out for options, and
    ``Datagram.send_to`` sends through when the address is a name."""

    def __init__(self, sock: MemoryDatagramSocket) -> None:
        super().__init__()
        self._sock = sock

    def __repr__(self) -> str:
        return repr(self._sock)

    @property
    def family(self) -> socket.AddressFamily:
        return self._sock.family

    @property
    def type(self) -> socket.SocketKind:
        return socket.SOCK_DGRAM

    @property
    def proto(self) -> int:
        return 0

    def fileno(self) -> int:
        return self._sock.fileno()

    def getsockname(self) -> Address:
        return self._sock.getsockname()

    def getpeername(self) -> Address:
        return self._sock.getpeername()

    def setsockopt(self, level: int, optname: int, value: Any, *rest: Any) -> None:
        self._sock.setsockopt(level, optname, value)

    def getsockopt(self, level: int, optname: int, buflen: int | None = None) -> Any:
        return self._sock.getsockopt(level, optname)

    def close(self) -> None:
        self._sock.close()

    async def bind(self, address: Any) -> None:
        await trio.lowlevel.checkpoint()
        self._sock.bind(address)

    async def connect(self, address: Any) -> None:
        await trio.lowlevel.checkpoint()
        self._sock.connect(address)

    async def sendto(self, *args: Any) -> int:
        data, address = args[0], args[-1]
        _check_address(self.family, address, ValueError)
        await trio.lowlevel.checkpoint_if_cancelled()
        sent = self._sock.sendto(data, address)
        await trio.lowlevel.cancel_shielded_checkpoint()
        return sent

    async def send(self, data: Buffer, flags: int = 0, /) -> int:
        await trio.lowlevel.checkpoint_if_cancelled()
        sent = self._sock.send(data)
        await trio.lowlevel.cancel_shielded_checkpoint()
        return sent
