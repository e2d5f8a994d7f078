"""UDP servers: one task per remote peer.

How this works
--------------

:func:`serve_udp` binds one non-blocking socket per address family and runs
one *reader* task per socket.  Each time the socket becomes readable the
reader drains it: ``recvfrom`` until the kernel has nothing more (at most
:data:`READ_BATCH` datagrams, then it lets the handlers run and goes on),
with one clock reading for the whole batch.  It never waits for a handler:
it looks the sender's address up in a dict of :class:`UdpPeer` objects and
appends the datagram to that peer's queue, a deque bounded in datagrams
(``queue_size``) and in bytes (``queue_bytes``).  A full queue means that
peer's handler is behind, so the datagram is dropped and counted, as the
network itself would drop it.  Only a handler *waiting* for a datagram is
woken (``trio.lowlevel.reschedule``, one waiting receive per datagram); a
handler that is busy finds the next datagrams in its queue when it asks,
without a trip through the scheduler, so a batch of datagrams from one peer
costs that peer's task one wake-up, not one per datagram.  Each handler reads
its own queue, so it sees its peer's datagrams in arrival order, and a slow
handler only ever delays itself.

Under a simulated network (:func:`trionet.testing.memory_network`) the
sockets are the network's, bound by it, and each :class:`_ServerSocket` keeps
the waits ``_common.waits_for`` gave it when it was made: the reader and the
peers' senders wait with those, and nothing else differs.

Receives and sends follow the fast path described in ``_common``: a receive
from a non-empty queue and a ``sendto`` the kernel takes at once do not
wait, and pass through the scheduler once per ``SCHEDULE_EVERY`` calls.
Cancellation: a receive is cancelled only at its start or while it waits,
never after it took a datagram from the queue, so a cancelled receive leaves
every queued datagram in place and in order; a send is cancelled only before
its ``sendto`` or while the kernel's buffer is full (nothing was sent).
Senders of all peers of one socket that have to wait queue in one FIFO
:class:`~trionet._udp._common.WaitLine`.

Idle timeouts cost nothing per datagram: a receive that has to wait puts its
peer on the server's watch list, and one *idle watcher* task sleeps until the
earliest ``last arrival + idle_timeout`` of the watched peers, closes the
peers whose time is up (:attr:`CloseReason.TIMEOUT`), which wakes their
receives, and sleeps again.  A receive that starts when its peer has been
silent for longer already (its handler was busy elsewhere) moves the
watcher's deadline into the past: it times out at the same clock time.

Admission.  An unknown address starts a new handler task, unless
``max_peers`` handlers hold a slot.  Then the least recently active open peer
(the dict is kept in order of last arrival) is evicted if no datagram came
from it for ``EVICTION_IDLE`` seconds: it is closed with
:attr:`CloseReason.TIMEOUT`, its handler is cancelled and its slot goes to the
newcomer.  Otherwise the datagram is refused and counted.  So a spray of
source ports holds the server's slots only for as long as it keeps sending,
and never locks new peers out for good.

A peer records one :class:`CloseReason`, the first that happens: idle timeout
(checked by :meth:`UdpPeer.receive`), eviction, :meth:`UdpPeer.aclose`, the
handler raising or returning, or the server shutting down.  A closed peer is
forgotten at once, so the next datagram from its address starts a fresh
handler.

Shutdown.  The handlers run in one nursery of the server's own (inside
``handler_nursery`` when one is given).  :meth:`UdpServer.aclose` only
*requests* the shutdown and waits for it to be over; the body of
:func:`serve_udp` carries it out: stop admitting peers, wait up to the grace
period for the handlers (peers still send and receive meanwhile), close every
open peer with SHUTDOWN, cancel the handlers' nursery, close the sockets, wait
for the handlers to finish.  Abandoning the wait in ``aclose`` (a cancelled
caller, or a handler of this very server, cancelled after the grace period)
leaves the shutdown running.  If :func:`serve_udp` itself is cancelled, the
same clean-up happens at once, without a grace period.
"""

from __future__ import annotations

import logging
import math
import socket
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, NoReturn, TypeAlias, TypedDict, final

import attrs
import trio

