"""UDP: datagram endpoints, and a server that runs one task per remote peer.

How this works
--------------

:class:`Datagram` wraps one bound trio UDP socket.  Every receive reads into
one reusable buffer of ``max_size + 1`` bytes, so a datagram that does not fit
in ``max_size`` always shows itself (it fills the extra byte; on Linux
``MSG_TRUNC`` also tells us its real size) and is reported as
:class:`DatagramTooLarge` instead of being cut short.  Sends check the size
before touching the socket.  Two locks keep concurrent callers in FIFO order:
trio allows one waiter per direction on a socket, and the receive buffer is
shared.

:func:`serve_udp` binds one socket per address family and runs one *reader*
task per socket.  The reader never waits for a handler: it looks the sender's
address up in a dict of :class:`UdpPeer` objects and hands the datagram to
that peer's bounded memory channel with ``send_nowait``.  A full channel means
that peer's handler is behind, so the datagram is dropped and counted, as the
network itself would drop it.  An unknown address starts a new handler task,
unless ``max_peers`` handlers are already running (then the datagram is
refused and counted).  Each handler reads its own channel, so it sees its
peer's datagrams in arrival order, and a slow handler only ever delays itself.

A peer records one :class:`CloseReason`, the first that happens: idle timeout
(checked by :meth:`UdpPeer.receive`), :meth:`UdpPeer.aclose`, the handler
raising or returning, or the server shutting down.  A closed peer is forgotten
at once, so the next datagram from its address starts a fresh handler.
"""

from __future__ import annotations

import errno
import logging
import math
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeAlias, final

import attrs
import trio

from ._codec import as_bytes
from ._exceptions import (
    CloseReason,
    ConnectError,
    ConnectionClosed,
    MessageTooLarge,
    TrionetError,
)
from ._listeners import bind_sockets, reuse_port_option
from ._util import format_address as _format_address
from ._util import server_in_block

__all__ = [
    "Datagram",
    "DatagramError",
    "DatagramTooLarge",
    "UdpPeer",
    "UdpServer",
    "UdpServerStats",
    "open_udp",
    "open_udp_server",
    "serve_udp",
]

logger = logging.getLogger("trionet")

#: An address as the socket module gives it: ``(host, port)`` for IPv4,
#: ``(host, port, flowinfo, scope_id)`` for IPv6.
Address: TypeAlias = tuple[Any, ...]
_Payload: TypeAlias = bytes | bytearray | memoryview | str
UdpHandler: TypeAlias = Callable[["UdpPeer"], Awaitable[object]]

#: Largest UDP payload over IPv4 (65535 - 20 byte IP header - 8 byte UDP header).
IPV4_MAX_PAYLOAD = 65507
#: Largest UDP payload over IPv6 without jumbograms (65535 - 8 byte UDP header).
IPV6_MAX_PAYLOAD = 65527
DEFAULT_QUEUE_SIZE = 256
DEFAULT_MAX_PEERS = 1024

# With MSG_TRUNC, Linux returns a datagram's real length even when the buffer
# was too small, so an oversized datagram can be reported with its size.
if sys.platform.startswith("linux"):
    _RECEIVE_FLAGS = socket.MSG_TRUNC
else:
    _RECEIVE_FLAGS = 0

# Errors a receive on an unconnected socket may report for an earlier send
# (ICMP port/host unreachable, and Windows' WSAECONNRESET).  The server's
# readers count them and keep reading.
_ICMP_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.EMSGSIZE,
    }
)


class DatagramTooLarge(MessageTooLarge):
    """An incoming datagram was larger than the endpoint's ``max_size``.

    The datagram was discarded whole, never truncated; the endpoint stays
    usable and the next receive returns the next datagram.

    Attributes:
        address (tuple | None): who sent it.
        size (int | None): its size in bytes where the OS reports it (Linux),
            else ``None`` (it was at least ``max_size + 1`` bytes).
        max_size (int): the limit it broke.

    .. versionadded:: 0.1
    """

    def __init__(
        self, address: Address | None, size: int | None, max_size: int
    ) -> None:
        self.address = address
        self.size = size
        self.max_size = max_size
        amount = f"{size} bytes" if size is not None else f"more than {max_size} bytes"
        sender = (
            _format_address(address) if address is not None else "an unknown sender"
        )
        super().__init__(
            f"discarded a datagram of {amount} from {sender}: max_size is {max_size}"
        )


