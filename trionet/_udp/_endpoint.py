"""UDP endpoints: :class:`Datagram` and :func:`open_udp`.

How this works
--------------

A :class:`Datagram` wraps one bound trio UDP socket.  Every receive reads into
one reusable buffer of ``max_size + 1`` bytes, so a datagram that does not fit
in ``max_size`` always shows itself (it fills the extra byte; on Linux
``MSG_TRUNC`` also tells us its real size) instead of being cut short.  What
happens to it then is the endpoint's ``oversized`` rule: by default it is
discarded, counted and logged (at most once per :data:`OVERSIZED_LOG_INTERVAL`
seconds), and the receive goes on to the next datagram, because an endpoint
that is not connected hears from anyone, and one stranger's datagram must not
end the receive loop of everybody else's; with ``oversized="raise"`` the
receive raises :class:`DatagramTooLarge` instead.  Sends check the size
before touching the socket.  Two locks keep concurrent callers in FIFO order:
trio allows one waiter per direction on a socket, and the receive buffer is
shared.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal, TypeAlias, final

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
    Payload,
    check_argument,
    check_family_max_size,
    checked_payload,
    datagram_size,
    reported_size,
    translate,
)

__all__ = ["OVERSIZED_LOG_INTERVAL", "Datagram", "DatagramStatistics", "open_udp"]

logger = logging.getLogger("trionet")

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
        if sock.type != socket.SOCK_DGRAM:
            raise ValueError("Datagram needs a SOCK_DGRAM socket")
        check_argument(datagram_size, "max_size", max_size)
        check_family_max_size(max_size, sock.family)
        check_argument(_oversized_rule, "oversized", oversized)
        self._sock = sock
        self._max_size = max_size
        self._raise_oversized = oversized == "raise"
        self._buffer = bytearray(max_size + 1)
        self._send_lock = trio.Lock()
        self._receive_lock = trio.Lock()
        self._closed = False
        self._local_address: Address = sock.getsockname()
        self._remote_address: Address | None
        try:
            self._remote_address = sock.getpeername()
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
        await self._send(checked_payload(data, self._max_size), address, address)

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
        await self._send(checked_payload(data, self._max_size), None, remote)

    async def _send(self, payload: bytes, to: Address | None, remote: Address) -> None:
        # ``to`` is None on a connected endpoint; ``remote`` is named in errors.
        async with self._send_lock:
            self._check_open()
            try:
                if to is None:
                    await self._sock.send(payload)
                else:
                    await self._sock.sendto(payload, to)
            except trio.ClosedResourceError:
                raise self._closed_error() from None
            except OSError as exc:
                raise translate(exc, "send", remote) from exc
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
        async with self._receive_lock:
            while True:
                self._check_open()
                try:
                    nbytes, address = await self._sock.recvfrom_into(
                        self._buffer, 0, RECEIVE_FLAGS
                    )
                except trio.ClosedResourceError:
                    raise self._closed_error() from None
                except OSError as exc:
                    if self._closed:
                        raise self._closed_error() from None
                    raise translate(exc, "receive", self._remote_address) from exc
                if nbytes <= self._max_size:
                    self._received += 1
                    self._bytes_received += nbytes
                    return bytes(memoryview(self._buffer)[:nbytes]), address
                self._oversized += 1
                error = DatagramTooLarge(address, reported_size(nbytes), self._max_size)
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
        try:
            return await self.receive_from()
        except ConnectionClosed:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        """Close the socket.  Tasks waiting on it get :class:`ConnectionClosed`."""
        if not self._closed:
            self._closed = True
            self._sock.close()
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
    endpoint = await _open_datagram(
        local_host, local_port, remote, broadcast, max_size, oversized
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
) -> Datagram:
    # (Under a simulated network, its names and its sockets.)
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
    if network is None:
        sock = trio.socket.socket(family, type_, proto)
    else:
        sock = network.udp_socket(family)
    try:
        if broadcast:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
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
        return Datagram(sock, max_size=max_size, oversized=oversized)
    except BaseException:
        sock.close()
        raise