from .._exceptions import (
    CloseReason,
    ConnectionClosed,
    DatagramTooLarge,
)
from .._listeners import bind_sockets, reuse_port_option
from .._network import current_network
from .._options import non_negative, port_number, positive_int, positive_or_none
from .._util import format_address, host_handlers, only_own_end, server_in_block
from ._common import (
    DEFAULT_MAX_SIZE,
    ICMP_ERRNOS,
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
    set_buffer_sizes,
    translate,
    waits_for,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "EVICTION_IDLE",
    "READ_BATCH",
    "UdpPeer",
    "UdpServer",
    "UdpServerOptions",
    "UdpServerStatistics",
    "open_udp_server",
    "serve_udp",
]

logger = logging.getLogger("trionet")

# Looked up once: these are on the path of every datagram.
_checkpoint_if_cancelled = trio.lowlevel.checkpoint_if_cancelled
_current_task = trio.lowlevel.current_task
_wait_task_rescheduled = trio.lowlevel.wait_task_rescheduled
_reschedule = trio.lowlevel.reschedule
_ABORTED = trio.lowlevel.Abort.SUCCEEDED

UdpHandler: TypeAlias = Callable[["UdpPeer"], Awaitable[object]]
_Item: TypeAlias = bytes | DatagramTooLarge

#: Seconds without a datagram after which a peer times out, by default.
DEFAULT_IDLE_TIMEOUT = 60.0
#: At the ``max_peers`` cap, a peer silent for this many seconds (or for
#: ``idle_timeout``, if that is shorter) may be evicted to admit a new one.
EVICTION_IDLE = 5.0
#: Handler exceptions a server remembers for inspection.
_EXCEPTIONS_KEPT = 100
#: Datagrams a reader takes from its socket before it lets other tasks run.
READ_BATCH = 64


@attrs.frozen(kw_only=True)
class UdpServerOptions:
    """Everything a UDP server can be configured with.

    :func:`serve_udp` and :func:`open_udp_server` take these as keyword
    arguments; the class validates them and documents the defaults.  Per
    peer the server queues at most ``queue_size`` datagrams and
    ``queue_bytes`` bytes (a datagram is always taken into an empty queue,
    so one of ``max_size`` fits whatever ``queue_bytes`` says); with
    ``max_peers`` peers that bounds what all queues hold together.

    .. versionadded:: 0.1
    """

    #: Seconds without a datagram from a peer after which its receive raises
    #: :class:`ConnectionClosed` (:attr:`CloseReason.TIMEOUT`); None: never.
    idle_timeout: float | None = attrs.field(
        default=DEFAULT_IDLE_TIMEOUT, validator=positive_or_none
    )
    #: Datagrams queued per peer; more are dropped and counted.
    queue_size: int = attrs.field(default=256, validator=positive_int)
    #: Bytes queued per peer; more are dropped and counted.
    queue_bytes: int = attrs.field(default=1024 * 1024, validator=positive_int)
    #: Most handlers running at once.  At the cap, the least recently active
    #: peer, if idle for 5 seconds (or ``idle_timeout``, if shorter), is
    #: evicted (:attr:`CloseReason.TIMEOUT`, its handler cancelled) to admit
    #: a new one.
    max_peers: int = attrs.field(default=1024, validator=positive_int)
    #: The largest datagram accepted or sent, in bytes (at most 65507 over
    #: IPv4, 65527 over IPv6).
    max_size: int = attrs.field(default=DEFAULT_MAX_SIZE, validator=datagram_size)
    #: Seconds handlers get to finish when the server shuts down.
    grace_period: float = attrs.field(default=5.0, validator=non_negative)
    #: Set SO_REUSEPORT so several processes (or servers) can bind the same
    #: port; the kernel spreads remote addresses over them.
    reuse_port: bool = attrs.field(
        default=False, validator=attrs.validators.instance_of(bool)
    )
    #: Kernel receive buffer (SO_RCVBUF) of each socket, in bytes; None keeps
    #: the system default (about 200 KiB on Linux).  Datagrams arriving while
    #: it is full are dropped by the kernel, uncounted here: a server that
    #: takes bursts from many peers wants more (Linux caps it at
    #: ``net.core.rmem_max``).
    so_rcvbuf: int | None = attrs.field(default=None, validator=buffer_size)
    #: Kernel send buffer (SO_SNDBUF) of each socket, in bytes; None keeps
    #: the system default.
    so_sndbuf: int | None = attrs.field(default=None, validator=buffer_size)


