"""Transports move bytes between a socket (or any trio stream) and a Connection.

How this works
--------------
trio's own ``SocketStream`` passes through the scheduler on every
``receive_some`` and ``send_all``, even when the socket was ready.  For plain
TCP, :class:`SocketTransport` drives a non-blocking stdlib socket itself:

* a receive first passes through the scheduler once (so one busy
  connection cannot starve the others -- one pass per received *chunk*, not
  per message), then tries ``recv_into``, and only waits
  (:func:`trio.lowlevel.wait_readable`) when the kernel has nothing.  Letting
  the other tasks run first is what makes a loaded server cheap: by the time
  the ``recv`` comes, the peer's next request has usually arrived, and a
  ``recv`` that succeeds costs one system call where a wait costs two
  (trio re-arms the socket's epoll registration for every wait);
* a send tries ``send`` first, synchronously, and only waits
  (:func:`trio.lowlevel.wait_writable`) for what the kernel did not take.

Received bytes land in a scratch buffer shared by every connection of the
thread and are appended to the connection's own :class:`ReceiveBuffer` before
anything awaits, so an idle connection holds no receive buffer at all.  The
body of a large message is received straight into its own buffer instead
(``into``): one copy fewer, and as few ``recv`` calls as the kernel allows.

Every other stream (TLS, in-memory streams, user wrappers) goes through
:class:`StreamTransport`, which simply awaits the stream's methods.

Errors are translated in :class:`~trionet._connection.Connection`, the one
place that knows which close reason they mean.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
from typing import Any, NamedTuple, TypeAlias

import trio
import trio.testing

from ._codec import ReceiveBuffer
from ._network import SimulatedStream

__all__ = [
    "Address",
    "PeerCredentials",
    "SimulatedTransport",
    "SocketTransport",
    "StreamTransport",
    "Transport",
    "check_server_hostname",
    "peer_credentials",
]

#: A socket address as ``getsockname()`` gives it: a tuple for IPv4 and IPv6,
#: a path for a UNIX socket (an empty string for an unnamed one).
Address: TypeAlias = tuple[Any, ...] | str


class PeerCredentials(NamedTuple):
    """Who is at the other end of a UNIX socket, as the kernel saw it when
    the connection was made (``SO_PEERCRED``).

    .. versionadded:: 0.1
    """

    #: The peer's process ID.
    pid: int
    #: The peer's effective user ID.
    uid: int
    #: The peer's effective group ID.
    gid: int


_PEERCRED = getattr(socket, "SO_PEERCRED", None)
_PEERCRED_FORMAT = "3i"


def peer_credentials(
    sock: socket.socket | trio.socket.SocketType,
) -> PeerCredentials | None:
    """The credentials of a connected UNIX socket's peer; None for any other
    socket, a closed one, or where the system has no ``SO_PEERCRED``."""
    family = getattr(socket, "AF_UNIX", None)
    if _PEERCRED is None or family is None or sock.family != family:
        return None
    try:
        raw = sock.getsockopt(
            socket.SOL_SOCKET, _PEERCRED, struct.calcsize(_PEERCRED_FORMAT)
        )
    except OSError:
        return None
    return PeerCredentials(*struct.unpack(_PEERCRED_FORMAT, raw))


#: Bytes asked of the kernel per receive.
RECEIVE_SIZE = 65536

#: (local address, remote address, peer credentials) of a transport.
_Endpoints: TypeAlias = tuple[Address | None, Address | None, PeerCredentials | None]

_scratch = threading.local()


def _scratch_view() -> memoryview:
    view: memoryview | None = getattr(_scratch, "view", None)
    if view is None:
        view = _scratch.view = memoryview(bytearray(RECEIVE_SIZE))
    return view


class Transport:
    """What a Connection needs from the bytes underneath it."""

    __slots__ = ("_addresses", "closed", "ragged_eof")

    def __init__(self) -> None:
        # (local, remote, peer credentials), looked up when first asked for
        # (or at close).
        self._addresses: _Endpoints | None = None
        #: Whether the stream has been closed for good (no descriptor left).
        self.closed = False
        #: Whether the end of stream was a TLS stream cut without close_notify.
        self.ragged_eof = False

    @property
    def local_address(self) -> Address | None:
        return self._get_addresses()[0]

    @property
    def remote_address(self) -> Address | None:
        return self._get_addresses()[1]

    @property
    def peer_credentials(self) -> PeerCredentials | None:
        return self._get_addresses()[2]

    def _get_addresses(self) -> _Endpoints:
        addresses = self._addresses
        if addresses is None:
            addresses = self._addresses = self._look_up_addresses()
        return addresses

    def _look_up_addresses(self) -> _Endpoints:
        return None, None, None

    async def receive_into(
        self, buffer: ReceiveBuffer, into: memoryview | None = None
    ) -> int:
        """Wait for bytes and append them to ``buffer`` -- or, given ``into``,
        write them there instead (at most ``len(into)``); 0 means end of stream."""
        raise NotImplementedError

    @property
    def fast_socket(self) -> socket.socket | None:
        """The non-blocking socket underneath, for :meth:`receive_nowait`
        (None: only :meth:`receive_into` works)."""
        return None

    def receive_nowait(
        self, buffer: ReceiveBuffer, into: memoryview | None = None
    ) -> int | None:
        """:meth:`receive_into` without waiting: None if nothing has arrived."""
        raise NotImplementedError

    def send_nowait(self, data: bytes | memoryview) -> int:
        """Send what the kernel takes now, without waiting; return the byte count."""
        raise NotImplementedError

    async def send_all(self, data: bytes | memoryview) -> None:
        """Send everything, waiting for room as needed."""
        raise NotImplementedError

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until a send would probably not have to wait."""
        raise NotImplementedError

    @property
    def can_send_eof(self) -> bool:
        """Whether :meth:`send_eof` works (TLS cannot half-close)."""
        return True

    def describe(self) -> str:
        """What the transport is, for error messages."""
        return type(self).__name__

    async def send_eof(self) -> None:
        """Half-close: no more bytes will be sent."""
        raise NotImplementedError

    def close(self) -> bool:
        """Close at once, without awaiting, as far as possible; report whether
        the stream is now closed for good (then :attr:`closed` is set)."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Close gracefully, awaiting whatever the transport needs (a TLS
        close_notify).  Bound it with a deadline: it may wait for the peer."""
        raise NotImplementedError

    async def aclose_forcefully(self) -> None:
        """Close at once, sending nothing more."""
        raise NotImplementedError

    def trio_stream(self) -> trio.abc.Stream:
        """The bytes underneath as a trio stream, for a layer on top (TLS).
        The transport itself must not be used afterwards."""
        raise NotImplementedError

    def upgraded(
        self,
        ssl_context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None,
        require_close_notify: bool,
    ) -> StreamTransport:
        """A TLS transport over the same bytes (no handshake yet): the one
        that replaces this transport once :meth:`Connection.start_tls` has
        made sure nothing is buffered or queued.

        Raises:
            ValueError: ``ssl_context`` does not fit the side (e.g. a client
                context that checks host names, without ``server_hostname``).
        """
        check_server_hostname(ssl_context, server_side, server_hostname)
        tls = trio.SSLStream(
            self.trio_stream(),
            ssl_context,
            server_side=server_side,
            server_hostname=server_hostname,
        )
        upgraded = StreamTransport(tls, require_close_notify=require_close_notify)
        upgraded._addresses = self._addresses
        return upgraded


