"""TCP and UNIX socket servers: one task per connection in a nursery.

How this works
--------------
``serve_tcp`` (or ``serve_unix``) opens its listening sockets and hands them
to ``_serve``, the one body both share: it reports the :class:`Server` through
``task_status.started`` and runs an accept loop per socket.  Each accepted
socket gets a task in the handler nursery, which

1. asks the ``accept`` filter (a refused client is closed at once and counted
   as :attr:`CloseReason.REJECTED`; its handler never runs),
2. does the TLS handshake if there is an ``ssl_context``,
3. builds the :class:`Connection` (its writer tasks live in the same nursery),
   registers it and calls ``on_connect``,
4. runs the handler inside a cancel scope of its own; an exception escaping
   the handler is logged and closes that connection with ERROR, nothing else,
5. closes the connection -- CLOSED_BY_HOST unless something else came first,
   SHUTDOWN when the server cancelled the handler -- after flushing what it
   queued, and calls ``on_close``.

``max_connections`` is a semaphore taken *before* accepting: at the limit the
server simply stops calling accept() and clients wait in the kernel's backlog.
Accept errors that mean "out of descriptors or memory" are logged and retried
after a pause, so the listener survives them.

``aclose(grace_period)`` stops accepting at once, waits up to the grace period
for handlers to finish, cancels the rest, lets every connection flush (bounded
by ``flush_timeout``) and returns when all are closed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import socket
import ssl
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Protocol, TypeAlias, TypedDict

import attrs
import trio

from ._codec import Framing, as_bytes
from ._connection import DEFAULT_HANDSHAKE_TIMEOUT, Connection, TlsSettings
from ._exceptions import CloseReason, ConnectError, ConnectionClosed, ProtocolError
from ._listeners import Listener, UnixSocketFile, open_listeners, open_unix_listener
from ._network import SimulatedStream
from ._options import non_negative, positive, positive_int, positive_or_none
from ._sending import (
    DEFAULT_BROADCAST_HEADROOM,
    DEFAULT_FLUSH_TIMEOUT,
    DEFAULT_SEND_QUEUE_BYTES,
    DEFAULT_SEND_QUEUE_SIZE,
    DEFAULT_STALL_TIMEOUT,
    QueuedSendPath,
    SendLimits,
)
from ._transport import (
    Address,
    SimulatedTransport,
    SocketTransport,
    StreamTransport,
    Transport,
    peer_credentials,
)
from ._util import (
    call_maybe_async,
    format_address,
    host_handlers,
    only_own_end,
    server_in_block,
    unwrap_single_exception,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "Server",
    "ServerOptions",
    "ServerStatistics",
    "open_tcp_server",
    "open_unix_server",
    "serve_tcp",
    "serve_unix",
]

logger = logging.getLogger("trionet")

Handler: TypeAlias = Callable[[Connection], Awaitable[object]]
AcceptFilter: TypeAlias = Callable[[Address], "bool | Awaitable[bool]"]
Hook: TypeAlias = Callable[[Connection], "object | Awaitable[object]"]
#: An accepted client: a socket, or a simulated network's stream.
Accepted: TypeAlias = socket.socket | SimulatedStream


class Backplane(Protocol):
    """What a server needs of a backplane (see :doc:`/scaling`).

    :class:`trionet.channels.RedisBackplane` is the one trionet ships.  The
    server calls :meth:`serve` once, before it accepts anyone, calls
    :meth:`publish` from :meth:`Server.broadcast` before it delivers locally,
    and :meth:`flush` once its connections are closed.

    .. versionadded:: 0.1
    """

    async def serve(
        self,
        deliver: Callable[[bytes], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until cancelled, calling ``deliver(message)`` for each message
        another process published; report started once ready (or once the
        first connection attempt failed)."""

    def publish(self, message: bytes) -> None:
        """Send ``message`` to every other process without waiting;
        raise :class:`MessageTooLarge` if it is over the backplane's limit."""

    async def flush(self, max_wait: float) -> None:
        """Wait up to ``max_wait`` seconds for published messages to leave."""


#: Accept errors that mean "no resources right now": wait and try again.
_ACCEPT_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
#: Accept errors about one client (gone already, refused by a firewall rule,
#: unreachable): skip it and go on.  The same set trio's own listeners skip.
_ACCEPT_CLIENT_ERRORS = {
    getattr(errno, name)
    for name in (
        "EPERM",
        "ECONNABORTED",
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
        "ENOSR",
        "ESOCKTNOSUPPORT",
        "EPROTONOSUPPORT",
        "ETIMEDOUT",
        "ECONNRESET",
    )
    if hasattr(errno, name)
}
#: Seconds to pause accepting after running out of descriptors.
ACCEPT_BACKOFF = 0.1
#: The name of every connection task (one string shared by all of them).
_TASK_NAME = "trionet connection"
#: Handler exceptions a server remembers for inspection.
_ERRORS_KEPT = 100