class _UdpOptionsDict(TypedDict, total=False):
    # The keyword arguments of serve_udp: UdpServerOptions' fields (a test
    # checks that the two agree).
    idle_timeout: float | None
    queue_size: int
    queue_bytes: int
    max_peers: int
    max_size: int
    grace_period: float
    reuse_port: bool
    so_rcvbuf: int | None
    so_sndbuf: int | None


@attrs.frozen(kw_only=True)
class UdpServerStatistics:
    """A snapshot of a :class:`UdpServer`'s counters.

    .. versionadded:: 0.1
    """

    received: int
    """Datagrams read from the server's sockets."""
    dropped: int
    """Datagrams discarded because their peer's queue was full (in datagrams
    or in bytes), or still queued when their peer closed."""
    peers_rejected: int
    """Datagrams from new peers refused: ``max_peers`` handlers were running
    and no peer was idle long enough to evict, or the server was shutting
    down."""
    peers_evicted: int
    """Idle peers closed (:attr:`CloseReason.TIMEOUT`) at the ``max_peers``
    cap to admit a new one."""
    oversized: int
    """Datagrams larger than ``max_size`` (each reported to its peer's handler
    as :class:`DatagramTooLarge`)."""
    receive_errors: int
    """Network errors (such as ICMP reports) the readers counted and read past."""
    peers_started: int
    """Handler tasks started, in total."""
    handler_errors: int
    """Handlers that failed: ended by raising an exception other than the end
    of their own peer."""
    open_peers: int
    """Peers open right now."""


class _ServerSocket:
    """One bound non-blocking socket of a server, how to wait for it, and
    the line of its peers' senders that have to wait for it."""

    __slots__ = ("local_address", "senders", "sock", "wait_readable", "wait_writable")

    def __init__(self, sock: UdpSocket) -> None:
        self.sock = sock
        self.local_address: Address = sock.getsockname()
        self.wait_readable, self.wait_writable = waits_for(sock)
        self.senders = WaitLine()