def check_server_hostname(
    ssl_context: ssl.SSLContext, server_side: bool, server_hostname: str | None
) -> None:
    """Refuse a client-side context that checks host names when there is no
    name to check (the ssl module would not say so before the handshake).

    Raises:
        ValueError: a client context with ``check_hostname`` and no name.
    """
    if not server_side and server_hostname is None and ssl_context.check_hostname:
        raise ValueError(
            "this TLS context checks the server's host name: pass "
            "server_hostname (the name its certificate must carry)"
        )


def _addresses(sock: socket.socket | trio.socket.SocketType) -> _Endpoints:
    if sock.fileno() < 0:
        return None, None, None
    local = sock.getsockname()
    try:
        remote = sock.getpeername()
    except OSError:
        remote = None
    return local, remote, peer_credentials(sock)


class SocketTransport(Transport):
    """A non-blocking stdlib socket driven with trio's I/O waits."""

    __slots__ = ("_sock",)

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        super().__init__()

    def _look_up_addresses(self) -> _Endpoints:
        return _addresses(self._sock)

    @property
    def fast_socket(self) -> socket.socket | None:
        return self._sock

    @classmethod
    def from_trio_socket(cls, sock: trio.socket.SocketType) -> SocketTransport:
        """Take over the file descriptor of a trio socket (which is detached)."""
        family, type_, proto = sock.family, sock.type, sock.proto
        return cls(socket.socket(family, type_, proto, fileno=sock.detach()))

    def receive_nowait(
        self, buffer: ReceiveBuffer, into: memoryview | None = None
    ) -> int | None:
        view = _scratch_view() if into is None else into
        try:
            count = self._sock.recv_into(view)
        except BlockingIOError:
            return None
        if into is None:
            buffer.feed(view[:count])
        return count

    async def receive_into(
        self, buffer: ReceiveBuffer, into: memoryview | None = None
    ) -> int:
        # Let the other tasks run first: the peer's next bytes often arrive
        # meanwhile, and a recv that succeeds costs less than a wait.
        await trio.lowlevel.cancel_shielded_checkpoint()
        while (count := self.receive_nowait(buffer, into)) is None:
            await trio.lowlevel.wait_readable(self._sock)
        return count

    def send_nowait(self, data: bytes | memoryview) -> int:
        try:
            return self._sock.send(data)
        except BlockingIOError:
            return 0

    async def send_all(self, data: bytes | memoryview) -> None:
        sock = self._sock
        view = memoryview(data)
        with view:
            while view:
                try:
                    sent = sock.send(view)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(sock)
                    continue
                view = view[sent:]

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self._sock)

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        self._sock.shutdown(socket.SHUT_WR)

    def close(self) -> bool:
        if self._sock.fileno() >= 0:
            self._get_addresses()  # still known after the close
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()
        self.closed = True
        return True

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    async def aclose_forcefully(self) -> None:
        await self.aclose()

    def trio_stream(self) -> trio.abc.Stream:
        # The same socket object, from now on driven by trio's SocketStream
        # (which sets TCP_NODELAY only where it applies).
        return trio.SocketStream(trio.socket.from_stdlib_socket(self._sock))


