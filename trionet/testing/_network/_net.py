"""The memory network: hosts, addresses, faults, and the calls trionet makes.

How this works
--------------
While a :class:`MemoryNetwork` is active (a context variable, see
:func:`memory_network`), trionet's servers and clients ask it -- through its
``SocketCalls`` (``_sockets.py``), its side of the seam of
``trionet/_network.py`` -- for listeners, connections and datagram sockets
instead of the kernel.  Nothing else in trionet changes, so the code under
test is the code that runs in production.

Hosts.  A :class:`Host` is a simulated machine with loopback addresses:
``localhost`` (127.0.0.1 and ::1) exists from the start, :meth:`add_host`
adds named ones (127.0.0.2, 127.0.0.3, ...), and any other 127.x.y.z
address used in a bind or a connect becomes a host of its own.  Nothing
else is an address here: a name that was not added fails to resolve and
any other IP is unreachable, so a mistake in a test can never send a byte
to a real network.  Code runs on ``localhost`` unless it was started inside
``with net.on_host(...)``; a server bound to a host's address (or a name)
belongs to that host whoever started it.

Ports are given out in order from 32768 on each host, so that the same run
gets the same ports -- and records the same traffic -- every time.

Faults live in three places -- each host, each link (an unordered pair of
hosts), and the set of partitioned links -- and are read whenever a packet
is sent or a receiver looks, so a change takes effect at once.  Every
change wakes every waiting receiver to look again.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from typing import Any, TypeAlias

import attrs
import trio

from ..._connection import Connection
from ..._network import active_network
from ..._options import non_negative, positive_int
from ..._transport import StreamTransport
from ._faults import NO_FAULTS, Faults, LinkState, combine
from ._hosts import (
    EPHEMERAL_FIRST,
    EPHEMERAL_LAST,
    Host,
    Kind,
    _ip,
    _Pair,
)
from ._records import ConnectionRecord, LiveConnection, Recorder, Traffic
from ._sockets import SocketCalls
from ._stream import MemoryStream, _error

__all__ = ["MemoryNetwork", "memory_network"]

#: Bytes each direction of a connection holds (sent, not yet read) by default.
DEFAULT_BUFFER_SIZE = 256 * 1024

HostRef: TypeAlias = "str | Host"

_current_host: ContextVar[Host | None] = ContextVar("trionet_memory_host", default=None)


@attrs.frozen(kw_only=True)
class _Options:
    # (Checks the arguments of MemoryNetwork.)
    seed: object = 0
    buffer_size: int = attrs.field(default=DEFAULT_BUFFER_SIZE, validator=positive_int)
    capture_bytes: int = attrs.field(default=1024 * 1024, validator=non_negative)
    max_records: int = attrs.field(default=100_000, validator=positive_int)


class MemoryNetwork:
    """A simulated network that trionet's servers and clients use instead
    of the kernel's while it is active.

    Make one with :func:`memory_network` (or the ``memory_network`` pytest
    fixture); see :doc:`/testing` for a tour.

    Args:
        seed: seeds every random choice (jitter, loss, duplication,
            reordering); the same seed gives the same run (see
            :doc:`/testing` for trio's part in that).
        buffer_size: bytes each direction of a connection holds, sent but
            not yet read, before ``send_all`` waits (a server's
            ``so_sndbuf`` and ``so_rcvbuf`` options set its own directions).
        capture_bytes: bytes of connection payload kept for
            :meth:`traffic`, in all; counting goes on past it.
        max_records: connection records and datagram records kept, each.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        *,
        seed: object = 0,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        capture_bytes: int = 1024 * 1024,
        max_records: int = 100_000,
    ) -> None:
        self._options = _Options(
            seed=seed,
            buffer_size=buffer_size,
            capture_bytes=capture_bytes,
            max_records=max_records,
        )
        self._recorder = Recorder(capture_bytes, max_records, self._now)
        self._hosts: dict[str, Host] = {}
        self._by_ip: dict[str, Host] = {}
        self._links: dict[frozenset[Host], Faults] = {}
        self._states: dict[tuple[Host, Host], LinkState] = {}
        self._partitions: set[frozenset[Host]] = set()
        self._pairs: dict[int, _Pair] = {}
        # Tasks waiting for the network to change (connects across a partition).
        self._changes = trio.lowlevel.ParkingLot()
        self._localhost = self._new_host("localhost", ["127.0.0.1", "::1"])
        # Records give times from here: when the network was first used.
        self._epoch: float | None = None
        # What trionet's socket code calls while this network is active.
        self._calls = SocketCalls(self)

    def __repr__(self) -> str:
        return f"<trionet.testing.MemoryNetwork hosts={list(self._hosts)}>"

    # ------------------------------------------------------------------ hosts

    @property
    def localhost(self) -> Host:
        """The host code runs on unless told otherwise (127.0.0.1 and ::1)."""
        return self._localhost

    @property
    def hosts(self) -> tuple[Host, ...]:
        """Every host, in the order they appeared."""
        return tuple(self._hosts.values())

    def _new_host(self, name: str, addresses: Sequence[str]) -> Host:
        host = Host(name, addresses)
        self._hosts[name] = host
        for ip in addresses:
            self._by_ip[ip] = host
        return host

    def add_host(self, name: str, address: str | None = None) -> Host:
        """Add a host called ``name``: ``connect_tcp(name, port)`` and
        ``serve_tcp(..., host=name)`` then reach it.

        Args:
            name: the host's name (not an IP address).
            address: its IPv4 loopback address; by default the next free
                one from 127.0.0.2 on.

        Raises:
            ValueError: the name is taken or is an address, or ``address``
                is not a free 127.x.y.z address.
        """
        if not isinstance(name, str) or not name or _ip(name) is not None:
            raise ValueError(f"a host name must be a non-empty name, not {name!r}")
        if name in self._hosts:
            raise ValueError(f"there is already a host called {name!r}")
        if address is None:
            number = 2
            while f"127.0.0.{number}" in self._by_ip:
                number += 1
            address = f"127.0.0.{number}"
        else:
            ip = _ip(address)
            if ip is None or ip.version != 4 or not ip.is_loopback:
                raise ValueError(
                    f"a host's address must be a 127.x.y.z address, not {address!r}"
                )
            address = str(ip)
            if address in self._by_ip:
                raise ValueError(
                    f"{address} already belongs to {self._by_ip[address].name}"
                )
        return self._new_host(name, [address])

    def host(self, name: str | Host) -> Host:
        """The host called ``name``, or owning the address ``name``.

        Raises:
            ValueError: no such host (and ``name`` is not a 127.x.y.z address).
        """
        if isinstance(name, Host):
            if self._hosts.get(name.name) is not name:
                raise ValueError(f"{name!r} is not a host of this network")
            return name
        if name in self._hosts:
            return self._hosts[name]
        ip = _ip(name)
        host = None if ip is None else self._host_of_ip(str(ip))
        if host is None:
            raise ValueError(f"no host {name!r} on this memory network")
        return host

    def _host_of_ip(self, ip: str) -> Host | None:
        """The host owning a loopback address (made on first use); None for
        an address that is not a loopback address."""
        host = self._by_ip.get(ip)
        if host is None:
            parsed = ipaddress.ip_address(ip)
            if parsed.version == 4 and parsed.is_loopback:
                host = self._new_host(ip, [ip])
        return host

    @contextmanager
    def on_host(self, host: HostRef) -> Iterator[Host]:
        """Run the block -- and every task started inside it -- on ``host``:
        its connections come from there, ``host=None`` binds there, and its
        UNIX socket paths are that host's."""
        chosen = self.host(host)
        token = _current_host.set(chosen)
        try:
            yield chosen
        finally:
            _current_host.reset(token)

    def _current(self) -> Host:
        host = _current_host.get()
        if host is None or self._hosts.get(host.name) is not host:
            return self._localhost
        return host

    # ----------------------------------------------------------------- faults

    def set_faults(self, a: HostRef, b: HostRef | None = None, **faults: Any) -> Faults:
        """Change the faults of host ``a`` (all its traffic), or of the link
        between hosts ``a`` and ``b`` (both directions); fields not given
        keep their values.  Returns the new :class:`Faults`.

        ::

            net.set_faults("app", "db", latency=0.05, jitter=0.01)
            net.set_faults("db", bandwidth=1_000_000)
            net.set_faults("app", "db", loss=0.1, duplicate=0.01, reorder=0.05)

        Raises:
            ValueError, TypeError: a field is out of range or unknown.
        """
        first = self.host(a)
        if b is None:
            first._faults = attrs.evolve(first._faults, **faults)
            result = first._faults
        else:
            link = frozenset({first, self.host(b)})
            result = attrs.evolve(self._links.get(link, NO_FAULTS), **faults)
            self._links[link] = result
        self._changed()
        return result

    def faults(self, a: HostRef, b: HostRef | None = None) -> Faults:
        """The faults of host ``a``, or of the link between ``a`` and ``b``."""
        if b is None:
            return self.host(a)._faults
        return self._links.get(frozenset({self.host(a), self.host(b)}), NO_FAULTS)

    def partition(self, a: HostRef, b: HostRef) -> None:
        """Cut the link between hosts ``a`` and ``b``, both ways.

        Nothing crosses it any more: TCP bytes wait (and once a connection's
        buffer is full its sends wait too) until :meth:`heal`, new
        connections wait (until their connect timeout), datagrams are
        dropped.  Code with timeouts sees them run out.

        Raises:
            ValueError: ``a`` and ``b`` are the same host.
        """
        first, second = self.host(a), self.host(b)
        if first is second:
            raise ValueError("a host cannot be partitioned from itself")
        self._partitions.add(frozenset({first, second}))
        self._changed()

    def heal(self, a: HostRef | None = None, b: HostRef | None = None) -> None:
        """End the partition between ``a`` and ``b`` (every partition when
        no hosts are given); waiting bytes flow again."""
        if a is None or b is None:
            if (a is None) != (b is None):
                raise ValueError("give two hosts, or none to heal every partition")
            self._partitions.clear()
        else:
            self._partitions.discard(frozenset({self.host(a), self.host(b)}))
        self._changed()

    def take_down(self, host: HostRef) -> None:
        """Take ``host`` down: its connections are reset, connecting to it
        is refused, datagrams to and from it are dropped (and connecting
        from it fails: the network is unreachable).  Its servers keep
        running, so :meth:`bring_up` makes it reachable again."""
        chosen = self.host(host)
        chosen._down = True
        for pair in list(self._pairs.values()):
            if chosen in pair.hosts:
                pair.reset()
        self._changed()

    def bring_up(self, host: HostRef) -> None:
        """Bring ``host`` back up after :meth:`take_down`."""
        self.host(host)._down = False
        self._changed()

    def reset(self, connection: Connection | ConnectionRecord | MemoryStream) -> None:
        """Reset one connection: both sides see a connection reset (their
        next receive or send fails, and a :class:`trionet.Connection`
        closes with :attr:`~trionet.CloseReason.ERROR`).

        Args:
            connection: either side's :class:`trionet.Connection`, its
                :class:`ConnectionRecord`, or a :class:`MemoryStream`.

        Raises:
            ValueError: it is not a connection of this network (or has
                ended already).
        """
        self._pair_of(connection).reset()

    def record(self, connection: Connection | MemoryStream) -> ConnectionRecord:
        """The record of one connection so far (either side's
        :class:`trionet.Connection` or a :class:`MemoryStream`)."""
        return _live_of(connection).snapshot()

    def _pair_of(
        self, connection: Connection | ConnectionRecord | MemoryStream
    ) -> _Pair:
        number = (
            connection.id
            if isinstance(connection, ConnectionRecord)
            else _live_of(connection).id
        )
        pair = self._pairs.get(number)
        if pair is None:
            raise ValueError(f"connection {number} is not open on this network")
        return pair

    def _changed(self) -> None:
        self._changes.unpark_all()
        for pair in self._pairs.values():
            for pipe in pair.pipes:
                pipe.wake()

    def _deliverable(self, source: Host, destination: Host, local: bool) -> bool:
        if source._down or destination._down:
            return False
        return local or frozenset({source, destination}) not in self._partitions

    def _arrival(self, source: Host, destination: Host, now: float, size: int) -> float:
        faults = self._faults_between(source, destination)
        return self._state(source, destination).arrival(faults, now, size)

    def _faults_between(self, source: Host, destination: Host) -> Faults:
        link = self._links.get(frozenset({source, destination}), NO_FAULTS)
        if source is destination:
            return combine(source._faults, link)
        return combine(source._faults, link, destination._faults)

    def _state(self, source: Host, destination: Host) -> LinkState:
        key = (source, destination)
        state = self._states.get(key)
        if state is None:
            state = LinkState(self._options.seed, source.name, destination.name)
            self._states[key] = state
        return state

    # ------------------------------------------------------------ observation

    def traffic(self) -> Traffic:
        """A snapshot of every connection and datagram so far.  Times in
        it are seconds since the network was first used (since
        :func:`memory_network` began), to the nanosecond, so that two runs
        compare equal."""
        return self._recorder.traffic()

    def _now(self) -> float:
        """Seconds since the network was first used, to the nanosecond (so
        that runs starting at other clock readings record equal times)."""
        now = trio.current_time()
        if self._epoch is None:
            self._epoch = now
        return round(now - self._epoch, 9)

    # -------------------------------------------------------------- resolving

    def _resolve(self, name: str) -> list[str]:
        """The addresses ``name`` stands for, as getaddrinfo would give them."""
        ip = _ip(name)
        if ip is not None:
            text = str(ip)
            if ip.is_loopback:
                return [text]
            raise _error(
                errno.ENETUNREACH,
                f"{text} is not on the memory network, which has only "
                "loopback addresses and the hosts added with add_host()",
            )
        host = self._hosts.get(name)
        if host is None:
            raise socket.gaierror(
                socket.EAI_NONAME,
                f"Name or service not known ({name!r} is not a host of the "
                "memory network: add it with net.add_host)",
            )
        return list(host.addresses)

    def _bind_targets(self, hosts: Sequence[str | None]) -> list[tuple[Host, str]]:
        targets: list[tuple[Host, str]] = []
        here = self._current()
        for name in hosts:
            if name is None:
                found = [(here, "0.0.0.0")]
                if here._address(v6=True) is not None:
                    found.append((here, "::"))
            elif name in ("0.0.0.0", "::"):
                found = [(here, name)]
            else:
                try:
                    ips = self._resolve(name)
                except OSError as exc:
                    raise _error(errno.EADDRNOTAVAIL, str(exc)) from exc
                found = []
                for ip in ips:
                    owner = self._host_of_ip(ip)
                    if owner is None or ip not in owner.addresses:
                        raise _error(errno.EADDRNOTAVAIL, ip)
                    found.append((owner, ip))
            targets.extend(t for t in found if t not in targets)
        return targets

    def _choose_port(
        self, kind: Kind, targets: list[tuple[Host, str]], port: int, reuse: bool
    ) -> int:
        if port:
            for host, ip in targets:
                host._check_free(kind, ip, port, reuse)
            return port
        first = targets[0][0]
        for _ in range(EPHEMERAL_LAST - EPHEMERAL_FIRST + 1):
            port = first._ephemeral(kind)
            if all(not host._in_use(kind, port) for host, _ip in targets):
                return port
        raise _error(errno.EADDRINUSE, "no port is free on every address")

    # -------------------------------------------------------------- activation

    @contextmanager
    def activated(self) -> Iterator[MemoryNetwork]:
        """Make this the network of the current context for the block (and
        every task started inside it); see :func:`memory_network`."""
        token = active_network.set(self._calls)
        try:
            yield self
        finally:
            active_network.reset(token)