@final
class UdpPeer:
    """One remote address talking to a :func:`serve_udp` server.

    The server makes one per remote address and passes it to the handler.
    Datagrams come out of :meth:`receive` (or ``async for data in peer``) in
    the order they arrived.  Both :meth:`receive` and :meth:`send` are cancel
    points; a cancelled receive has taken no datagram (the queued ones stay,
    in order), a cancelled send has sent nothing.

    .. versionadded:: 0.1
    """

    def __init__(
        self, server: UdpServer, endpoint: _ServerSocket, address: Address, now: float
    ) -> None:
        self._server = server
        self._endpoint = endpoint
        self._address = address
        # Datagrams (and DatagramTooLarge reports) not yet received, and
        # their bytes; the reader bounds both.
        self._queue: deque[_Item] = deque()
        self._queued_bytes = 0
        # Tasks whose receive waits for the queue to fill (or the peer to
        # close), first come first served; the reader wakes one per datagram.
        self._receivers: deque[trio.lowlevel.Task] = deque()
        self._pacer = Pacer()
        self._max_size = server._options.max_size
        self._close_reason: CloseReason | None = None
        # Set when the idle watcher closed the peer (its receive says so).
        self._idle_expired = False
        self._last_arrival = now
        # The handler runs in this scope; eviction cancels it.
        self._scope = trio.CancelScope()
        # Whether the handler still holds one of the server's max_peers slots.
        self._holds_slot = True

    def __repr__(self) -> str:
        state = "open" if self._close_reason is None else self._close_reason.value
        return f"<trionet.UdpPeer {format_address(self._address)} {state}>"

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
                then closed) or the peer was evicted; with
                :attr:`~CloseReason.SHUTDOWN` when the server stopped; with the
                peer's close reason once it is closed.
            DatagramTooLarge: the peer sent a datagram over ``max_size``, at this
                point in its sequence; the peer stays open.
        """
        await _checkpoint_if_cancelled()
        # A closed peer's queue is empty (and stays so): a queued item means
        # the peer is open.  Once taken, nothing may raise Cancelled.
        item = self._take() if self._queue else await self._wait_for_datagram()
        if self._pacer.left <= 0:
            await self._pacer.pause()
        return item if type(item) is bytes else self._raise_item(item)

    def _raise_item(self, item: _Item) -> NoReturn:
        assert isinstance(item, DatagramTooLarge)
        raise item

    def _take(self) -> _Item:
        item = self._queue.popleft()
        if type(item) is bytes:
            self._queued_bytes -= len(item)
        self._pacer.left -= 1
        return item

    async def _wait_for_datagram(self) -> _Item:
        """Wait for the empty queue to fill; take the first datagram.

        A cancellation can only strike while waiting, before anything was
        taken.  The idle watcher (or any close) ends the wait by closing the
        peer.
        """
        task = _current_task()
        receivers = self._receivers

        def abort(raise_cancel: object) -> trio.lowlevel.Abort:
            receivers.remove(task)
            return _ABORTED

        while True:
            if self._close_reason is not None:
                raise self._closed_error()
            if self._server._idle_timeout is not None:
                self._server._watch(self)
            receivers.append(task)
            await _wait_task_rescheduled(abort)
            self._pacer.refill()
            if self._queue:
                return self._take()
            # Woken by a close, or another receive of this peer took the
            # datagram first.

    async def send(self, data: Payload) -> None:
        """Send one datagram to the peer (``str`` as UTF-8).

        Raises:
            MessageTooLarge: ``data`` is longer than ``max_size``; nothing was
                sent.
            DatagramError: the OS refused the send.
            ConnectionClosed: the peer is closed (see :attr:`close_reason`).
        """
        if type(data) is not bytes or len(data) > self._max_size:
            data = checked_payload(data, self._max_size)
        await _checkpoint_if_cancelled()
        endpoint = self._endpoint
        if endpoint.senders.count or not self._send_nowait(data):
            await self._send_waiting(data)
        elif self._pacer.left <= 0:
            await self._pacer.pause()

    async def _send_waiting(self, payload: bytes) -> None:
        # The slow path: the kernel's buffer is full, or others wait to send
        # on this socket.
        try:
            await self._endpoint.senders.retry(
                self._endpoint.wait_writable,
                self._endpoint.sock,
                lambda: self._send_nowait(payload) or None,
                self._pacer,
            )
        except trio.ClosedResourceError:
            raise self._closed_error() from None

    def _send_nowait(self, payload: bytes) -> bool:
        """Hand ``payload`` to the kernel; False if it would block."""
        if self._close_reason is not None:
            raise self._closed_error()
        try:
            # The address came from recvfrom: sendto needs no name lookup.
            self._endpoint.sock.sendto(payload, self._address)
        except BlockingIOError:
            return False
        except OSError as exc:
            if self._close_reason is not None:
                raise self._closed_error() from None
            raise translate(exc, "send", self._address) from exc
        self._pacer.left -= 1
        return True

    def __aiter__(self) -> UdpPeer:
        return self

    async def __anext__(self) -> bytes:
        """``async for data in peer``: raises what :meth:`receive` raises.

        The loop ends quietly only after :meth:`aclose`; an idle timeout or a
        server shutdown raises :class:`ConnectionClosed`.
        """
        # receive() without a coroutine of its own: this is the loop of
        # every handler.
        await _checkpoint_if_cancelled()
        try:
            item = self._take() if self._queue else await self._wait_for_datagram()
            if self._pacer.left <= 0:
                await self._pacer.pause()
            return item if type(item) is bytes else self._raise_item(item)
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
        if self._idle_expired:
            return ConnectionClosed(
                CloseReason.TIMEOUT,
                f"no datagram from {format_address(self._address)} "
                f"for {self._server._options.idle_timeout} seconds",
            )
        return ConnectionClosed(self._close_reason or CloseReason.SHUTDOWN)

    def _is_own_end(self, exc: BaseException) -> bool:
        """Whether ``exc`` reports this peer's own end, not a handler failure:
        its own ConnectionClosed, or a ProtocolError about what it sent."""
        if isinstance(exc, ConnectionClosed):
            return self._close_reason is not None and exc.reason is self._close_reason
        return isinstance(exc, DatagramTooLarge) and exc.address == self._address


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
        options: UdpServerOptions,
    ) -> None:
        self._sockets = sockets
        self._handler = handler
        self._options = options
        idle_timeout = options.idle_timeout
        self._evict_after = min(
            EVICTION_IDLE, math.inf if idle_timeout is None else idle_timeout
        )
        # Open peers, least recently active first.
        self._peers: OrderedDict[Address, UdpPeer] = OrderedDict()
        # Where handlers run: a nursery of the server's own (inside
        # handler_nursery if given), open until admission has ended.
        self._handlers: trio.Nursery | None = None
        self._admitting = True
        self._admission_ended = trio.Event()
        self._slots_used = 0
        self._tasks = 0
        self._all_done = trio.Event()
        self._all_done.set()
        self._close_requested = trio.Event()
        # The grace period: its deadline is set by aclose() (the earliest wins).
        self._grace = trio.CancelScope()
        self._stopped = trio.Event()
        # Peers whose receive waited for a datagram since the idle watcher
        # last looked (it forgets those no longer waiting).  It sleeps in
        # _idle_timer until _idle_wake_at, the earliest deadline it knows
        # of; _idle_watch ends it at shutdown.
        self._waiting: dict[UdpPeer, None] = {}
        self._idle_timeout = options.idle_timeout
        self._idle_wake_at = math.inf
        self._idle_timer = trio.CancelScope()
        self._idle_watch = trio.CancelScope()
        self._received = 0
        self._dropped = 0
        self._peers_rejected = 0
        self._peers_evicted = 0
        self._oversized = 0
        self._receive_errors = 0
        self._peers_started = 0
        self._handler_errors = 0
        self._exceptions: deque[BaseException] = deque(maxlen=_EXCEPTIONS_KEPT)

    def __repr__(self) -> str:
        where = ", ".join(format_address(a) for a in self.addresses)
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
    def options(self) -> UdpServerOptions:
        """The options the server runs with."""
        return self._options

    @property
    def idle_timeout(self) -> float | None:
        """Seconds without a datagram after which a peer's receive times out."""
        return self._options.idle_timeout

    @property
    def queue_size(self) -> int:
        """Datagrams buffered per peer before more are dropped."""
        return self._options.queue_size

    @property
    def max_peers(self) -> int:
        """Most handlers running at once."""
        return self._options.max_peers

    @property
    def max_size(self) -> int:
        """The largest datagram accepted or sent, in bytes."""
        return self._options.max_size

    @property
    def handler_exceptions(self) -> list[BaseException]:
        """The most recent exceptions that escaped a handler (at most 100).

        The end of a handler's own peer (its :class:`ConnectionClosed`, or a
        :class:`DatagramTooLarge` it sent), alone or in an exception group,
        is not among them.
        """
        return list(self._exceptions)

    def statistics(self) -> UdpServerStatistics:
        """A snapshot of the counters."""
        return UdpServerStatistics(
            received=self._received,
            dropped=self._dropped,
            peers_rejected=self._peers_rejected,
            peers_evicted=self._peers_evicted,
            oversized=self._oversized,
            receive_errors=self._receive_errors,
            peers_started=self._peers_started,
            handler_errors=self._handler_errors,
            open_peers=len(self._peers),
        )

    async def aclose(self, grace_period: float | None = None) -> None:
        """Shut down gracefully, and wait until the server has stopped.

        Stop admitting new peers at once; give running handlers
        ``grace_period`` seconds (default: the server's ``grace_period``
        option) to finish while their peers go on sending and receiving;
        then close every peer still open with :attr:`CloseReason.SHUTDOWN`,
        cancel the remaining handlers and close the sockets.  Returns when
        every handler has finished and :func:`serve_udp` is returning.

        The shutdown is carried out by :func:`serve_udp`; this only asks for
        it.  If this wait is cancelled (or a handler of this server calls
        it, and is cancelled after the grace period), the shutdown still
        completes.  A second call waits for the same shutdown; a shorter
        grace period given later shortens it.
        """
        if grace_period is None:
            grace_period = self._options.grace_period
        check_argument(non_negative, "grace_period", grace_period)
        self._grace.deadline = min(
            self._grace.deadline, trio.current_time() + grace_period
        )
        self._close_requested.set()
        await self._stopped.wait()

    # ------------------------------------------------------------- shutdown

    def _adopt(self, handlers: trio.Nursery) -> None:
        self._handlers = handlers

    async def _supervise(self) -> None:
        """The shutdown, once requested: the rest of serve_udp's body."""
        await self._close_requested.wait()
        self._stop_admitting()
        with self._grace:
            await self._all_done.wait()
        self._close_now()
        await self._all_done.wait()

    def _stop_admitting(self) -> None:
        self._admitting = False
        self._admission_ended.set()

    def _close_now(self) -> None:
        """Close every peer (SHUTDOWN), cancel the handlers, close the sockets."""
        self._stop_admitting()
        for peer in list(self._peers.values()):
            self._close_peer(peer, CloseReason.SHUTDOWN)
        if self._handlers is not None:
            self._handlers.cancel_scope.cancel()
        self._idle_watch.cancel()
        for endpoint in self._sockets:
            close_socket(endpoint.sock)

    # --------------------------------------------------------- idle timeout

    def _watch(self, peer: UdpPeer) -> None:
        """A receive of ``peer`` is about to wait: it times out
        ``idle_timeout`` seconds after the peer's last datagram, unless one
        arrives first.  (No clock reading here: a deadline already past
        wakes the watcher at once.)"""
        assert self._idle_timeout is not None
        self._waiting[peer] = None
        deadline = peer._last_arrival + self._idle_timeout
        if deadline < self._idle_wake_at:
            self._idle_wake_at = deadline
            self._idle_timer.deadline = deadline

    async def _expire_idle(self, idle_timeout: float) -> None:
        """The idle watcher: close waiting peers idle for ``idle_timeout``."""
        with self._idle_watch:
            while True:
                now = trio.current_time()
                wake_at = math.inf
                for peer in list(self._waiting):
                    if not peer._receivers:
                        # Not waiting any more: a datagram came (or the
                        # receive was cancelled).  It comes back if it waits.
                        del self._waiting[peer]
                        continue
                    # The deadline only ever moves later as datagrams come.
                    deadline = peer._last_arrival + idle_timeout
                    if deadline > now:
                        wake_at = min(wake_at, deadline)
                    elif peer._queue:
                        # A receive was woken for it and has yet to run:
                        # never drop what came; look again later.
                        wake_at = min(wake_at, now + idle_timeout)
                    else:
                        peer._idle_expired = True
                        self._close_peer(peer, CloseReason.TIMEOUT)
                self._idle_wake_at = wake_at
                self._idle_timer = trio.CancelScope(deadline=wake_at)
                with self._idle_timer:
                    await trio.sleep_forever()

    # ------------------------------------------------------------ datagrams

    async def _read(self, endpoint: _ServerSocket) -> None:
        """The reader of one socket: drain it per wake-up, queue each datagram
        for its peer.  (The datagram path of the whole server: kept in one
        function.)"""
        sock = endpoint.sock
        wait_readable = endpoint.wait_readable
        options = self._options
        max_size = options.max_size
        queue_size = options.queue_size
        queue_bytes = options.queue_bytes
        receive = sock.recvfrom
        bufsize = max_size + 1
        peers = self._peers
        reschedule = _reschedule
        item: _Item
        while True:
            now = trio.current_time()  # one reading for the whole batch
            for _ in range(READ_BATCH):
                try:
                    data, address = receive(bufsize, RECEIVE_FLAGS)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if sock.fileno() < 0:
                        return
                    if exc.errno in ICMP_ERRNOS:
                        self._receive_errors += 1
                        continue
                    raise
                self._received += 1
                size = len(data)
                if size <= max_size:
                    item = data
                else:
                    self._oversized += 1
                    item = DatagramTooLarge(address, reported_size(size), max_size)
                    size = 0
                peer = peers.get(address)
                if peer is None:
                    peer = self._admit(endpoint, address, now)
                    if peer is None:
                        self._peers_rejected += 1
                        continue
                else:
                    peers.move_to_end(address)
                peer._last_arrival = now
                queue = peer._queue
                queued = peer._queued_bytes
                if len(queue) >= queue_size or (queued and queued + size > queue_bytes):
                    self._dropped += 1
                    continue
                queue.append(item)
                peer._queued_bytes = queued + size
                if peer._receivers:
                    reschedule(peer._receivers.popleft())
            else:
                # A full batch: let the handlers run, then read on.
                await trio.lowlevel.cancel_shielded_checkpoint()
                continue
            try:
                await wait_readable(sock)
            except trio.ClosedResourceError:
                return

    def _admit(
        self, endpoint: _ServerSocket, address: Address, now: float
    ) -> UdpPeer | None:
        """A new peer with its handler started, or None if it is refused."""
        if not self._admitting:
            return None
        if self._slots_used >= self._options.max_peers and not self._evict(now):
            return None
        peer = UdpPeer(self, endpoint, address, now)
        self._peers[address] = peer
        self._slots_used += 1
        self._tasks += 1
        if self._all_done.is_set():
            self._all_done = trio.Event()
        self._peers_started += 1
        assert self._handlers is not None
        self._handlers.start_soon(
            self._run_handler, peer, name=f"trionet UDP peer {format_address(address)}"
        )
        return peer

    def _evict(self, now: float) -> bool:
        """Evict the least recently active peer if it is idle long enough."""
        oldest = next(iter(self._peers.values()), None)
        if oldest is None or now - oldest._last_arrival < self._evict_after:
            return False
        self._peers_evicted += 1
        logger.debug(
            "UDP peer %s evicted: idle at the max_peers cap",
            format_address(oldest._address),
        )
        self._close_peer(oldest, CloseReason.TIMEOUT)
        self._release_slot(oldest)
        oldest._scope.cancel()
        return True

    # ------------------------------------------------------------- handlers

    async def _run_handler(self, peer: UdpPeer) -> None:
        try:
            with peer._scope:
                await self._handler(peer)
        except Exception as exc:
            if only_own_end(exc, peer._is_own_end):
                # The peer's own end is no handler failure: its close reason
                # (or PROTOCOL_ERROR, for a datagram it sent) says why.
                self._close_peer(peer, CloseReason.PROTOCOL_ERROR)
            else:
                self._handler_failed(peer, exc)
        except BaseException:
            self._close_peer(peer, CloseReason.SHUTDOWN)
            raise
        finally:
            self._close_peer(peer, CloseReason.CLOSED_BY_HOST)
            self._release_slot(peer)
            self._tasks -= 1
            if self._tasks == 0:
                self._all_done.set()

    def _handler_failed(self, peer: UdpPeer, exc: Exception) -> None:
        self._handler_errors += 1
        self._exceptions.append(exc)
        self._close_peer(peer, CloseReason.ERROR)
        logger.error(
            "UDP handler for %s raised; that peer is closed",
            format_address(peer._address),
            exc_info=exc,
        )

    def _release_slot(self, peer: UdpPeer) -> None:
        if peer._holds_slot:
            peer._holds_slot = False
            self._slots_used -= 1

    def _close_peer(self, peer: UdpPeer, reason: CloseReason) -> None:
        """Record the first close reason, forget the peer and drop its queue."""
        if peer._close_reason is not None:
            return
        peer._close_reason = reason
        if self._peers.get(peer._address) is peer:
            del self._peers[peer._address]
        self._dropped += len(peer._queue)
        peer._queue.clear()
        peer._queued_bytes = 0
        self._waiting.pop(peer, None)
        while peer._receivers:
            _reschedule(peer._receivers.popleft())


