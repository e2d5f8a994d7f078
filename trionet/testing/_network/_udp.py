"""Datagram sockets of a memory network.

How this works
--------------
A :class:`MemoryDatagramSocket` is a :class:`trio.socket.SocketType`, so
trionet's UDP code drives it exactly as it drives a trio UDP socket: ``bind``,
``connect``, ``sendto``/``send`` and ``recvfrom_into`` (with ``MSG_TRUNC``, a
receive reports a datagram's real size, as Linux does, so ``max_size`` and
oversized datagrams behave as on the kernel).

A send decides the datagram's fate at once, in a fixed order of random
draws on its link's own generator: dropped if either host is down or the
link is partitioned, then lost (``loss``), then duplicated
(``duplicate``); each copy gets its arrival time (latency, jitter,
bandwidth) and perhaps an extra ``reorder_delay`` (``reorder``), and is
queued at the socket bound to the destination -- unless that socket's
buffer (``buffer_size`` bytes) is full, as a kernel drops what does not fit.
Nothing runs in the background: a receiver takes the earliest datagram whose
time has come, and otherwise sleeps until then.  A datagram to a port
nobody listens on is dropped, and a *connected* sender is told, as by ICMP:
its next receive or send raises :class:`ConnectionRefusedError`.
"""

from __future__ import annotations

import builtins
import errno
import heapq
import math
import socket
import zlib
from collections.abc import Awaitable
from types import TracebackType
from typing import TYPE_CHECKING, Any

import trio

from ..._transport import Address
from ._records import DatagramFate
from ._stream import _error

if TYPE_CHECKING:
    from typing_extensions import Buffer, Self

    from ._hosts import Host
    from ._sockets import SocketCalls

__all__ = ["MemoryDatagramSocket"]

#: What ``fileno()`` gives for an open memory socket: no descriptor exists.
PSEUDO_DESCRIPTOR = 0x7FFFFFFF
#: The largest datagram an IPv4 and an IPv6 socket send, as on the kernel.
_MAX_PAYLOAD = {socket.AF_INET: 65507, socket.AF_INET6: 65527}
_WILDCARDS = {socket.AF_INET: "0.0.0.0", socket.AF_INET6: "::"}
#: Broadcast addresses: refused without SO_BROADCAST.  With it, the loopback
#: broadcast address reaches the sockets bound to it, and the others are
#: unreachable (the memory network reaches no other machine).
_BROADCAST = ("255.255.255.255", "<broadcast>", "127.255.255.255")


class MemoryDatagramSocket(trio.socket.SocketType):
    """A UDP socket of a memory network (see the top of this module)."""

    def __init__(self, network: SocketCalls, family: socket.AddressFamily) -> None:
        super().__init__()
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

    def __repr__(self) -> str:
        from ..._util import format_address

        return (
            f"<trionet.testing memory UDP socket {format_address(self.getsockname())}>"
        )

    # ------------------------------------------------------------ the basics

    @property
    def family(self) -> socket.AddressFamily:
        return self._family

    @property
    def type(self) -> socket.SocketKind:
        return socket.SOCK_DGRAM

    @property
    def proto(self) -> int:
        return 0

    def fileno(self) -> int:
        return -1 if self._closed else PSEUDO_DESCRIPTOR

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

    def setsockopt(self, level: int, optname: int, value: Any, *rest: Any) -> None:
        self._options[(level, optname)] = value

    def getsockopt(self, level: int, optname: int, buflen: int | None = None) -> Any:
        return self._options.get((level, optname), 0)

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

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: builtins.type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise _error(errno.EBADF)

    def _raise_pending(self) -> None:
        error, self._pending_error = self._pending_error, None
        if error is not None:
            raise error

    # ------------------------------------------------------ binding, connecting

    async def bind(self, address: Any) -> None:
        await trio.lowlevel.checkpoint()
        self._check_open()
        if self.host is not None:
            raise _error(errno.EINVAL, "already bound")
        self._network._bind_datagram(self, str(address[0]), int(address[1]))

    def bound(self, host: Host, ip: str, port: int) -> None:
        """Called by the network once it has registered the socket."""
        self.host, self.bound_ip, self._port = host, ip, port

    async def connect(self, address: Any) -> None:
        await trio.lowlevel.checkpoint()
        self._check_open()
        ip = self._network._datagram_destination(self._family, str(address[0]))
        if self.host is None:
            self._network._bind_datagram(self, _WILDCARDS[self._family], 0)
        self.remote = self._address(ip, int(address[1]))

    # ---------------------------------------------------------------- sending

    def send(self, data: Buffer, flags: int = 0, /) -> Awaitable[int]:
        return self._send(data, None)

    async def sendto(self, *args: Any) -> int:
        data, address = args[0], args[-1]
        return await self._send(data, address)

    async def _send(self, data: Buffer, address: Any | None) -> int:
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_open()
        self._raise_pending()
        payload = bytes(data)
        if address is None:
            if self.remote is None:
                raise _error(errno.EDESTADDRREQ)
            destination = self.remote
        else:
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
        await trio.lowlevel.cancel_shielded_checkpoint()
        return len(payload)

    def unreachable(self) -> None:
        """A datagram of ours found nobody (ICMP port unreachable): a
        connected socket reports it on its next call, as the kernel does."""
        if self.remote is not None:
            self._pending_error = _error(errno.ECONNREFUSED)
            self._arrivals.unpark_all()

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

    async def recvfrom_into(
        self, buffer: Buffer, nbytes: int = 0, flags: int = 0
    ) -> tuple[int, Address]:
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            if self._closed:
                raise trio.ClosedResourceError("the socket was closed")
            self._raise_pending()
            queue = self._queue
            wake = math.inf
            if queue:
                now = trio.current_time()
                if queue[0][0] <= now:
                    _arrival, _number, payload, source = heapq.heappop(queue)
                    self._queued_bytes -= len(payload)
                    view = memoryview(buffer).cast("B")
                    size = min(len(payload), nbytes or len(view))
                    view[:size] = payload[:size]
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    truncated = flags & getattr(socket, "MSG_TRUNC", 0)
                    return (len(payload) if truncated else size), source
                wake = queue[0][0]
            with trio.move_on_at(wake):
                await self._arrivals.park()

    def pick_key(self, source: Address) -> int:
        """Which of several sockets sharing a port (reuse_port) takes a
        datagram: always the same one for one sender, as the kernel's hash."""
        return zlib.crc32(repr(source).encode())