@attrs.frozen(kw_only=True)
class ServerOptions:
    """Everything a TCP or UNIX socket server can be configured with.

    :func:`serve_tcp`, :func:`open_tcp_server`, :func:`serve_unix` and
    :func:`open_unix_server` take these as keyword arguments; the class
    validates them and documents the defaults.

    .. versionadded:: 0.1
    """

    #: :class:`Lines`, :class:`Frames` or None (raw bytes) for every connection.
    framing: Framing | None = None
    #: Serve TLS with this server-side context.
    ssl_context: ssl.SSLContext | None = None
    #: listen() backlog (None: as large as the kernel allows).
    backlog: int | None = None
    #: Called with the client's address -- on a UNIX socket server with its
    #: :class:`PeerCredentials` -- before anything else; a false result
    #: refuses the client.
    accept: AcceptFilter | None = None
    #: The most connections served at once; at the limit the server stops accepting.
    max_connections: int | None = attrs.field(default=None, validator=positive_or_none)
    #: Close a connection that received nothing for this many seconds (TIMEOUT).
    idle_timeout: float | None = attrs.field(default=None, validator=positive_or_none)
    #: Close a connection that takes longer than this to complete one message (TIMEOUT).
    message_timeout: float | None = attrs.field(
        default=None, validator=positive_or_none
    )
    #: Messages a connection's outgoing queue holds before ``send*`` waits.
    send_queue_size: int = attrs.field(
        default=DEFAULT_SEND_QUEUE_SIZE, validator=positive_int
    )
    #: Bytes a connection's outgoing queue holds before ``send*`` waits.
    send_queue_bytes: int = attrs.field(
        default=DEFAULT_SEND_QUEUE_BYTES, validator=positive_int
    )
    #: Bytes beyond ``send_queue_bytes`` that only :meth:`Server.broadcast`
    #: may use; a broadcast that would need more evicts the connection
    #: (SLOW_CONSUMER).
    broadcast_headroom: int = attrs.field(
        default=DEFAULT_BROADCAST_HEADROOM, validator=non_negative
    )
    #: Seconds a connection's queue may go without any byte written before
    #: the next broadcast evicts it as a slow consumer.
    stall_timeout: float = attrs.field(
        default=DEFAULT_STALL_TIMEOUT, validator=positive
    )
    #: Seconds handlers get to finish when the server shuts down.
    grace_period: float = attrs.field(default=5.0, validator=non_negative)
    #: Seconds a closing connection may spend flushing its queue.
    flush_timeout: float = attrs.field(
        default=DEFAULT_FLUSH_TIMEOUT, validator=non_negative
    )
    #: Seconds allowed for a TLS handshake (TIMEOUT after that), at
    #: connection time with ``ssl_context`` and in :meth:`Connection.start_tls`.
    handshake_timeout: float = attrs.field(
        default=DEFAULT_HANDSHAKE_TIMEOUT, validator=positive
    )
    #: Treat a TLS peer that closes without close_notify as an error (ERROR)
    #: even between messages.  By default that is a clean end (CLOSED_BY_PEER)
    #: at a message boundary, and an error (IncompleteMessage) inside one.
    require_close_notify: bool = False
    #: Called with each admitted connection before its handler runs.
    on_connect: Hook | None = None
    #: Called with each admitted connection once it is closed (close_reason set).
    on_close: Hook | None = None
    #: Set SO_REUSEPORT so several processes can listen on one port (TCP only).
    reuse_port: bool = False
    #: Kernel send buffer (SO_SNDBUF) of every connection; None keeps the
    #: kernel's autotuning.  Smaller bounds memory and finds slow consumers sooner.
    so_sndbuf: int | None = attrs.field(default=None, validator=positive_or_none)
    #: Kernel receive buffer (SO_RCVBUF) of every connection; None: autotuned.
    so_rcvbuf: int | None = attrs.field(default=None, validator=positive_or_none)
    #: Make :meth:`Server.broadcast` reach the clients of every server on the
    #: same backplane (other processes and hosts), for example a
    #: :class:`trionet.channels.RedisBackplane`.  See :doc:`/scaling`.
    backplane: Backplane | None = None


class _TransportOptionsDict(TypedDict, total=False):
    # Every server option but ``framing`` (which layers above may fix).
    ssl_context: ssl.SSLContext | None
    backlog: int | None
    accept: AcceptFilter | None
    max_connections: int | None
    idle_timeout: float | None
    message_timeout: float | None
    send_queue_size: int
    send_queue_bytes: int
    broadcast_headroom: int
    stall_timeout: float
    grace_period: float
    flush_timeout: float
    handshake_timeout: float
    require_close_notify: bool
    on_connect: Hook | None
    on_close: Hook | None
    reuse_port: bool
    so_sndbuf: int | None
    so_rcvbuf: int | None
    backplane: Backplane | None