async def serve_udp(
    handler: UdpHandler,
    port: int,
    *,
    host: str | None = None,
    handler_nursery: trio.Nursery | None = None,
    task_status: trio.TaskStatus[UdpServer] = trio.TASK_STATUS_IGNORED,
    **options: Unpack[_UdpOptionsDict],
) -> None:
    """Serve UDP on ``port``, running ``await handler(peer)`` once per remote address.

    Use it with ``server = await nursery.start(trionet.serve_udp, handler, port)``;
    the started value is the :class:`UdpServer`.  It runs until cancelled or
    until :meth:`UdpServer.aclose` has shut it down.

    A reader task per socket hands each datagram to its peer's queue without
    waiting; a full queue drops the datagram (counted in
    :attr:`UdpServerStatistics.dropped`).  A new address starts a handler,
    unless ``max_peers`` handlers are running and no peer has been idle for
    5 seconds to make room (the datagram is dropped and
    counted in :attr:`UdpServerStatistics.peers_rejected`).  When a handler
    returns its peer is forgotten; when it raises, the exception is logged on
    the ``"trionet"`` logger and only that peer ends
    (:attr:`CloseReason.ERROR`).

    Args:
        handler: ``async def handler(peer: UdpPeer)``.
        port: the UDP port; 0 picks a free one, shared by all sockets.
        host: the address to bind; ``None`` (the default) binds the wildcard
            address of every address family (IPv4 and IPv6): every interface.
        handler_nursery: run the handlers in one nursery of the server's own
            inside this nursery, instead of inside the server; shutdown
            cancels that inner nursery after the grace period all the same.
        task_status: given by ``nursery.start``.
        **options: see :class:`UdpServerOptions` (idle_timeout, queue_size,
            queue_bytes, max_peers, max_size, grace_period, reuse_port,
            so_rcvbuf, so_sndbuf).

    Raises:
        ValueError: an option is out of range.
        TypeError: an option has the wrong type.
        OSError: binding failed, or ``reuse_port`` is set where the platform
            has no SO_REUSEPORT.

    .. versionadded:: 0.1
    """
    opts = UdpServerOptions(**options)
    check_argument(port_number, "port", port)
    if host is not None and not isinstance(host, str):
        raise TypeError(f"host must be a str or None, not {type(host).__name__}")
    sockets = await _bind_server_sockets(host, port, opts)
    server = UdpServer([_ServerSocket(s) for s in sockets], handler, opts)
    try:
        async with trio.open_nursery() as nursery:
            try:
                await (handler_nursery or nursery).start(
                    host_handlers, server._adopt, server._admission_ended
                )
                for endpoint in server._sockets:
                    nursery.start_soon(
                        server._read,
                        endpoint,
                        name=f"trionet UDP reader on {server.port}",
                    )
                if opts.idle_timeout is not None:
                    nursery.start_soon(
                        server._expire_idle,
                        opts.idle_timeout,
                        name=f"trionet UDP idle watcher on {server.port}",
                    )
                task_status.started(server)
                await server._supervise()
            finally:
                # At once if serve_udp is cancelled; a no-op after _supervise.
                server._close_now()
    finally:
        for sock in sockets:
            close_socket(sock)
        server._stopped.set()