class DatagramError(TrionetError, OSError):
    """The operating system reported a network error for a datagram.

    Most often this is an ICMP error for an earlier send: "port unreachable"
    (``errno`` is ``ECONNREFUSED``) when nothing listens at the remote address
    of a connected endpoint.  UDP has no connection to lose, so this is not a
    :class:`ConnectionClosed`: the endpoint stays open and the error is
    reported once.  The original :class:`OSError` is the ``__cause__`` and its
    ``errno`` is copied.

    Attributes:
        address (tuple | None): the remote address the error concerns, where
            known.

    .. versionadded:: 0.1
    """

    def __init__(
        self, errno: int | None, message: str, address: Address | None = None
    ) -> None:
        self.address = address
        if errno is None:
            super().__init__(message)
        else:
            super().__init__(errno, message)


_Item: TypeAlias = bytes | DatagramTooLarge


@attrs.frozen(kw_only=True)
class UdpServerStats:
    """A snapshot of a :class:`UdpServer`'s counters.

    .. versionadded:: 0.1
    """

    received: int
    """Datagrams read from the server's sockets."""
    dropped: int
    """Datagrams discarded because their peer's queue was full, or still
    queued when their peer closed."""
    peers_rejected: int
    """Datagrams from new peers refused because ``max_peers`` handlers were
    running."""
    oversized: int
    """Datagrams larger than ``max_size`` (each reported to its peer's handler
    as :class:`DatagramTooLarge`)."""
    receive_errors: int
    """Network errors (such as ICMP reports) the readers counted and read past."""
    peers_started: int
    """Handler tasks started, in total."""
    handler_errors: int
    """Handlers that ended by raising an exception."""
    open_peers: int
    """Peers open right now."""


class _ServerSocket:
    """One bound socket of a server, with its send lock."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.local_address: Address = sock.getsockname()
        self.send_lock = trio.Lock()


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

    .. versionadded:: 0.1
    """

    def __init__(
        self, sock: trio.socket.SocketType, *, max_size: int = IPV4_MAX_PAYLOAD
    ) -> None:
        if sock.type != socket.SOCK_DGRAM:
            raise ValueError("Datagram needs a SOCK_DGRAM socket")
        _check_max_size(max_size, sock.family)
        self._sock = sock
        self._max_size = max_size
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

    def __repr__(self) -> str:
        remote = ""
        if self._remote_address is not None:
            remote = f" remote={_format_address(self._remote_address)}"
        state = " closed" if self._closed else ""
        return (
            f"<trionet.Datagram {_format_address(self._local_address)}{remote}{state}>"
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

    async def send_to(self, data: _Payload, address: Address) -> None:
        """Send one datagram to ``address``.

        ``str`` is sent as UTF-8.

        Raises:
            MessageTooLarge: ``data`` is longer than ``max_size``; nothing was
                sent.
            DatagramError: the OS refused the send (for a broadcast address
                without ``broadcast=True``, or a pending ICMP error).
            ConnectionClosed: the endpoint was closed.
        """
        payload = _checked_payload(data, self._max_size)
        async with self._send_lock:
            self._check_open()
            try:
                await self._sock.sendto(payload, address)
            except trio.ClosedResourceError:
                raise self._closed_error() from None
            except OSError as exc:
                raise _translate(exc, "send", address) from exc

    async def send(self, data: _Payload) -> None:
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
        payload = _checked_payload(data, self._max_size)
        async with self._send_lock:
            self._check_open()
            try:
                await self._sock.send(payload)
            except trio.ClosedResourceError:
                raise self._closed_error() from None
            except OSError as exc:
                raise _translate(exc, "send", remote) from exc

    async def receive_from(self) -> tuple[bytes, Address]:
        """Wait for one datagram; return it and its sender's address.

        Raises:
            DatagramTooLarge: the datagram was longer than ``max_size``; it was
                discarded and the endpoint stays usable.
            DatagramError: the OS reported a network error, typically an ICMP
                "port unreachable" for an earlier send of a connected endpoint.
            ConnectionClosed: the endpoint was closed.
        """
        async with self._receive_lock:
            self._check_open()
            try:
                nbytes, address = await self._sock.recvfrom_into(
                    self._buffer, 0, _RECEIVE_FLAGS
                )
            except trio.ClosedResourceError:
                raise self._closed_error() from None
            except OSError as exc:
                if self._closed:
                    raise self._closed_error() from None
                raise _translate(exc, "receive", self._remote_address) from exc
            if nbytes > self._max_size:
                raise DatagramTooLarge(address, _reported_size(nbytes), self._max_size)
            return bytes(memoryview(self._buffer)[:nbytes]), address

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
        """``async for data, address in endpoint``: ends when the endpoint is closed."""
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
    host: str | None = "127.0.0.1",
    port: int = 0,
    *,
    broadcast: bool = False,
    remote: tuple[str, int] | None = None,
    max_size: int = IPV4_MAX_PAYLOAD,
) -> AsyncIterator[Datagram]:
    """Open a UDP endpoint bound to ``host`` and ``port``; close it on exit.

    The address family is the first one ``getaddrinfo(host)`` gives, so
    ``host="::1"`` makes an IPv6 endpoint; ``host=None`` binds the wildcard
    address.  ``remote`` must be of the same family.

    Example::

        async with trionet.open_udp() as endpoint:
            await endpoint.send_to(b"ping", ("127.0.0.1", 9999))
            data, address = await endpoint.receive_from()

    Args:
        host: the local address to bind.
        port: the local port; 0 picks a free one.
        broadcast: set ``SO_BROADCAST`` so sends to broadcast addresses work
            (IPv4 only).
        remote: connect to this ``(host, port)``: enables :meth:`~Datagram.send`
            and :meth:`~Datagram.receive`, makes the OS drop datagrams from
            anyone else, and lets ICMP errors be reported.
        max_size: the largest datagram sent or received, in bytes: at most
            65507 for IPv4 and 65527 for IPv6.

    Raises:
        ValueError: an option is out of range.
        OSError: binding failed (for example the port is in use).
        ConnectError: connecting to ``remote`` failed.

    .. versionadded:: 0.1
    """
    endpoint = await _open_datagram(host, port, broadcast, remote, max_size)
    async with endpoint:
        yield endpoint


async def _open_datagram(
    host: str | None,
    port: int,
    broadcast: bool,
    remote: tuple[str, int] | None,
    max_size: int,
) -> Datagram:
    if host is not None and not isinstance(host, str):
        raise TypeError(f"host must be a str or None, not {type(host).__name__}")
    _check_port(port, "port", allow_zero=True)
    if not isinstance(broadcast, bool):
        raise TypeError("broadcast must be True or False")
    if remote is not None:
        if not (isinstance(remote, tuple) and len(remote) >= 2):
            raise ValueError(f"remote must be a (host, port) tuple, not {remote!r}")
        _check_port(remote[1], "remote port", allow_zero=False)
    _check_max_size(max_size, None)

    infos = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE
    )
    family, type_, proto, _, sockaddr = infos[0]
    _check_max_size(max_size, family)
    if broadcast and family != socket.AF_INET:
        raise ValueError("broadcast=True needs an IPv4 host: IPv6 has no broadcast")
    sock = trio.socket.socket(family, type_, proto)
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
                    f"could not connect the UDP endpoint to {remote!r}: {exc} "
                    "(host and remote must be of the same address family)",
                ) from exc
        return Datagram(sock, max_size=max_size)
    except BaseException:
        sock.close()
        raise


@final
class UdpPeer:
    """One remote address talking to a :func:`serve_udp` server.

    The server makes one per remote address and passes it to the handler.
    Datagrams come out of :meth:`receive` (or ``async for data in peer``) in
    the order they arrived.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        server: UdpServer,
        endpoint: _ServerSocket,
        address: Address,
    ) -> None:
        self._server = server
        self._endpoint = endpoint
        self._address = address
        self._send_channel, self._receive_channel = trio.open_memory_channel[_Item](
            server.queue_size
        )
        self._close_reason: CloseReason | None = None
        self._last_arrival = trio.current_time()

    def __repr__(self) -> str:
        state = "open" if self._close_reason is None else self._close_reason.value
        return f"<trionet.UdpPeer {_format_address(self._address)} {state}>"

    @property
    def remote_address(self) -> Address:
        """The peer's address, as ``recvfrom`` gives it."""
        return self._address

    @property
    def local_address(self) -> Address:
        """The server address the peer sends to."""
        return self._endpoint.local_address

    @property
    def close_reason(self) -> CloseReason | None:
        """Why the peer was closed, or ``None`` while it is open."""
        return self._close_reason

    async def receive(self) -> bytes:
        """Wait for the peer's next datagram and return it.

        Raises:
            ConnectionClosed: with :attr:`CloseReason.TIMEOUT` when no datagram
                arrived from the peer for ``idle_timeout`` seconds (the peer is
                then closed); with :attr:`~CloseReason.SHUTDOWN` when the server
                stopped; with the peer's close reason once it is closed.
            DatagramTooLarge: the peer sent a datagram over ``max_size``, at this
                point in its sequence; the peer stays open.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._close_reason is not None:
            raise ConnectionClosed(self._close_reason)
        try:
            item = self._receive_channel.receive_nowait()
        except trio.WouldBlock:
            item = await self._wait_for_datagram()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise self._closed_error() from None
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
        if isinstance(item, DatagramTooLarge):
            raise item
        return item

    async def _wait_for_datagram(self) -> _Item:
        idle_timeout = self._server.idle_timeout
        deadline = (
            math.inf if idle_timeout is None else self._last_arrival + idle_timeout
        )
        try:
            with trio.move_on_at(deadline):
                return await self._receive_channel.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise self._closed_error() from None
        if self._close_reason is not None:
            raise self._closed_error()
        self._server._close_peer(self, CloseReason.TIMEOUT)
        raise ConnectionClosed(
            CloseReason.TIMEOUT,
            f"no datagram from {_format_address(self._address)} "
            f"for {idle_timeout} seconds",
        )

    async def send(self, data: _Payload) -> None:
        """Send one datagram to the peer (``str`` as UTF-8).

        Raises:
            MessageTooLarge: ``data`` is longer than ``max_size``; nothing was
                sent.
            DatagramError: the OS refused the send.
            ConnectionClosed: the peer is closed (see :attr:`close_reason`).
        """
        payload = _checked_payload(data, self._server.max_size)
        endpoint = self._endpoint
        async with endpoint.send_lock:
            if self._close_reason is not None:
                raise ConnectionClosed(self._close_reason)
            try:
                await endpoint.sock.sendto(payload, self._address)
            except trio.ClosedResourceError:
                raise self._closed_error() from None
            except OSError as exc:
                if self._close_reason is not None:
                    raise self._closed_error() from None
                raise _translate(exc, "send", self._address) from exc

    def __aiter__(self) -> UdpPeer:
        return self

    async def __anext__(self) -> bytes:
        """``async for data in peer``: raises what :meth:`receive` raises.

        The loop ends quietly only after :meth:`aclose`; an idle timeout or a
        server shutdown raises :class:`ConnectionClosed`.
        """
        try:
            return await self.receive()
        except ConnectionClosed as exc:
            if exc.reason is CloseReason.CLOSED_BY_HOST:
                raise StopAsyncIteration from None
            raise

    async def aclose(self) -> None:
        """Close the peer (:attr:`CloseReason.CLOSED_BY_HOST`) and forget it.

        Queued datagrams are dropped; the next datagram from the address
        starts a new handler.  The handler itself keeps running until it
        returns.
        """
        self._server._close_peer(self, CloseReason.CLOSED_BY_HOST)
        await trio.lowlevel.checkpoint()

    def _closed_error(self) -> ConnectionClosed:
        return ConnectionClosed(self._close_reason or CloseReason.SHUTDOWN)


@final
class UdpServer:
    """A running :func:`serve_udp` server.

    Made by :func:`serve_udp` (its ``task_status.started`` value) and
    :func:`open_udp_server`.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        sockets: list[_ServerSocket],
        handler: UdpHandler,
        *,
        idle_timeout: float | None,
        queue_size: int,
        max_peers: int,
        max_size: int,
    ) -> None:
        self._sockets = sockets
        self._handler = handler
        self._idle_timeout = idle_timeout
        self._queue_size = queue_size
        self._max_peers = max_peers
        self._max_size = max_size
        self._peers: dict[Address, UdpPeer] = {}
        self._running_handlers = 0
        self._closed = False
        self._cancel_scope: trio.CancelScope | None = None
        self._handler_nursery: trio.Nursery | None = None
        self._received = 0
        self._dropped = 0
        self._peers_rejected = 0
        self._oversized = 0
        self._receive_errors = 0
        self._peers_started = 0
        self._handler_errors = 0

    def __repr__(self) -> str:
        where = ", ".join(_format_address(a) for a in self.addresses)
        return f"<trionet.UdpServer {where} peers={len(self._peers)}>"

    @property
    def port(self) -> int:
        """The UDP port; every socket of the server is bound to it."""
        port: int = self._sockets[0].local_address[1]
        return port

    @property
    def addresses(self) -> tuple[Address, ...]:
        """The local address of each socket, one per address family."""
        return tuple(s.local_address for s in self._sockets)

    @property
    def peers(self) -> tuple[UdpPeer, ...]:
        """A snapshot of the open peers."""
        return tuple(self._peers.values())

    @property
    def stats(self) -> UdpServerStats:
        """A snapshot of the counters."""
        return UdpServerStats(
            received=self._received,
            dropped=self._dropped,
            peers_rejected=self._peers_rejected,
            oversized=self._oversized,
            receive_errors=self._receive_errors,
            peers_started=self._peers_started,
            handler_errors=self._handler_errors,
            open_peers=len(self._peers),
        )

    @property
    def idle_timeout(self) -> float | None:
        """Seconds without a datagram after which a peer's receive times out."""
        return self._idle_timeout

    @property
    def queue_size(self) -> int:
        """Datagrams buffered per peer before more are dropped."""
        return self._queue_size

    @property
    def max_peers(self) -> int:
        """Most handlers running at once."""
        return self._max_peers

    @property
    def max_size(self) -> int:
        """The largest datagram accepted or sent, in bytes."""
        return self._max_size

    async def aclose(self) -> None:
        """Stop the server: close its sockets, close every peer with
        :attr:`CloseReason.SHUTDOWN` and cancel the handlers it runs.

        :func:`serve_udp` returns once they have finished.
        """
        self._shutdown()
        await trio.lowlevel.checkpoint()

    def _shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for endpoint in self._sockets:
            endpoint.sock.close()
        for peer in list(self._peers.values()):
            self._close_peer(peer, CloseReason.SHUTDOWN)
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

    async def _read(self, endpoint: _ServerSocket) -> None:
        buffer = bytearray(self._max_size + 1)
        view = memoryview(buffer)
        while True:
            try:
                nbytes, address = await endpoint.sock.recvfrom_into(
                    buffer, 0, _RECEIVE_FLAGS
                )
            except trio.ClosedResourceError:
                return
            except OSError as exc:
                if self._closed:
                    return
                if exc.errno in _ICMP_ERRNOS:
                    self._receive_errors += 1
                    continue
                raise
            self._received += 1
            item: _Item
            if nbytes > self._max_size:
                self._oversized += 1
                item = DatagramTooLarge(address, _reported_size(nbytes), self._max_size)
            else:
                item = bytes(view[:nbytes])
            self._dispatch(endpoint, address, item)

    def _dispatch(self, endpoint: _ServerSocket, address: Address, item: _Item) -> None:
        peer = self._peers.get(address)
        if peer is None:
            if (
                self._running_handlers >= self._max_peers
                or self._handler_nursery is None
            ):
                self._peers_rejected += 1
                return
            peer = UdpPeer(self, endpoint, address)
            self._peers[address] = peer
            self._running_handlers += 1
            self._peers_started += 1
            self._handler_nursery.start_soon(
                self._run_handler,
                peer,
                name=f"trionet UDP peer {_format_address(address)}",
            )
        try:
            peer._send_channel.send_nowait(item)
        except trio.WouldBlock:
            self._dropped += 1
            return
        peer._last_arrival = trio.current_time()

    async def _run_handler(self, peer: UdpPeer) -> None:
        try:
            await self._handler(peer)
        except ConnectionClosed as exc:
            # Letting the peer's own ConnectionClosed (idle timeout, shutdown)
            # escape is a normal way for a handler to end.
            if peer._close_reason is None or exc.reason is not peer._close_reason:
                self._handler_failed(peer)
        except Exception:
            self._handler_failed(peer)
        except BaseException:
            self._close_peer(peer, CloseReason.SHUTDOWN)
            raise
        finally:
            self._close_peer(peer, CloseReason.CLOSED_BY_HOST)
            self._running_handlers -= 1

    def _handler_failed(self, peer: UdpPeer) -> None:
        self._handler_errors += 1
        self._close_peer(peer, CloseReason.ERROR)
        logger.exception(
            "UDP handler for %s raised; that peer is closed",
            _format_address(peer._address),
        )

    def _close_peer(self, peer: UdpPeer, reason: CloseReason) -> None:
        """Record the first close reason, forget the peer and drop its queue."""
        if peer._close_reason is not None:
            return
        peer._close_reason = reason
        if self._peers.get(peer._address) is peer:
            del self._peers[peer._address]
        peer._send_channel.close()
        while True:
            try:
                peer._receive_channel.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            self._dropped += 1
        peer._receive_channel.close()