class _OptionsDict(_TransportOptionsDict, total=False):
    framing: Framing | None


@attrs.frozen(kw_only=True)
class ServerStatistics:
    """A snapshot of a server's counters.

    .. versionadded:: 0.1
    """

    #: Connections admitted (past the accept filter and TLS handshake).
    accepted: int
    #: Clients refused by the accept filter.
    rejected: int
    #: Handlers that ended by raising an exception (not counting a
    #: connection's own end, such as the peer leaving).
    handler_errors: int
    #: Connections holding a slot now (counted against ``max_connections``):
    #: being admitted, served, or closing.
    open: int
    #: Of those, connections still in the accept filter or the TLS handshake.
    admitting: int
    #: Connections ended, by close reason (refused clients count as REJECTED).
    closed: Mapping[CloseReason, int]
    #: Bytes received on every connection, open or closed.
    bytes_received: int
    #: Bytes sent on every connection, open or closed.
    bytes_sent: int


def _own_end(conn: Connection) -> Callable[[BaseException], bool]:
    """Whether an exception is ``conn`` ending (the peer left, a timeout, a
    protocol error), which its close reason already records: no handler
    failure."""

    def is_own(exc: BaseException) -> bool:
        # (A ConnectError too: a start_tls whose handshake failed or timed out.)
        if not isinstance(exc, ConnectionClosed | ProtocolError | ConnectError):
            return False
        return conn.close_reason is not None or (
            conn.eof_received and isinstance(exc, ConnectionClosed)
        )

    return is_own