@asynccontextmanager
async def open_udp_server(
    handler: UdpHandler,
    port: int = 0,
    *,
    host: str | None = None,
    **options: Unpack[_UdpOptionsDict],
) -> AsyncIterator[UdpServer]:
    """Run :func:`serve_udp` for the duration of an ``async with`` block.

    Leaving the block shuts the server down gracefully (see
    :meth:`UdpServer.aclose`; the ``grace_period`` option sets how long
    handlers get).  An exception raised in the block reaches the caller as
    itself, not wrapped in an exception group.

    Example::

        async with trionet.open_udp_server(echo, host="127.0.0.1") as server:
            async with trionet.open_udp(remote=("127.0.0.1", server.port)) as ep:
                await ep.send(b"ping")

    Args:
        handler: ``async def handler(peer: UdpPeer)``.
        port: the UDP port; 0 (the default) picks a free one.
        host: the address to bind; ``None`` (the default) binds every
            interface, as :func:`serve_udp` does.
        **options: see :class:`UdpServerOptions`.

    .. versionadded:: 0.1
    """
    async with server_in_block(
        serve_udp, handler, port, host=host, **options
    ) as server:
        yield server


async def _bind_server_sockets(
    host: str | None, port: int, options: UdpServerOptions
) -> list[UdpSocket]:
    # reuse_port_option() raises OSError here, before any socket exists.
    option = reuse_port_option() if options.reuse_port else None

    def setup(sock: socket.socket) -> None:
        if option is not None:
            sock.setsockopt(socket.SOL_SOCKET, option, 1)
        set_buffer_sizes(sock, options.so_sndbuf, options.so_rcvbuf)

    sockets: list[UdpSocket]
    network = current_network()
    if network is None:
        sockets = list(await bind_sockets([host], port, socket.SOCK_DGRAM, setup))
    else:
        sockets = list(
            await network.bind_udp([host], port, reuse_port=options.reuse_port)
        )
    try:
        for sock in sockets:
            if network is not None:
                set_buffer_sizes(sock, options.so_sndbuf, options.so_rcvbuf)
            check_family_max_size(options.max_size, sock.family)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets
