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

TLS over such a socket -- from the start, or after STARTTLS -- stays on the
same path: :class:`TlsTransport` drives an :class:`ssl.SSLObject` between
two memory BIOs over the non-blocking socket, so a receive is one ``recv``
and every record it completes decrypted at once, and a send is one
``SSLObject.write`` per batch and one ``send``, without a writer task unless
the kernel runs out of room (see its docstring).

Every other stream (in-memory streams, user wrappers, TLS over those) goes
through :class:`StreamTransport`, which simply awaits the stream's methods.

Errors are translated in :class:`~trionet._connection.Connection`, the one
place that knows which close reason they mean.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
from typing import Any, ClassVar, NamedTuple, TypeAlias

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
    "TlsTransport",
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
RECEIVE_SIZE = 256 * 1024

#: (local address, remote address, peer credentials) of a transport.
_Endpoints: TypeAlias = tuple[Address | None, Address | None, PeerCredentials | None]

_scratch = threading.local()


def _scratch_view() -> memoryview:
    try:
        view: memoryview = _scratch.view
    except AttributeError:
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

    def receive_chunk_nowait(self) -> memoryview | None:
        """One chunk from the :attr:`fast_socket`, without waiting: a view of
        the thread's scratch buffer (empty at end of stream), valid only
        until the next receive, so use it before anything awaits; None if
        nothing has arrived."""
        raise NotImplementedError

    def send_nowait(self, data: bytes | memoryview) -> int:
        """Send what the kernel takes now, without waiting; return the byte
        count accepted.  Accepted bytes may still wait in the transport
        (TLS records the kernel did not take): see :attr:`has_backlog`."""
        raise NotImplementedError

    def send_parts_nowait(self, header: bytes, payload: bytes) -> int:
        """:meth:`send_nowait` of ``header + payload``, without joining them
        where the transport can (a scatter-gather ``sendmsg``)."""
        return self.send_nowait(header + payload)

    #: Whether accepted bytes can wait in the transport at all (TLS): when
    #: False, :attr:`has_backlog` is always False and need not be asked (a
    #: class attribute: checking it costs no call on the plain send path).
    can_hold_backlog: ClassVar[bool] = False

    @property
    def has_backlog(self) -> bool:
        """Whether accepted bytes still wait to be written: :meth:`send_all`
        (with no data, or with more) writes them first."""
        return False

    async def send_all(self, data: bytes | memoryview) -> None:
        """Send everything (after any backlog), waiting for room as needed."""
        raise NotImplementedError

    async def do_handshake(self) -> None:
        """Run the TLS handshake (TLS transports only).

        Raises:
            trio.BrokenResourceError: the handshake failed (the TLS error is
                its ``__cause__``).
            OSError: the connection failed underneath.
        """
        raise TypeError(f"{self.describe()} is not a TLS transport")

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
    ) -> Transport:
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

    def receive_chunk_nowait(self) -> memoryview | None:
        view = _scratch_view()
        try:
            count = self._sock.recv_into(view)
        except BlockingIOError:
            return None
        return view[:count]

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

    def send_parts_nowait(self, header: bytes, payload: bytes) -> int:
        try:
            return self._sock.sendmsg((header, payload))
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

    def upgraded(
        self,
        ssl_context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None,
        require_close_notify: bool,
    ) -> Transport:
        # TLS over the same socket, still on the fast path.
        check_server_hostname(ssl_context, server_side, server_hostname)
        upgraded = TlsTransport(
            self._sock,
            ssl_context,
            server_side=server_side,
            server_hostname=server_hostname,
            require_close_notify=require_close_notify,
        )
        upgraded._addresses = self._addresses
        return upgraded


#: Plaintext bytes encrypted at a time by a send: what a send may leave
#: behind as ciphertext the kernel did not take (plus the records' overhead).
TLS_WRITE_SIZE = 64 * 1024