_MEMORY_STREAMS = (trio.testing.MemorySendStream, trio.testing.MemoryReceiveStream)


def _close_sync(stream: object) -> bool:
    """Close ``stream`` without awaiting, as far as its type allows; return
    whether it is now closed for good.

    A socket stream is (its descriptor is closed); so is a TLS stream over
    one, which holds nothing else.  A wrapper trionet does not know is not:
    its innermost stream is closed at once where possible, so that the peer
    sees the end and tasks blocked below wake up, but the wrapper's own
    ``aclose`` must still run to release what it holds.
    """
    if isinstance(stream, trio.SocketStream):
        trio.lowlevel.notify_closing(stream.socket)
        stream.socket.close()
        return True
    if isinstance(stream, trio.SSLStream):
        return _close_sync(stream.transport_stream)
    if isinstance(stream, trio.StapledStream):
        return _close_sync(stream.send_stream) & _close_sync(stream.receive_stream)
    if isinstance(
        stream,
        trio.testing.MemorySendStream
        | trio.testing.MemoryReceiveStream
        | SimulatedStream,
    ):
        stream.close()
        return True
    inner = getattr(stream, "transport_stream", None) or getattr(stream, "stream", None)
    if inner is not None:
        _close_sync(inner)
    return False


class StreamTransport(Transport):
    """Any :class:`trio.abc.Stream`: TLS, in-memory streams, wrappers."""

    __slots__ = ("_require_close_notify", "_stream")

    def __init__(
        self, stream: trio.abc.Stream, *, require_close_notify: bool = False
    ) -> None:
        self._stream = stream
        self._require_close_notify = require_close_notify
        super().__init__()

    def _look_up_addresses(self) -> _Endpoints:
        sock = _find_socket(self._stream)
        if isinstance(sock, SimulatedStream):
            return sock.endpoints()
        return (None, None, None) if sock is None else _addresses(sock)

    @property
    def stream(self) -> trio.abc.Stream:
        return self._stream

    async def receive_into(
        self, buffer: ReceiveBuffer, into: memoryview | None = None
    ) -> int:
        try:
            data = await self._stream.receive_some(
                RECEIVE_SIZE if into is None else len(into)
            )
        except trio.BrokenResourceError as exc:
            if self._require_close_notify or not _is_tls_eof(exc.__cause__):
                raise
            # The peer closed without TLS's close_notify, as many clients
            # do: an end of stream, unless it cut a message short (the
            # connection checks that).
            self.ragged_eof = True
            return 0
        if into is None:
            buffer.feed(data)
        else:
            into[: len(data)] = data
        return len(data)

    def send_nowait(self, data: bytes | memoryview) -> int:
        return 0

    async def send_all(self, data: bytes | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    @property
    def can_send_eof(self) -> bool:
        return isinstance(self._stream, trio.abc.HalfCloseableStream)

    def describe(self) -> str:
        return type(self._stream).__name__

    async def send_eof(self) -> None:
        stream = self._stream
        if not isinstance(stream, trio.abc.HalfCloseableStream):
            raise TypeError(f"{type(stream).__name__} cannot half-close")
        await stream.send_eof()

    def close(self) -> bool:
        self._get_addresses()  # still known after the close
        if _close_sync(self._stream):
            self.closed = True
        return self.closed

    async def aclose(self) -> None:
        # A graceful close (TLS sends close_notify); forceful if cancelled.
        self._get_addresses()
        await self._stream.aclose()
        self.closed = True

    async def aclose_forcefully(self) -> None:
        self._get_addresses()
        await trio.aclose_forcefully(self._stream)
        self.closed = True

    def trio_stream(self) -> trio.abc.Stream:
        return self._stream


class SimulatedTransport(StreamTransport):
    """A simulated network's stream (``trionet/_network.py``).  It takes
    bytes without awaiting, as a socket does, so a send goes out at once
    rather than through a writer task, as over :class:`SocketTransport`."""

    __slots__ = ()

    def send_nowait(self, data: bytes | memoryview) -> int:
        stream = self._stream
        assert isinstance(stream, SimulatedStream)
        return stream.send_nowait(data)


def _is_tls_eof(exc: BaseException | None) -> bool:
    # (Some OpenSSL builds report the missing close_notify by its reason
    # string only.)
    return isinstance(exc, ssl.SSLEOFError) or (
        isinstance(exc, ssl.SSLError) and "UNEXPECTED_EOF" in str(exc)
    )


def _find_socket(stream: object) -> trio.socket.SocketType | SimulatedStream | None:
    for _ in range(8):
        if isinstance(stream, trio.SocketStream):
            return stream.socket
        if isinstance(stream, SimulatedStream):
            return stream
        inner = getattr(stream, "transport_stream", None)
        if inner is None:
            return None
        stream = inner
    return None