class Server:
    """A running TCP or UNIX socket server.  Get one from :func:`serve_tcp`,
    :func:`open_tcp_server`, :func:`serve_unix` or :func:`open_unix_server`.

    **Lifecycle.**

    ===========  =====================================  ===========================
    state        new clients                            handlers
    ===========  =====================================  ===========================
    serving      accepted (up to ``max_connections``)   run
    grace        refused: listeners closed; clients in  run for ``grace_period``
                 the filter or handshake are dropped
    closing      --                                     cancelled; flushes, TLS
                                                        closes and ``on_close``
                                                        hooks share
                                                        ``flush_timeout``
    stopped      --                                     all finished; ``serve_tcp``
                                                        returns
    ===========  =====================================  ===========================

    :meth:`aclose` moves serving → grace; a supervisor task inside
    :func:`serve_tcp` does the rest, so the shutdown completes even if the
    task that asked for it is cancelled or is one of the handlers.
    Cancelling ``serve_tcp`` itself skips the grace period and the flushes.
    A UNIX socket server removes its socket file when it enters grace (if
    the file is still the one it made).

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        listeners: list[Listener],
        handler: Handler,
        options: ServerOptions,
        nursery: trio.Nursery,
        socket_file: UnixSocketFile | None = None,
    ) -> None:
        self._listeners = listeners
        self._socket_file = socket_file
        self._handler = handler
        self._options = options
        self._nursery = nursery
        self._send_path = QueuedSendPath(
            nursery,
            SendLimits(
                queue_size=options.send_queue_size,
                queue_bytes=options.send_queue_bytes,
                broadcast_headroom=options.broadcast_headroom,
                stall_timeout=options.stall_timeout,
                flush_timeout=options.flush_timeout,
            ),
        )
        # Open connections (insertion-ordered).
        self._connections: dict[Connection, None] = {}
        # Where connection tasks run (a nursery inside ``nursery``, so that
        # shutdown cancels them all at once, and their writers not at all).
        self._handlers: trio.Nursery | None = None
        self._accept_ended = trio.Event()
        self._tasks = 0
        self._all_done = trio.Event()
        self._all_done.set()
        self._accepting = trio.CancelScope()
        # Shutdown: requested (by aclose), carried out by serve_tcp's task.
        self._close_requested = trio.Event()
        self._grace_deadline = math.inf
        self._grace_scope: trio.CancelScope | None = None
        self._closing = False
        # When shutdown stops waiting for closes and hooks (end of grace
        # period + flush_timeout); inf until then.
        self._hard_deadline = math.inf
        self._cleanup_scopes: set[trio.CancelScope] = set()
        self._admission_scopes: set[trio.CancelScope] = set()
        self._stopped = trio.Event()
        self._slots = (
            trio.Semaphore(options.max_connections) if options.max_connections else None
        )
        self._slots_held = 0
        self._admitting = 0
        self._accepted = 0
        self._rejected = 0
        self._closed: Counter[CloseReason] = Counter()
        self._bytes_received = 0
        self._bytes_sent = 0
        self._errors: deque[BaseException] = deque(maxlen=_ERRORS_KEPT)
        self._handler_errors = 0
        # (How start_tls upgrades this server's connections.)
        self._tls = TlsSettings(
            server_side=True,
            handshake_timeout=options.handshake_timeout,
            require_close_notify=options.require_close_notify,
        )
        self.addresses: list[Address] = [sock.getsockname() for sock in listeners]
        """Every bound address, as ``getsockname()`` gives it (a UNIX socket
        server's one address is its path)."""
        first = self.addresses[0]
        self.port: int | None = None if isinstance(first, str) else first[1]
        """The port, the same for every address; None for a UNIX socket server."""
        self.path: str | None = first if isinstance(first, str) else None
        """The socket file of a UNIX socket server; None for TCP."""
        self.framing = options.framing
        """The framing of every connection (and of :meth:`broadcast`)."""

    def __repr__(self) -> str:
        return f"<trionet.Server {self.addresses} open={len(self._connections)}>"

    @property
    def connections(self) -> list[Connection]:
        """A snapshot of the admitted connections that are not closed yet."""
        return list(self._connections)

    @property
    def handler_exceptions(self) -> list[BaseException]:
        """The most recent exceptions that escaped a handler (at most 100;
        :meth:`statistics` counts them all)."""
        return list(self._errors)

    def statistics(self) -> ServerStatistics:
        """A snapshot of the counters."""
        conns = self._connections
        return ServerStatistics(
            accepted=self._accepted,
            rejected=self._rejected,
            handler_errors=self._handler_errors,
            open=self._slots_held,
            admitting=self._admitting,
            closed=dict(self._closed),
            bytes_received=self._bytes_received + sum(c._bytes_received for c in conns),
            bytes_sent=self._bytes_sent + sum(c._bytes_sent for c in conns),
        )

    async def broadcast(self, message: bytes | bytearray | memoryview | str) -> None:
        """Send ``message`` to every open connection, without waiting on any.

        The message is encoded once with the server's framing (raw bytes when
        it has none).  It joins each connection's outgoing queue in order with
        that connection's own sends.  A broadcast may use the
        ``broadcast_headroom`` beyond the point where ``send*`` waits; a
        connection that would need more, or whose queue has not moved for
        ``stall_timeout``, is closed with :attr:`CloseReason.SLOW_CONSUMER`.
        Every other connection still gets the message.

        With a ``backplane``, the message is also published to every other
        server on that backplane, which deliver it to their own clients the
        same way (see :doc:`/scaling`).

        Raises:
            MessageTooLarge: the message does not fit the framing's limit or
                the backplane's; nobody was sent anything.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        framing = self._options.framing
        data = as_bytes(message) if framing is None else framing.encode(message)
        backplane = self._options.backplane
        if backplane is not None:
            backplane.publish(as_bytes(message))
        self._deliver(data)
        await trio.lowlevel.cancel_shielded_checkpoint()

    def _deliver(self, data: bytes) -> None:
        for conn in list(self._connections):
            conn._offer(data)

    def _adopt_handlers(self, handlers: trio.Nursery) -> None:
        self._handlers = handlers

    def _deliver_remote(self, message: bytes) -> None:
        # A message another server published on the backplane.
        framing = self._options.framing
        self._deliver(message if framing is None else framing.encode(message))

    # -------------------------------------------------------------- accepting

    async def _accept_all(self) -> None:
        try:
            with self._accepting:
                async with trio.open_nursery() as nursery:
                    for sock in self._listeners:
                        nursery.start_soon(self._accept_loop, sock)
        finally:
            self._close_listeners()
            self._accept_ended.set()

    def _close_listeners(self) -> None:
        for sock in self._listeners:
            _close_socket(sock)
        if self._socket_file is not None:
            self._socket_file.remove()

    async def _accept_loop(self, listener: Listener) -> None:
        slots = self._slots
        while True:
            # (The server may have been closed before this task first ran.)
            await trio.lowlevel.checkpoint_if_cancelled()
            if slots is None:
                accepted = await self._accept(listener)
                assert accepted is not None
                sock = accepted
            else:
                # Take a slot only once a client waits on *this* listener: a
                # listener nobody connects to must not hold one.
                await _wait_acceptable(listener)
                await slots.acquire()
                try:
                    accepted = await self._accept(listener, wait=False)
                except BaseException:
                    slots.release()
                    raise
                if accepted is None:
                    slots.release()
                    continue
                sock = accepted
            self._tasks += 1
            self._slots_held += 1
            self._all_done = trio.Event() if self._all_done.is_set() else self._all_done
            assert self._handlers is not None
            self._handlers.start_soon(self._run_connection, sock, name=_TASK_NAME)

    async def _accept(
        self, listener: Listener, *, wait: bool = True
    ) -> Accepted | None:
        """Accept one client; without ``wait``, None if none is waiting."""
        while True:
            try:
                sock, _address = _accept_nowait(listener)
            except BlockingIOError:
                if not wait:
                    return None
                await _wait_acceptable(listener)
                continue
            except OSError as exc:
                name = errno.errorcode.get(exc.errno or 0, exc.errno)
                if exc.errno in _ACCEPT_RESOURCE_ERRORS:
                    logger.error(
                        "accept on %s failed (%s); pausing %.2f s",
                        format_address(listener.getsockname()),
                        name,
                        ACCEPT_BACKOFF,
                    )
                    await trio.sleep(ACCEPT_BACKOFF)
                    continue
                if exc.errno in _ACCEPT_CLIENT_ERRORS:
                    # About one client that is already gone (or a firewall
                    # rule): the listener is fine.
                    logger.debug("accept: skipped one client (%s)", name)
                    await trio.lowlevel.checkpoint()
                    continue
                raise
            await trio.lowlevel.cancel_shielded_checkpoint()
            return sock

    # ------------------------------------------------------------ connections

    async def _admit(self, sock: Accepted) -> Connection | None:
        """Filter, handshake and wrap one accepted socket; None if it ends
        here.  Shutdown cancels this at once; the socket is closed whatever
        happens, unless a connection now owns it."""
        scope = trio.CancelScope()
        if self._closing:
            scope.cancel()
        self._admission_scopes.add(scope)
        self._admitting += 1
        conn = None
        try:
            with scope:
                conn = await self._open(sock)
            if scope.cancelled_caught:
                self._closed[CloseReason.SHUTDOWN] += 1
            return conn
        except OSError as exc:
            # The client left before we could look at it.
            logger.debug("connection lost while opening: %r", exc)
            self._closed[CloseReason.ERROR] += 1
            return None
        finally:
            self._admitting -= 1
            self._admission_scopes.discard(scope)
            if conn is None:
                _close_socket(sock)

    async def _open(self, sock: Accepted) -> Connection | None:
        options = self._options
        if options.accept is not None:
            try:
                address = _client_identity(sock)
                admitted = await call_maybe_async(options.accept, address)
            except Exception:
                logger.exception("accept filter failed; refusing the client")
                admitted = False
            if not admitted:
                self._rejected += 1
                self._closed[CloseReason.REJECTED] += 1
                _refuse(sock)
                return None
        transport: Transport = _plain_transport(sock)
        if options.ssl_context is not None:
            # A real socket: TlsTransport, on trionet's socket path; a
            # simulated one: trio.SSLStream (see Transport.upgraded).
            transport = transport.upgraded(
                options.ssl_context,
                server_side=True,
                server_hostname=None,
                require_close_notify=options.require_close_notify,
            )
            reason = None
            with trio.move_on_after(options.handshake_timeout) as scope:
                try:
                    await transport.do_handshake()
                except (trio.BrokenResourceError, OSError) as exc:
                    logger.info("TLS handshake failed: %r", exc.__cause__ or exc)
                    reason = CloseReason.ERROR
            if scope.cancelled_caught:
                logger.info("TLS handshake timed out")
                reason = CloseReason.TIMEOUT
            if reason is not None:
                self._closed[reason] += 1
                return None
        conn = Connection._over(transport, options.framing, self._send_path)
        conn._tls = self._tls
        conn.idle_timeout = options.idle_timeout
        conn.message_timeout = options.message_timeout
        conn._on_closed = self
        return conn

    def _connection_closed(self, conn: Connection) -> None:
        # The connection leaves the registry the moment it closes, whatever
        # its handler is doing.
        if conn in self._connections:
            del self._connections[conn]
            assert conn.close_reason is not None
            self._closed[conn.close_reason] += 1
            self._bytes_received += conn._bytes_received
            self._bytes_sent += conn._bytes_sent

    def _cleanup_scope(self, seconds: float) -> trio.CancelScope:
        """A shielded scope for closing work (flush, TLS close, on_close),
        ending after ``seconds`` or at the shutdown's hard deadline."""
        deadline = min(trio.current_time() + seconds, self._hard_deadline)
        scope = trio.CancelScope(shield=True, deadline=deadline)
        self._cleanup_scopes.add(scope)
        return scope

    async def _run_connection(self, sock: Accepted) -> None:
        # The one coroutine frame a connection holds for its whole life (and
        # trio keeps a frame object of the same size beside it), so it has
        # few locals and a shallow stack: what comes before and after the
        # handler runs in helpers whose frames are gone while it runs.
        try:
            conn = await self._admit(sock)
        except BaseException:
            self._task_done(holding_slot=True)
            raise
        if conn is None:
            self._task_done(holding_slot=True)
            return
        ended: BaseException | None = None
        try:
            await self._connected(conn)
            await self._handler(conn)
        except BaseException as exc:
            ended = exc
        try:
            await self._end_connection(conn, ended)
        finally:
            # (A traceback through this frame refers to it: no cycle.)
            del ended

    async def _connected(self, conn: Connection) -> None:
        """Register an admitted connection and call ``on_connect``."""
        self._connections[conn] = None
        self._accepted += 1
        on_connect = self._options.on_connect
        if on_connect is not None:
            await self._call_hook(on_connect, conn)

    async def _end_connection(
        self, conn: Connection, ended: BaseException | None
    ) -> None:
        """After the handler (``ended``: what it raised, if anything): flush
        and close, give up the slot, call ``on_close``; then re-raise a
        cancellation."""
        options = self._options
        cancelled: BaseException | None = None
        holding_slot = True
        try:
            reason = CloseReason.CLOSED_BY_HOST
            if isinstance(ended, Exception):
                if not only_own_end(ended, _own_end(conn)):
                    self._handler_failed(conn, ended)
            elif ended is not None:
                cancelled = ended
                reason = CloseReason.SHUTDOWN
                if not self._closing:
                    # Cancelled from outside: no flush, close at once.
                    conn._close_now(reason)
            # Flush what the handler queued, then close: bounded, and
            # shielded so that a shutdown's cancellation still lets it flush.
            scope = self._cleanup_scope(options.flush_timeout)
            try:
                await conn._finish(reason, scope)
            finally:
                self._cleanup_scopes.discard(scope)
            holding_slot = False
            self._release_slot()
            if options.on_close is not None:
                scope = self._cleanup_scope(math.inf)
                try:
                    with scope:
                        await self._call_hook(options.on_close, conn)
                finally:
                    self._cleanup_scopes.discard(scope)
        finally:
            self._task_done(holding_slot)
        if cancelled is not None:
            raise cancelled

    def _task_done(self, holding_slot: bool) -> None:
        if holding_slot:
            self._release_slot()
        self._tasks -= 1
        if self._tasks == 0:
            self._all_done.set()

    def _release_slot(self) -> None:
        self._slots_held -= 1
        if self._slots is not None:
            self._slots.release()

    def _handler_failed(self, conn: Connection, exc: BaseException) -> None:
        logger.error("handler for %r raised", conn, exc_info=exc)
        self._errors.append(exc)
        self._handler_errors += 1
        conn._close_now(CloseReason.ERROR)

    async def _call_hook(self, hook: Hook, conn: Connection) -> None:
        try:
            await call_maybe_async(hook, conn)
        except Exception:
            logger.exception(
                "%s hook failed for %r", getattr(hook, "__name__", hook), conn
            )

    # -------------------------------------------------------------- shutdown

    async def aclose(self, grace_period: float | None = None) -> None:
        """Shut down gracefully; return once every handler has finished.

        Stop accepting at once (clients still in the accept filter or the TLS
        handshake are dropped); give handlers ``grace_period`` seconds
        (default: the server's ``grace_period`` option) to finish; then cancel
        the rest.  Every connection flushes what it queued before it closes:
        within ``flush_timeout`` of its handler ending, and at the latest
        ``flush_timeout`` after the grace period, when whatever still runs --
        flushes, TLS closes, ``on_close`` hooks -- is cancelled.  So this
        returns within ``grace_period + flush_timeout`` (unless a handler
        ignores cancellation).  Connections closed by the shutdown end with
        :attr:`CloseReason.SHUTDOWN`.

        This only *asks* for the shutdown, which a supervisor task inside
        :func:`serve_tcp` carries out, and then waits for it.  The wait may be
        cancelled or abandoned (``with trio.move_on_after(...)``) and a handler
        of this server may call it: the shutdown completes regardless.  A
        second call waits for the same shutdown; a shorter ``grace_period``
        shortens it.
        """
        if grace_period is None:
            grace_period = self._options.grace_period
        elif not grace_period >= 0:
            raise ValueError(f"grace_period must be >= 0, not {grace_period!r}")
        deadline = trio.current_time() + grace_period
        if deadline < self._grace_deadline:
            self._grace_deadline = deadline
            if self._grace_scope is not None:
                self._grace_scope.deadline = deadline
        self._close_requested.set()
        await self._stopped.wait()

    async def _supervise(self) -> None:
        """Wait for :meth:`aclose` to be called, then carry the shutdown out."""
        await self._close_requested.wait()
        self._closing = True
        self._accepting.cancel()
        self._close_listeners()
        for scope in self._admission_scopes:
            scope.cancel()
        with trio.CancelScope(deadline=self._grace_deadline) as grace:
            self._grace_scope = grace
            await self._all_done.wait()
        self._grace_scope = None
        self._hard_phase()
        if self._handlers is not None:
            self._handlers.cancel_scope.cancel()
        await self._all_done.wait()

    def _hard_phase(self) -> None:
        """From now on closing work has ``flush_timeout`` seconds, no more."""
        hard = trio.current_time() + self._options.flush_timeout
        if hard < self._hard_deadline:
            self._hard_deadline = hard
            for scope in self._cleanup_scopes:
                scope.deadline = min(scope.deadline, hard)


#: Bytes a refused client may have sent that are read and discarded, so that
#: closing its socket sends a FIN rather than a reset.
_REFUSED_DRAIN = 256 * 1024


def _refuse(sock: Accepted) -> None:
    """End a refused client's connection with a FIN where the kernel allows.

    Closing a socket with unread bytes makes the kernel answer with a reset,
    which the client sees as an error, not as the end of the stream.  So
    read (and drop) what it already sent, up to a bound, then send the FIN;
    the caller closes the socket.
    """
    if not isinstance(sock, socket.socket):
        sock.refuse()
        return
    try:
        sock.setblocking(False)
        left = _REFUSED_DRAIN
        while left > 0:
            data = sock.recv(min(left, 65536))
            if not data:
                break
            left -= len(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:  # (BlockingIOError once drained, or a client gone)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)


def _accept_nowait(listener: Listener) -> tuple[Accepted, Address]:
    # (A function of its own so that tests can inject accept errors.)
    return listener.accept()


# A server's listeners and accepted clients are sockets -- or, under a
# simulated network (trionet/_network.py), objects of its own.  These are
# the only places that tell the two apart.


async def _wait_acceptable(listener: Listener) -> None:
    if isinstance(listener, socket.socket):
        await trio.lowlevel.wait_readable(listener)
    else:
        await listener.wait_acceptable()


def _close_socket(sock: Listener | Accepted) -> None:
    """Close a listener or an accepted client at once (trio first, so that
    a task waiting on the socket wakes)."""
    if not isinstance(sock, socket.socket):
        sock.close()
    elif sock.fileno() >= 0:
        trio.lowlevel.notify_closing(sock)
        sock.close()


def _plain_transport(sock: Accepted) -> SocketTransport | StreamTransport:
    if isinstance(sock, socket.socket):
        return SocketTransport(sock)
    return SimulatedTransport(sock)


def _client_identity(sock: Accepted) -> Address:
    """What the accept filter is given: a UNIX socket client's credentials
    (its address is nearly always empty), else its address."""
    if not isinstance(sock, socket.socket):
        _local, remote, credentials = sock.endpoints()
        identity = credentials or remote
        assert identity is not None
        return identity
    return peer_credentials(sock) or sock.getpeername()


async def serve_tcp(
    handler: Handler,
    port: int,
    *,
    host: str | Sequence[str] | None = None,
    handler_nursery: trio.Nursery | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
    **options: Unpack[_OptionsDict],
) -> None:
    """Serve TCP: run ``handler(conn)`` in a task of its own for each client.

    Use it trio-style; it runs until cancelled or until
    :meth:`Server.aclose` returns::

        server = await nursery.start(trionet.serve_tcp, handler, 0)
        print(server.port)

    Args:
        handler: ``async def handler(conn: trionet.Connection)``.  When it
            returns the connection is closed (CLOSED_BY_HOST unless the peer
            closed first); an exception escaping it is logged on the
            ``"trionet"`` logger and closes only that connection (ERROR).
        port: TCP port; 0 picks a free one, shared by every listen address.
        host: address or name to listen on, or a sequence of them.  None
            (the default, as in trio) listens on every interface, IPv4 and
            IPv6; pass ``"127.0.0.1"`` to accept only local clients.
        handler_nursery: run connection tasks inside this nursery instead of
            the server's own (in one inner nursery that the server's shutdown
            cancels after the grace period).
        **options: see :class:`ServerOptions` (framing, ssl_context, backlog,
            accept, max_connections, idle_timeout, message_timeout,
            send_queue_size, grace_period, flush_timeout, handshake_timeout,
            on_connect, on_close, reuse_port, so_sndbuf, so_rcvbuf,
            backplane).

    .. versionadded:: 0.1
    """
    opts = ServerOptions(**options)
    hosts: list[str | None] = (
        [host] if host is None or isinstance(host, str) else list(host)
    )
    listeners = await open_listeners(
        hosts,
        port,
        backlog=opts.backlog,
        reuse_port=opts.reuse_port,
        so_sndbuf=opts.so_sndbuf,
        so_rcvbuf=opts.so_rcvbuf,
    )
    await _serve(handler, listeners, opts, handler_nursery, task_status)


async def serve_unix(
    handler: Handler,
    path: str | os.PathLike[str],
    *,
    mode: int = 0o600,
    handler_nursery: trio.Nursery | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
    **options: Unpack[_OptionsDict],
) -> None:
    """Serve on a UNIX domain socket: :func:`serve_tcp` for local clients.

    The same server in every respect -- options, receive modes, TLS,
    statistics, shutdown -- listening on a socket file instead of a port::

        server = await nursery.start(
            functools.partial(trionet.serve_unix, handler, "/run/app.sock")
        )

    The socket file:

    * is created with the permission bits ``mode`` (default 0o600: only
      this user may connect), never more open than that, not even for a
      moment;
    * replaces a socket file left behind by a server that is gone (nothing
      accepts connections on it);
    * is never taken from a live server: if one listens on ``path``, this
      raises :class:`OSError` (``EADDRINUSE``); a file at ``path`` that is
      not a socket is never touched (``EEXIST``);
    * is removed when the server stops listening, if it is still the one
      this server made.

    The ``accept`` filter gets the client's :class:`PeerCredentials` (pid,
    uid, gid) where the system reports them (Linux), so that a server can
    refuse other users; each connection has them as
    :attr:`Connection.peer_credentials`.  :attr:`Server.port` is None and
    :attr:`Server.path` the path.

    Args:
        handler: as for :func:`serve_tcp`.
        path: where the socket file goes (a path in the file system; the
            directory must exist).
        mode: the socket file's permission bits.  Connecting needs write
            permission: 0o660 lets the file's group in too.
        handler_nursery: as for :func:`serve_tcp`.
        **options: see :class:`ServerOptions`; all apply except
            ``reuse_port``.

    Raises:
        OSError: the path is in use by a live server (EADDRINUSE), is not a
            socket (EEXIST), or cannot be bound.
        ValueError: ``reuse_port`` was given, or ``mode`` or ``path`` is
            invalid.

    .. versionadded:: 0.1
    """
    opts = ServerOptions(**options)
    if opts.reuse_port:
        raise ValueError("reuse_port does not apply to UNIX sockets")
    listener, socket_file = open_unix_listener(
        path,
        mode=mode,
        backlog=opts.backlog,
        so_sndbuf=opts.so_sndbuf,
        so_rcvbuf=opts.so_rcvbuf,
    )
    try:
        await _serve(
            handler, [listener], opts, handler_nursery, task_status, socket_file
        )
    finally:
        if socket_file is not None:
            socket_file.remove()


async def _serve(
    handler: Handler,
    listeners: list[Listener],
    opts: ServerOptions,
    handler_nursery: trio.Nursery | None,
    task_status: trio.TaskStatus[Server],
    socket_file: UnixSocketFile | None = None,
) -> None:
    """Everything a server does once its listening sockets are open: the
    body of :func:`serve_tcp` and :func:`serve_unix` alike.  The listeners
    are closed when this returns, however it ends."""
    server: Server | None = None
    try:
        # (An error of the backplane at start, or of an accept loop, reaches
        # the caller as itself, not in a one-exception group.)
        with unwrap_single_exception():
            async with trio.open_nursery() as own_nursery:
                server = Server(
                    listeners,
                    handler,
                    opts,
                    handler_nursery or own_nursery,
                    socket_file,
                )
                if opts.backplane is not None:
                    await own_nursery.start(
                        opts.backplane.serve, server._deliver_remote
                    )
                await (handler_nursery or own_nursery).start(
                    host_handlers, server._adopt_handlers, server._accept_ended
                )
                own_nursery.start_soon(server._accept_all)
                task_status.started(server)
                try:
                    await server._supervise()
                except BaseException:
                    # Cancelled from outside: handlers are cancelled at once and
                    # close without flushing; on_close hooks get flush_timeout.
                    server._hard_phase()
                    raise
                if opts.backplane is not None:
                    await opts.backplane.flush(opts.flush_timeout)
                own_nursery.cancel_scope.cancel()
    finally:
        for sock in listeners:
            _close_socket(sock)
        if server is not None:
            server._stopped.set()


@asynccontextmanager
async def open_tcp_server(
    handler: Handler,
    port: int = 0,
    *,
    host: str | Sequence[str] | None = None,
    **options: Unpack[_OptionsDict],
) -> AsyncIterator[Server]:
    """A TCP server scoped to an ``async with`` block.

    ::

        async with trionet.open_tcp_server(handler, framing=trionet.Lines()) as server:
            async with trionet.connect_tcp("127.0.0.1", server.port) as conn:
                ...

    Leaving the block shuts the server down gracefully (see
    :meth:`Server.aclose`; the ``grace_period`` option sets how long).
    Exceptions raised in the block reach the caller as themselves.  Takes the
    same arguments as :func:`serve_tcp`; like it, it listens on every
    interface unless ``host`` says otherwise (``host="127.0.0.1"`` keeps the
    server on this machine).

    .. versionadded:: 0.1
    """
    async with server_in_block(
        serve_tcp, handler, port, host=host, **options
    ) as server:
        yield server


@asynccontextmanager
async def open_unix_server(
    handler: Handler,
    path: str | os.PathLike[str],
    *,
    mode: int = 0o600,
    **options: Unpack[_OptionsDict],
) -> AsyncIterator[Server]:
    """A UNIX domain socket server scoped to an ``async with`` block.

    ::

        async with trionet.open_unix_server(handler, "/tmp/app.sock") as server:
            async with trionet.connect_unix(server.path) as conn:
                ...

    Leaving the block shuts the server down gracefully and removes the
    socket file.  Takes the same arguments as :func:`serve_unix`.

    .. versionadded:: 0.1
    """
    async with server_in_block(
        serve_unix, handler, path, mode=mode, **options
    ) as server:
        yield server
