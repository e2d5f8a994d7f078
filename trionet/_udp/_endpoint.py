"""UDP endpoints: :class:`Datagram` and :func:`open_udp`.

How this works
--------------

A :class:`Datagram` owns one bound UDP socket and drives it as a non-blocking
stdlib socket (the fast path described in ``_common``): a receive calls
``recvfrom`` at once and waits for the socket to become readable only
when the kernel has nothing; a send calls ``sendto`` at once and waits only
when the kernel refuses.  Between two waits, receives and sends that did
not wait pass through trio's scheduler once per ``SCHEDULE_EVERY`` (64)
calls, not once per call.  Addresses from ``receive_from`` go back to
``sendto`` as they are; anything that needs a name lookup
(``send_to(data, ("localhost", 9))``) is sent through trio's socket, which
resolves it without blocking.

Every receive reads into one reusable buffer of ``max_size + 1`` bytes, so a
datagram that does not fit in ``max_size`` always shows itself (it fills the
extra byte; on Linux ``MSG_TRUNC`` also tells us its real size) instead of
being cut short.  What happens to it then is the endpoint's ``oversized``
rule: by default it is discarded, counted and logged (at most once per
:data:`OVERSIZED_LOG_INTERVAL` seconds), and the receive goes on to the next
datagram, because an endpoint that is not connected hears from anyone, and
one stranger's datagram must not end the receive loop of everybody else's;
with ``oversized="raise"`` the receive raises :class:`DatagramTooLarge`
instead.  The datagram is copied out of the buffer before anything awaits.
Sends check the size before touching the socket.

Under a simulated network (:func:`trionet.testing.memory_network`),
:func:`open_udp` makes the network's socket instead of the kernel's, and the
endpoint waits with that socket's own waits (``_common.waits_for``, asked
once in the constructor); nothing else differs.

Cancellation.  A receive is cancelled only before its ``recvfrom`` or
while it waits (nothing was taken from the kernel), a send only before its
``sendto`` or while it waits (nothing was sent); a datagram taken or sent is
always returned or counted.  Two FIFO locks, taken only by a caller that has
to wait, keep concurrent callers in order: trio allows one waiter per
direction on a socket.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal, NoReturn, TypeAlias, final

import attrs
import trio

from .._exceptions import CloseReason, ConnectError, ConnectionClosed, DatagramTooLarge
from .._network import current_network
from .._options import port_number
from .._util import format_address
from ._common import (
    DEFAULT_MAX_SIZE,
    RECEIVE_FLAGS,
    Address,
    Pacer,
    Payload,
    UdpSocket,
    WaitLine,
    buffer_size,
    check_argument,
    check_family_max_size,
    checked_payload,
    close_socket,
    datagram_size,
    reported_size,
    sendable_as_is,
    set_buffer_sizes,
    translate,
    waits_for,
)

__all__ = [
    "OVERSIZED_LOG_INTERVAL",
    "Datagram",
    "DatagramStatistics",
    "open_udp",
]

logger = logging.getLogger("trionet")

# Looked up once: these are on the path of every datagram.
_checkpoint_if_cancelled = trio.lowlevel.checkpoint_if_cancelled

#: What an endpoint does with an incoming datagram over ``max_size``.
Oversized: TypeAlias = Literal["discard", "raise"]
#: Seconds between two log messages about discarded oversized datagrams
#: (one endpoint); the datagrams in between are counted in the next message.
OVERSIZED_LOG_INTERVAL = 10.0


@attrs.frozen(kw_only=True)
class DatagramStatistics:
    """A snapshot of a :class:`Datagram` endpoint's counters.

    .. versionadded:: 0.1
    """

    received: int
    """Datagrams returned by a receive."""
    bytes_received: int
    """Bytes in those datagrams."""
    sent: int
    """Datagrams sent."""
    bytes_sent: int
    """Bytes in those datagrams."""
    oversized: int
    """Incoming datagrams over ``max_size``: discarded whole (and logged at
    INFO), or raised as :class:`DatagramTooLarge` with ``oversized="raise"``."""


def _oversized_rule(instance: object, attribute: Any, value: object) -> None:
    if value not in ("discard", "raise"):
        raise ValueError(f"oversized must be 'discard' or 'raise', not {value!r}")


_str_or_none = attrs.validators.optional(attrs.validators.instance_of(str))
_bool = attrs.validators.instance_of(bool)


def _remote(instance: object, attribute: Any, value: object) -> None:
    if value is None:
        return
    if not (isinstance(value, tuple) and len(value) >= 2):
        raise ValueError(f"remote must be a (host, port) tuple, not {value!r}")
    check_argument(port_number, "remote port", value[1])
    if value[1] == 0:
        raise ValueError("remote port must be in 1..65535, not 0")


@final
class Datagram(trio.abc.AsyncResource):
    """A UDP endpoint: one bound socket, optionally connected to one remote.

    Made by :func:`open_udp`.  You may also wrap a bound trio UDP socket
    yourself; the endpoint then owns it and closes it in :meth:`aclose`.

    Every receive and send is a cancel point; one that the kernel can serve
    at once does not wait, and passes through trio's scheduler only every
    64th time (so a busy endpoint never starves other tasks).  A cancelled
    receive has taken no datagram, a cancelled send has sent nothing.

    Concurrent calls are fine: sends and receives each queue in FIFO order.
    After :meth:`aclose` every call raises
    :class:`ConnectionClosed` (:attr:`CloseReason.CLOSED_BY_HOST`).

    Args:
        sock: a bound ``SOCK_DGRAM`` trio socket.
        max_size: the largest datagram sent or received, in bytes.
        oversized: what a receive does with a datagram over ``max_size``:
            ``"discard"`` (the default) drops it, counts it in
            :meth:`statistics` and logs it at INFO, and goes on waiting for
            the next datagram; ``"raise"`` raises :class:`DatagramTooLarge`.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        sock: trio.socket.SocketType,
        *,
        max_size: int = DEFAULT_MAX_SIZE,
        oversized: Oversized = "discard",
    ) -> None:
        self._setup(sock, None, max_size, oversized)

    @classmethod
    def _over(
        cls,
        sock: trio.socket.SocketType,
        raw: UdpSocket,
        max_size: int,
        oversized: Oversized,
    ) -> Datagram:
        """An endpoint over ``raw``, the stdlib (or simulated) socket
        ``sock`` wraps."""
        self = cls.__new__(cls)
        self._setup(sock, raw, max_size, oversized)
        return self

    def _setup(
        self,
        sock: trio.socket.SocketType,
        raw: UdpSocket | None,
        max_size: int,
        oversized: Oversized,
    ) -> None:
        if sock.type != socket.SOCK_DGRAM:
            raise ValueError("Datagram needs a SOCK_DGRAM socket")
        check_argument(datagram_size, "max_size", max_size)
        check_family_max_size(max_size, sock.family)
        check_argument(_oversized_rule, "oversized", oversized)
        if raw is None:
            # A socket of the caller's: drive a duplicate of its descriptor
            # (the same kernel socket); aclose() closes both.
            raw = socket.socket(
                sock.family, sock.type, sock.proto, fileno=os.dup(sock.fileno())
            )
        raw.setblocking(False)
        self._sock = sock
        self._raw = raw
        self._wait_readable, self._wait_writable = waits_for(raw)
        self._family = raw.family
        self._max_size = max_size
        self._raise_oversized = oversized == "raise"
        # Callers that have to wait, in FIFO order.
        self._senders = WaitLine()
        self._receivers = WaitLine()
        self._pacer = Pacer()
        self._last_sender: Address | None = None
        self._closed = False
        self._local_address: Address = raw.getsockname()
        self._remote_address: Address | None
        try:
            self._remote_address = raw.getpeername()
        except OSError:
            self._remote_address = None
        self._received = 0
        self._bytes_received = 0
        self._sent = 0
        self._bytes_sent = 0
        self._oversized = 0
        # Oversized datagrams not yet mentioned in a log message, and when
        # the next message may be written.
        self._oversized_unlogged = 0
        self._oversized_log_after = -float("inf")

    def __repr__(self) -> str:
        remote = ""
        if self._remote_address is not None:
            remote = f" remote={format_address(self._remote_address)}"
        state = " closed" if self._closed else ""
        return (
            f"<trionet.Datagram {format_address(self._local_address)}{remote}{state}>"
        )

    @property
    def local_address(self) -> Address:
        """The address this endpoint is bound to, as ``getsockname()`` gives it."""
        return self._local_address

    @property
    def remote_address(self) -> Address | None:
        """The connected remote address, or ``None`` if not connected."""
        return self._remote_address

    @property
    def max_size(self) -> int:
        """The largest datagram this endpoint sends or accepts, in bytes."""
        return self._max_size

    @property
    def socket(self) -> trio.socket.SocketType:
        """The underlying trio socket, for socket options (e.g. multicast).

        Do not send, receive or close through it.
        """
        return self._sock

    def statistics(self) -> DatagramStatistics:
        """A snapshot of the endpoint's counters."""
        return DatagramStatistics(
            received=self._received,
            bytes_received=self._bytes_received,
            sent=self._sent,
            bytes_sent=self._bytes_sent,
            oversized=self._oversized,
        )

    async def send_to(self, data: Payload, address: Address) -> None:
        """Send one datagram to ``address``.

        ``str`` is sent as UTF-8.

        Raises:
            MessageTooLarge: ``data`` is longer than ``max_size``; nothing was
                sent.
            DatagramError: the OS refused the send (for a broadcast address
                without ``broadcast=True``, or a pending ICMP error).
            ConnectionClosed: the endpoint was closed.
        """
        if type(data) is bytes and len(data) <= self._max_size:
            payload = data
        else:
            payload = checked_payload(data, self._max_size)
        await _checkpoint_if_cancelled()
        # The sender of the last datagram received is the usual case: an
        # address from recvfrom needs no lookup.
        if address is not self._last_sender and not sendable_as_is(
            address, self._family
        ):
            await self._send_resolving(payload, address)
        elif self._senders.count or not self._send_nowait(payload, address, address):
            await self._send_waiting(payload, address, address)
        elif self._pacer.left <= 0:
            await self._pacer.pause()

    async def send(self, data: Payload) -> None:
        """Send one datagram to the connected remote.

        Raises:
            RuntimeError: the endpoint was opened without ``remote``.
            MessageTooLarge: ``data`` is longer than ``max_size``; nothing was
                sent.
            DatagramError: the OS refused the send, e.g. it reports an ICMP
                error caused by an earlier datagram.
            ConnectionClosed: the endpoint was closed.
        """
        remote = self._require_remote("send")
        payload = checked_payload(data, self._max_size)
        await _checkpoint_if_cancelled()
        if self._senders.count or not self._send_nowait(payload, None, remote):
            await self._send_waiting(payload, None, remote)
        elif self._pacer.left <= 0:
            await self._pacer.pause()

    async def _send_waiting(
        self, payload: bytes, to: Address | None, remote: Address
    ) -> None:
        # The slow path: the kernel's buffer is full, or others wait to send.
        # ``to`` (None on a connected endpoint) needs no name lookup;
        # ``remote`` is named in errors.
        try:
            await self._senders.retry(
                self._wait_writable,
                self._raw,
                lambda: self._send_nowait(payload, to, remote) or None,
                self._pacer,
            )
        except trio.ClosedResourceError:
            raise self._closed_error() from None

    def _send_nowait(self, payload: bytes, to: Address | None, remote: Address) -> bool:
        """Hand ``payload`` to the kernel; False if it would block."""
        if self._closed:
            raise self._closed_error()
        try:
            if to is None:
                self._raw.send(payload)
            else:
                self._raw.sendto(payload, to)
        except BlockingIOError:
            return False
        except OSError as exc:
            self._raise_error(exc, "send", remote)
        self._sent += 1
        self._bytes_sent += len(payload)
        self._pacer.left -= 1
        return True

    async def _send_resolving(self, payload: bytes, address: Address) -> None:
        # The slow path for an address that needs a name lookup: trio's
        # socket resolves it without blocking (and refuses a malformed one).
        async with self._senders:
            self._check_open()
            try:
                await self._sock.sendto(payload, address)
            except trio.ClosedResourceError:
                raise self._closed_error() from None
            except OSError as exc:
                self._raise_error(exc, "send", address)
            self._sent += 1
            self._bytes_sent += len(payload)

    async def receive_from(self) -> tuple[bytes, Address]:
        """Wait for one datagram; return it and its sender's address.

        A datagram over ``max_size`` is discarded (counted in
        :meth:`statistics` and logged) and the wait goes on, unless the
        endpoint was opened with ``oversized="raise"``.

        Raises:
            DatagramTooLarge: only with ``oversized="raise"``: the datagram
                was longer than ``max_size``; it was discarded and the
                endpoint stays usable.
            DatagramError: the OS reported a network error, typically an ICMP
                "port unreachable" for an earlier send of a connected endpoint.
            ConnectionClosed: the endpoint was closed.
        """
        await _checkpoint_if_cancelled()
        if not self._receivers.count and (got := self._receive_nowait()) is not None:
            if self._pacer.left <= 0:
                await self._pacer.pause()
            return got
        return await self._receive_waiting()

    async def _receive_waiting(self) -> tuple[bytes, Address]:
        # The slow path: nothing ready, or others wait to receive.
        try:
            return await self._receivers.retry(
                self._wait_readable,
                self._raw,
                self._receive_nowait,
                self._pacer,
            )
        except trio.ClosedResourceError:
            raise self._closed_error() from None

    def _receive_nowait(self) -> tuple[bytes, Address] | None:
        """The next datagram, or None if the kernel has none ready.

        Oversized datagrams are discarded (and the next one read) or raised.
        """
        while True:
            if self._closed:
                raise self._closed_error()
            try:
                data, address = self._raw.recvfrom(self._max_size + 1, RECEIVE_FLAGS)
            except BlockingIOError:
                return None
            except OSError as exc:
                self._raise_error(exc, "receive", self._remote_address)
            size = len(data)
            if size <= self._max_size:
                self._received += 1
                self._bytes_received += size
                self._last_sender = address
                self._pacer.left -= 1
                return data, address
            self._oversized += 1
            error = DatagramTooLarge(address, reported_size(size), self._max_size)
            if self._raise_oversized:
                raise error
            self._log_discarded(error)

    async def receive(self) -> bytes:
        """Wait for one datagram from the connected remote and return it.

        Raises:
            RuntimeError: the endpoint was opened without ``remote``.
            DatagramTooLarge: see :meth:`receive_from`.
            DatagramError: see :meth:`receive_from`.
            ConnectionClosed: the endpoint was closed.
        """
        self._require_remote("receive")
        data, _ = await self.receive_from()
        return data

    def __aiter__(self) -> Datagram:
        return self

    async def __anext__(self) -> tuple[bytes, Address]:
        """``async for data, address in endpoint``: ends when the endpoint is
        closed; raises what :meth:`receive_from` raises otherwise."""
        # receive_from() without a coroutine of its own: this is the loop of
        # every busy endpoint.
        await _checkpoint_if_cancelled()
        try:
            if not self._receivers.count and (got := self._receive_nowait()):
                if self._pacer.left <= 0:
                    await self._pacer.pause()
                return got
            return await self._receive_waiting()
        except ConnectionClosed:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        """Close the socket.  Tasks waiting on it get :class:`ConnectionClosed`."""
        if not self._closed:
            self._closed = True
            close_socket(self._raw)
            self._sock.close()  # a no-op unless it was the caller's socket
        await trio.lowlevel.checkpoint()

    def _log_discarded(self, error: DatagramTooLarge) -> None:
        self._oversized_unlogged += 1
        now = trio.current_time()
        if now < self._oversized_log_after:
            return
        logger.info(
            "%s (%s: %d oversized datagram(s) discarded since the last report)",
            error,
            self,
            self._oversized_unlogged,
        )
        self._oversized_unlogged = 0
        self._oversized_log_after = now + OVERSIZED_LOG_INTERVAL

    def _raise_error(
        self, exc: OSError, action: str, address: Address | None
    ) -> NoReturn:
        """The one place an OS error of this endpoint becomes what callers
        see: the close it was caused by, or a :class:`DatagramError`."""
        if self._closed:
            raise self._closed_error() from None
        raise translate(exc, action, address) from exc

    def _check_open(self) -> None:
        if self._closed:
            raise self._closed_error()

    def _closed_error(self) -> ConnectionClosed:
        return ConnectionClosed(
            CloseReason.CLOSED_BY_HOST, "the UDP endpoint is closed"
        )

    def _require_remote(self, action: str) -> Address:
        if self._remote_address is None:
            instead = "send_to" if action == "send" else "receive_from"
            raise RuntimeError(
                f"{action}() needs an endpoint opened with remote=(host, port); "
                f"use {instead}() instead"
            )
        return self._remote_address


@asynccontextmanager
async def open_udp(
    *,
    local_host: str | None = None,
    local_port: int = 0,
    remote: tuple[str, int] | None = None,
    broadcast: bool = False,
    max_size: int = DEFAULT_MAX_SIZE,
    oversized: Oversized = "discard",
    so_rcvbuf: int | None = None,
    so_sndbuf: int | None = None,
) -> AsyncIterator[Datagram]:
    """Open a UDP endpoint; close it when the block ends.

    The endpoint is bound to ``local_host`` and ``local_port`` on this side,
    and, with ``remote``, connected to that address on the other side.  The
    address family follows the addresses: ``local_host=None`` binds the
    wildcard address of ``remote``'s family (IPv4 when there is no remote),
    ``local_host="::1"`` makes an IPv6 endpoint.

    Example::

        async with trionet.open_udp(local_host="127.0.0.1") as endpoint:
            await endpoint.send_to(b"ping", ("127.0.0.1", 9999))
            data, address = await endpoint.receive_from()

        async with trionet.open_udp(remote=("127.0.0.1", 9999)) as endpoint:
            await endpoint.send(b"ping")
            data = await endpoint.receive()

    Args:
        local_host: the local address to bind; ``None`` (the default) is the
            wildcard address (every interface) of the endpoint's family.
        local_port: the local port; 0 (the default) picks a free one.
        remote: connect to this ``(host, port)``: enables
            :meth:`~Datagram.send` and :meth:`~Datagram.receive`, makes the
            OS drop datagrams from anyone else, and lets ICMP errors be
            reported.  It must be of the same address family as
            ``local_host``.
        broadcast: set ``SO_BROADCAST`` so sends to broadcast addresses work
            (IPv4 only).
        max_size: the largest datagram sent or received, in bytes: at most
            65507 for IPv4 and 65527 for IPv6.
        oversized: ``"discard"`` (the default) or ``"raise"``: see
            :class:`Datagram`.
        so_rcvbuf: the kernel's receive buffer (``SO_RCVBUF``) in bytes;
            None (the default) keeps the system default (about 200 KiB on
            Linux).  Datagrams that arrive while it is full are dropped by
            the kernel, so an endpoint that takes bursts wants a larger one
            (Linux caps it at ``net.core.rmem_max`` and reports twice the
            value asked for).
        so_sndbuf: the kernel's send buffer (``SO_SNDBUF``) in bytes; None
            keeps the system default.

    Raises:
        ValueError: an option is out of range.
        TypeError: an option has the wrong type.
        OSError: binding failed (for example the port is in use).
        ConnectError: connecting to ``remote`` failed, for example because
            it is of another address family than ``local_host``.

    .. versionadded:: 0.1
    """
    check_argument(_str_or_none, "local_host", local_host)
    check_argument(port_number, "local_port", local_port)
    check_argument(_remote, "remote", remote)
    check_argument(_bool, "broadcast", broadcast)
    check_argument(datagram_size, "max_size", max_size)
    check_argument(_oversized_rule, "oversized", oversized)
    check_argument(buffer_size, "so_rcvbuf", so_rcvbuf)
    check_argument(buffer_size, "so_sndbuf", so_sndbuf)
    endpoint = await _open_datagram(
        local_host,
        local_port,
        remote,
        broadcast,
        max_size,
        oversized,
        so_sndbuf,
        so_rcvbuf,
    )
    async with endpoint:
        yield endpoint


async def _open_datagram(
    host: str | None,
    port: int,
    remote: tuple[str, int] | None,
    broadcast: bool,
    max_size: int,
    oversized: Oversized,
    so_sndbuf: int | None,
    so_rcvbuf: int | None,
) -> Datagram:
    # (Under a simulated network: its names and its sockets.)
    network = current_network()
    getaddrinfo = trio.socket.getaddrinfo if network is None else network.getaddrinfo
    if host is None and remote is None:
        host = "0.0.0.0"
    elif host is None and remote is not None:
        # The wildcard address of the remote's family.
        try:
            infos = await getaddrinfo(remote[0], remote[1], type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise ConnectError(
                CloseReason.ERROR,
                f"could not resolve the UDP remote {format_address(remote)}: {exc}",
            ) from exc
        host = "::" if infos[0][0] == socket.AF_INET6 else "0.0.0.0"
    infos = await getaddrinfo(
        host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE
    )
    family, type_, proto, _, sockaddr = infos[0]
    check_family_max_size(max_size, family)
    if broadcast and family != socket.AF_INET:
        raise ValueError(
            "broadcast=True needs an IPv4 local_host: IPv6 has no broadcast"
        )
    raw: UdpSocket
    if network is None:
        raw = socket.socket(family, type_, proto)
    else:
        raw = network.udp_socket(family)
    try:
        raw.setblocking(False)
        if broadcast:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        set_buffer_sizes(raw, so_sndbuf, so_rcvbuf)
        # trio's wrapper (the same socket object underneath) connects without
        # blocking on a name lookup, and is what Datagram.socket gives out.
        sock = (
            trio.socket.from_stdlib_socket(raw)
            if isinstance(raw, socket.socket)
            else raw.trio_socket()
        )
        await sock.bind(sockaddr)
        if remote is not None:
            try:
                await sock.connect(remote)
            except OSError as exc:
                raise ConnectError(
                    CloseReason.ERROR,
                    f"could not connect the UDP endpoint to "
                    f"{format_address(remote)}: {exc} "
                    "(local_host and remote must be of the same address family)",
                ) from exc
        return Datagram._over(sock, raw, max_size, oversized)
    except BaseException:
        raw.close()
        raise