class TlsTransport(SocketTransport):
    """TLS over a non-blocking socket: an :class:`ssl.SSLObject` between two
    memory BIOs, driven by trionet itself.

    Receiving: one ``recv`` into the shared scratch buffer feeds the incoming
    BIO, and every record it completes is decrypted into the connection's
    buffer at once (the connection then cuts every whole message, as over
    plain TCP).  Sending: the bytes of one send (a whole corked batch) are
    encrypted with one ``SSLObject.write`` per 64 KiB and written with the
    socket's non-blocking ``send``; what the kernel does not take waits here
    (:attr:`has_backlog`), ahead of anything sent later, so most sends need
    no writer task.  A receive that produces TLS messages of its own (a key
    update, renegotiation) sends them too.

    Only one task touches the socket's readable side at a time, and one its
    writable side: the connection runs one receive and one send at a time,
    and a send that must first *read* (a renegotiation under way) waits for
    the receiving task to feed the BIO, or reads the socket itself when no
    receive is running.

    The server's TLS 1.3 session tickets are held back until the first send,
    as trio's ``SSLStream`` does: a client that never reads would otherwise
    close with unread bytes, which makes its kernel reset the connection.

    Closing sends close_notify without waiting for the peer's (the caller's
    deadline bounds even that).  An end of stream without close_notify is a
    ragged EOF: an end of stream (:attr:`ragged_eof` set) unless
    ``require_close_notify``, when it is a :exc:`trio.BrokenResourceError`.
    """

    __slots__ = (
        "_eof",
        "_held",
        "_incoming",
        "_lot",
        "_outgoing",
        "_pending",
        "_read_busy",
        "_require_close_notify",
        "_send_busy",
        "_ssl",
        "_urgent",
    )

    def __init__(
        self,
        sock: socket.socket,
        ssl_context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        require_close_notify: bool = False,
    ) -> None:
        super().__init__(sock)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = ssl_context.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
        )
        self._require_close_notify = require_close_notify
        # Ciphertext taken from the outgoing BIO that the kernel has not
        # taken yet: it goes out before anything still in the BIO.
        self._pending: memoryview | None = None
        # Bytes at the front of the outgoing BIO held until the first send
        # (the server's session tickets).
        self._held = 0
        # Whether a receive produced TLS messages that must go out before
        # it waits for the peer (they may be what the peer waits for).
        self._urgent = False
        # Whether a task waits for the socket to be readable / writable.
        self._read_busy = False
        self._send_busy = False
        # The end of the TLS stream was seen (0 from now on).
        self._eof = False
        # Tasks waiting for the other side of the socket to make progress
        # (created when first needed).
        self._lot: trio.lowlevel.ParkingLot | None = None

    @property
    def fast_socket(self) -> socket.socket | None:
        # (The connection must go through receive_into: only it knows the BIO.)
        return None

    @property
    def can_send_eof(self) -> bool:
        return False

    def describe(self) -> str:
        return "TLS"

    # ------------------------------------------------------------- handshake

    async def do_handshake(self) -> None:
        sslobj = self._ssl
        while True:
            try:
                sslobj.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                await self._receive_ciphertext()
                continue
            except (ssl.SSLError, ssl.CertificateError) as exc:
                # Send the alert OpenSSL wrote, if the kernel takes it now.
                with contextlib.suppress(OSError):
                    self._flush_nowait()
                raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc
            break
        if sslobj.server_side and sslobj.version() == "TLSv1.3":
            # The session tickets: held until the first send.
            self._held = self._outgoing.pending
        else:
            await self._flush()

    async def _receive_ciphertext(self) -> None:
        """Wait for bytes from the socket and feed them to the incoming BIO."""
        while not self._recv_ciphertext():
            await self._wait_readable()

    def _recv_ciphertext(self) -> bool:
        """Feed what the socket has now to the incoming BIO; False if nothing."""
        view = _scratch_view()
        try:
            count = self._sock.recv_into(view)
        except BlockingIOError:
            return False
        if count:
            self._incoming.write(view[:count])
        else:
            self._incoming.write_eof()
        lot = self._lot
        if lot:
            lot.unpark_all()  # (a send waiting for the handshake to move on)
        return True

    async def _wait_readable(self) -> None:
        if self._urgent and not self._send_busy:
            self._send_busy = True
            try:
                await self._flush()
            finally:
                self._send_busy = False
                self._urgent = False
                lot = self._lot
                if lot:
                    lot.unpark_all()  # (a send waiting for this flush)
        if self._read_busy:
            # A send reads the socket for its renegotiation: it feeds the BIO.
            await self._parking_lot().park()
            return
        self._read_busy = True
        try:
            await trio.lowlevel.wait_readable(self._sock)
        finally:
            self._read_busy = False
            lot = self._lot
            if lot:
                # (A send waiting for this read: it goes on, and reads the
                # socket itself if this one was cancelled.)
                lot.unpark_all()

    def _parking_lot(self) -> trio.lowlevel.ParkingLot:
        lot = self._lot
        if lot is None:
            lot = self._lot = trio.lowlevel.ParkingLot()
        return lot

    # ------------------------------------------------------------- receiving

    def receive_nowait(
        self, buffer: ReceiveBuffer, into: memoryview | None = None
    ) -> int | None:
        incoming = self._incoming
        if incoming.pending or incoming.eof or self._eof or self._ssl.pending():
            count = self._decrypt(buffer, into)
            if count is not None:
                return count
        # (Nothing new to decrypt before a recv: no failing read.)
        while self._recv_ciphertext():
            count = self._decrypt(buffer, into)
            if count is not None:
                return count
        return None

    async def receive_into(
        self, buffer: ReceiveBuffer, into: memoryview | None = None
    ) -> int:
        # (As SocketTransport: the other tasks first, then try the socket.)
        await trio.lowlevel.cancel_shielded_checkpoint()
        while (count := self.receive_nowait(buffer, into)) is None:
            await self._wait_readable()
        return count

    def _decrypt(self, buffer: ReceiveBuffer, into: memoryview | None) -> int | None:
        """Decrypt every whole record in the incoming BIO into ``buffer`` (or
        as much as fits into ``into``); None if there was none, 0 at the end
        of the TLS stream."""
        if self._eof:
            return 0
        sslobj = self._ssl
        incoming = self._incoming
        view = _scratch_view() if into is None else into
        total = 0
        try:
            while True:
                # (Given a buffer, read returns a count; typeshed says bytes.)
                count: int = sslobj.read(len(view), view)  # type: ignore[assignment]
                if not count:
                    # close_notify (the ssl module returns 0 rather than
                    # raising SSLZeroReturnError): a clean end of stream.
                    self._eof = True
                    break
                if into is not None:
                    total = count
                    break
                buffer.feed(view[:count])
                total += count
                if not incoming.pending and not sslobj.pending():
                    break
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            # close_notify: a clean end of stream (after what came before it).
            self._eof = True
        except (ssl.SSLError, ssl.CertificateError) as exc:
            if self._require_close_notify or not _is_tls_eof(exc):
                raise trio.BrokenResourceError(f"TLS failed: {exc}") from exc
            # The peer closed without close_notify, as many clients do: an
            # end of stream, unless it cut a message short (the connection
            # checks that).
            self._eof = self.ragged_eof = True
        if self._outgoing.pending > self._held and not self._send_busy:
            # TLS messages of our own (a key update, a renegotiation; an
            # alert at the end).  After the end, a peer that is gone only
            # makes this fail: the end of stream is the news.
            try:
                self._urgent = not self._flush_nowait()
            except OSError:
                if not self._eof:
                    raise
        if total:
            return total
        return 0 if self._eof else None

    # --------------------------------------------------------------- sending

    can_hold_backlog = True

    @property
    def has_backlog(self) -> bool:
        return self._pending is not None or self._outgoing.pending > self._held

    def _flush_nowait(self) -> bool:
        """Write the ciphertext the kernel takes now; True if none is left."""
        self._held = 0
        sock = self._sock
        data: bytes | memoryview | None = self._pending
        while True:
            if data is None:
                if not self._outgoing.pending:
                    return True
                data = self._outgoing.read()
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            if sent < len(data):
                self._pending = memoryview(data)[sent:]
                return False
            if self._pending is None:
                return True  # (read() took everything the BIO held)
            self._pending = data = None

    async def _flush(self) -> None:
        while not self._flush_nowait():
            await trio.lowlevel.wait_writable(self._sock)

    def send_nowait(self, data: bytes | memoryview) -> int:
        # (Ciphertext still in the BIO -- held session tickets -- goes out
        # in the same ``send`` as these records.)
        if self._send_busy or (self._pending is not None and not self._flush_nowait()):
            return 0
        sslobj = self._ssl
        size = len(data)
        accepted = 0
        while accepted < size:
            chunk = (
                data
                if size <= TLS_WRITE_SIZE
                else memoryview(data)[accepted : accepted + TLS_WRITE_SIZE]
            )
            try:
                accepted += sslobj.write(chunk)
            except ssl.SSLWantReadError:
                break  # (a renegotiation: send_all waits for it)
            except (ssl.SSLError, ssl.CertificateError) as exc:
                raise trio.BrokenResourceError(f"TLS failed: {exc}") from exc
            if not self._flush_nowait():
                break
        return accepted

    def receive_chunk_nowait(self) -> memoryview | None:
        # (Never SocketTransport's: that would hand over ciphertext.  The
        # connection uses it only where fast_socket is set, never for TLS.)
        raise NotImplementedError("TLS is received through receive_into")

    def send_parts_nowait(self, header: bytes, payload: bytes) -> int:
        # (Never SocketTransport's sendmsg: that would send plaintext.  One
        # write of both: the encryption copies anyway.)
        return self.send_nowait(header + payload)

    async def send_all(self, data: bytes | memoryview) -> None:
        # The connection sends from one task at a time; the send side is
        # otherwise busy only while a receive flushes TLS output of its own
        # into a full kernel (see _wait_readable): wait for that, in order.
        while self._send_busy:
            await self._parking_lot().park()
        self._send_busy = True
        try:
            await self._flush()
            view = memoryview(data)
            with view:
                while view:
                    try:
                        sent = self._ssl.write(view[:TLS_WRITE_SIZE])
                    except ssl.SSLWantReadError:
                        await self._flush()
                        await self._wait_for_handshake()
                        continue
                    except (ssl.SSLError, ssl.CertificateError) as exc:
                        raise trio.BrokenResourceError(f"TLS failed: {exc}") from exc
                    view = view[sent:]
                    await self._flush()
        finally:
            self._send_busy = False

    async def _wait_for_handshake(self) -> None:
        """A send must read first (a renegotiation): let the receiving task
        feed the incoming BIO, or read the socket here if none is running."""
        if self._read_busy:
            await self._parking_lot().park()
            return
        self._read_busy = True
        try:
            while not self._recv_ciphertext():
                await trio.lowlevel.wait_readable(self._sock)
        finally:
            self._read_busy = False
            lot = self._lot
            if lot:
                # (A receive that waited meanwhile, even if this send was
                # cancelled: it reads the socket itself then.)
                lot.unpark_all()

    async def wait_send_all_might_not_block(self) -> None:
        if self._pending is None:
            await trio.lowlevel.wait_writable(self._sock)
        else:
            await self._flush()

    async def send_eof(self) -> None:
        raise TypeError("TLS cannot half-close")

    # --------------------------------------------------------------- closing

    async def aclose(self) -> None:
        # close_notify, flushed within the caller's deadline (never waiting
        # for the peer's own), then the socket.
        try:
            if not self.closed and not self._send_busy:
                with contextlib.suppress(ssl.SSLError):
                    self._ssl.unwrap()
                self._send_busy = True
                try:
                    await self._flush()
                finally:
                    self._send_busy = False
        finally:
            self.close()
        await trio.lowlevel.checkpoint()

    def upgraded(
        self,
        ssl_context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None,
        require_close_notify: bool,
    ) -> Transport:
        raise ValueError("this connection already speaks TLS")


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

    async def do_handshake(self) -> None:
        stream = self._stream
        if not isinstance(stream, trio.SSLStream):
            raise TypeError(f"{self.describe()} is not a TLS stream")
        await stream.do_handshake()

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