def _live_of(connection: Connection | MemoryStream) -> LiveConnection:
    stream: object = connection
    if isinstance(connection, Connection):
        transport = connection._transport
        stream = transport.stream if isinstance(transport, StreamTransport) else None
    for _ in range(8):
        if isinstance(stream, MemoryStream):
            return stream._live
        stream = getattr(stream, "transport_stream", None)
    raise ValueError(f"{connection!r} is not a connection of a memory network")


@asynccontextmanager
async def memory_network(
    *,
    seed: object = 0,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
    capture_bytes: int = 1024 * 1024,
    max_records: int = 100_000,
) -> AsyncIterator[MemoryNetwork]:
    """Run the block over an in-memory network instead of the kernel's.

    ::

        async with trionet.testing.memory_network() as net:
            async with trio.open_nursery() as nursery:
                await nursery.start(app.run_server, 8000)  # serve_tcp inside
                async with trionet.connect_tcp("127.0.0.1", 8000) as conn:
                    ...

    While the block runs -- in it and in every task started from inside it
    -- trionet's servers, clients, UDP endpoints, channels, TLS and
    :func:`~trionet.reconnecting` make no sockets: they meet on a
    :class:`MemoryNetwork`, where time is trio's (so
    ``trio.testing.MockClock`` makes timeouts instant) and faults can be
    injected at any moment.  The network is the block's own: two tests
    never share one.

    Arguments are those of :class:`MemoryNetwork`.

    .. versionadded:: 0.1
    """
    network = MemoryNetwork(
        seed=seed,
        buffer_size=buffer_size,
        capture_bytes=capture_bytes,
        max_records=max_records,
    )
    with network.activated():
        network._now()  # (times in the records count from here)
        await trio.lowlevel.checkpoint()
        yield network