async def serve_udp(
    handler: UdpHandler,
    port: int,
    *,
    host: str | None = None,
    idle_timeout: float | None = None,
    queue_size: int = DEFAULT_QUEUE_SIZE,
    max_peers: int = DEFAULT_MAX_PEERS,
    max_size: int = IPV4_MAX_PAYLOAD,
    reuse_port: bool = False,
    handler_nursery: trio.Nursery | None = None,
    task_status: trio.TaskStatus[UdpServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve UDP on ``port``, running ``await handler(peer)`` once per remote address.

    Use it with ``server = await nursery.start(trionet.serve_udp, handler, port)``;
    the started value is the :class:`UdpServer`.  It runs until cancelled or
    until :meth:`UdpServer.aclose`.

    A reader task per socket hands each datagram to its peer's queue without
    waiting; a full queue drops the datagram (counted in
    :attr:`UdpServerStats.dropped`).  A new address starts a handler, unless
    ``max_peers`` handlers are running (the datagram is dropped and counted in
    :attr:`UdpServerStats.peers_rejected`).  When a handler returns its peer
    is forgotten; when it raises, the exception is logged on the ``"trionet"``
    logger and only that peer ends (:attr:`CloseReason.ERROR`).

    Args:
        handler: ``async def handler(peer: UdpPeer)``.
        port: the UDP port; 0 picks a free one, shared by all sockets.
        host: the address to bind; ``None`` binds the wildcard address of
            every address family (IPv4 and IPv6).
        idle_timeout: seconds without a datagram from a peer after which its
            :meth:`~UdpPeer.receive` raises :class:`ConnectionClosed`
            (:attr:`CloseReason.TIMEOUT`); ``None`` (the default) waits forever.
        queue_size: datagrams buffered per peer (default 256).
        max_peers: most handlers running at once (default 1024).
        max_size: the largest datagram accepted or sent (default 65507).
        reuse_port: set SO_REUSEPORT, so several processes (or servers) can
            bind the same port; the kernel spreads remote addresses over
            them, each address always reaching the same socket.
        handler_nursery: run handlers here instead of inside the server; they
            are then not cancelled at shutdown, but their peers are closed
            with :attr:`CloseReason.SHUTDOWN`.
        task_status: given by ``nursery.start``.

    Raises:
        ValueError: an option is out of range.
        OSError: binding failed, or ``reuse_port`` is set where the platform
            has no SO_REUSEPORT.

    .. versionadded:: 0.1
    """
    _check_server_options(port, idle_timeout, queue_size, max_peers, max_size)
    if host is not None and not isinstance(host, str):
        raise TypeError(f"host must be a str or None, not {type(host).__name__}")
    sockets = await _bind_server_sockets(host, port, max_size, reuse_port)
    server = UdpServer(
        [_ServerSocket(s) for s in sockets],
        handler,
        idle_timeout=idle_timeout,
        queue_size=queue_size,
        max_peers=max_peers,
        max_size=max_size,
    )
    try:
        async with trio.open_nursery() as nursery:
            server._cancel_scope = nursery.cancel_scope
            server._handler_nursery = handler_nursery or nursery
            for endpoint in server._sockets:
                nursery.start_soon(
                    server._read,
                    endpoint,
                    name=f"trionet UDP reader on {server.port}",
                )
            task_status.started(server)
    finally:
        server._shutdown()


@asynccontextmanager
async def open_udp_server(
    handler: UdpHandler,
    port: int = 0,
    host: str | None = "127.0.0.1",
    *,
    idle_timeout: float | None = None,
    queue_size: int = DEFAULT_QUEUE_SIZE,
    max_peers: int = DEFAULT_MAX_PEERS,
    max_size: int = IPV4_MAX_PAYLOAD,
    reuse_port: bool = False,
) -> AsyncIterator[UdpServer]:
    """Run :func:`serve_udp` for the duration of an ``async with`` block.

    Leaving the block stops the server.  An exception raised in the block
    reaches the caller as itself, not wrapped in an exception group.

    Example::

        async with trionet.open_udp_server(echo) as server:
            async with trionet.open_udp(remote=("127.0.0.1", server.port)) as ep:
                await ep.send(b"ping")

    Args:
        handler: ``async def handler(peer: UdpPeer)``.
        port: the UDP port; 0 (the default) picks a free one.
        host: the address to bind (loopback by default; ``None`` for all
            interfaces).
        idle_timeout: see :func:`serve_udp`.
        queue_size: see :func:`serve_udp`.
        max_peers: see :func:`serve_udp`.
        max_size: see :func:`serve_udp`.
        reuse_port: see :func:`serve_udp`.

    .. versionadded:: 0.1
    """
    _check_server_options(port, idle_timeout, queue_size, max_peers, max_size)
    async with server_in_block(
        serve_udp,
        handler,
        port,
        host=host,
        idle_timeout=idle_timeout,
        queue_size=queue_size,
        max_peers=max_peers,
        max_size=max_size,
        reuse_port=reuse_port,
    ) as server:
        yield server


async def _bind_server_sockets(
    host: str | None, port: int, max_size: int, reuse_port: bool = False
) -> list[trio.socket.SocketType]:
    # reuse_port_option() raises OSError here, before any socket exists.
    option = reuse_port_option() if reuse_port else None

    def setup(sock: socket.socket) -> None:
        if option is not None:
            sock.setsockopt(socket.SOL_SOCKET, option, 1)

    sockets = await bind_sockets([host], port, socket.SOCK_DGRAM, setup)
    try:
        for sock in sockets:
            _check_max_size(max_size, sock.family)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return [trio.socket.from_stdlib_socket(sock) for sock in sockets]


def _check_server_options(
    port: object,
    idle_timeout: object,
    queue_size: object,
    max_peers: object,
    max_size: object,
) -> None:
    _check_port(port, "port", allow_zero=True)
    if idle_timeout is not None:
        if isinstance(idle_timeout, bool) or not isinstance(idle_timeout, int | float):
            raise TypeError("idle_timeout must be a number of seconds or None")
        if math.isnan(idle_timeout) or idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be > 0 or None, not {idle_timeout!r}")
    for name, value in (("queue_size", queue_size), ("max_peers", max_peers)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int")
        if value < 1:
            raise ValueError(f"{name} must be at least 1, not {value!r}")
    _check_max_size(max_size, None)


def _check_port(port: object, name: str, *, allow_zero: bool) -> None:
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"{name} must be an int, not {type(port).__name__}")
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"{name} must be in {low}..65535, not {port}")


def _check_max_size(max_size: object, family: int | None) -> None:
    if isinstance(max_size, bool) or not isinstance(max_size, int):
        raise TypeError(f"max_size must be an int, not {type(max_size).__name__}")
    limit = IPV4_MAX_PAYLOAD if family == socket.AF_INET else IPV6_MAX_PAYLOAD
    if not 1 <= max_size <= limit:
        kind = ""
        if family == socket.AF_INET:
            kind = " for IPv4"
        elif family == socket.AF_INET6:
            kind = " for IPv6"
        raise ValueError(f"max_size must be in 1..{limit}{kind}, not {max_size}")


def _checked_payload(data: _Payload, max_size: int) -> bytes:
    payload = as_bytes(data)
    if len(payload) > max_size:
        raise MessageTooLarge(
            f"datagram of {len(payload)} bytes is larger than max_size={max_size}; "
            "nothing was sent"
        )
    return payload


def _reported_size(nbytes: int) -> int | None:
    # Without MSG_TRUNC the buffer only says "at least max_size + 1".
    return nbytes if _RECEIVE_FLAGS else None


def _translate(exc: OSError, action: str, address: Address | None) -> DatagramError:
    """Turn an OS error on send or receive into a :class:`DatagramError`."""
    where = f" ({_format_address(address)})" if address is not None else ""
    detail = exc.strerror or str(exc)
    if exc.errno == errno.ECONNREFUSED:
        detail = "port unreachable: nothing is listening there (ICMP)"
    elif exc.errno == errno.EACCES and action == "send":
        detail += "; sending to a broadcast address needs broadcast=True"
    elif exc.errno == errno.EMSGSIZE:
        detail += "; the datagram is larger than the path allows"
    return DatagramError(exc.errno, f"UDP {action} failed{where}: {detail}", address)
