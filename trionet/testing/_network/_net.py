"""The memory network: hosts, addresses, faults, and the calls trionet makes.

How this works
--------------
:class:`MemoryNetwork` implements the seam of ``trionet/_network.py``: while
it is active (a context variable, see :func:`memory_network`), trionet's
servers and clients ask it for listeners, connections and datagram sockets
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
import os
import socket
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from typing import Any, Literal, TypeAlias

import attrs
import trio

from ..._connection import Connection
from ..._network import SimulatedNetwork, active_network
from ..._options import non_negative, positive_int
from ..._transport import Address, PeerCredentials, StreamTransport
from ..._util import format_address
from ._faults import NO_FAULTS, Faults, LinkState, combine
from ._records import (
    ConnectionRecord,
    DatagramFate,
    DatagramRecord,
    LiveConnection,
    Recorder,
    Traffic,
)
from ._stream import MemoryListener, MemoryStream, Pipe, _error, stream_pair
from ._udp import MemoryDatagramSocket

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import ExceptionGroup

__all__ = ["Host", "MemoryNetwork", "Route", "memory_network"]

#: The first port given out for port 0 and for clients (Linux's default range).
EPHEMERAL_FIRST = 32768
EPHEMERAL_LAST = 60999
#: The accept backlog when a server gives none (Linux's ``somaxconn``).
DEFAULT_BACKLOG = 4096
#: Bytes each direction of a connection holds (sent, not yet read) by default.
DEFAULT_BUFFER_SIZE = 256 * 1024

HostRef: TypeAlias = "str | Host"
_Kind: TypeAlias = Literal["tcp", "udp"]

_current_host: ContextVar[Host | None] = ContextVar("trionet_memory_host", default=None)


def _is_v6(ip: str) -> bool:
    return ":" in ip


def _family_of(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if _is_v6(ip) else socket.AF_INET


#: SO_REUSEPORT where the platform has it (never set where it has not).
_REUSE_PORT = getattr(socket, "SO_REUSEPORT", -1)


def _sockaddr(ip: str, port: int) -> Address:
    # (IPv6 addresses have four fields, as the socket module gives them.)
    return (ip, port, 0, 0) if _is_v6(ip) else (ip, port)


def _overlaps(a: str, b: str) -> bool:
    if _is_v6(a) != _is_v6(b):
        return False
    return a == b or a in ("0.0.0.0", "::") or b in ("0.0.0.0", "::")


class Host:
    """A simulated machine on a :class:`MemoryNetwork`.

    Get one from :meth:`MemoryNetwork.add_host` or :meth:`MemoryNetwork.host`.

    .. versionadded:: 0.1
    """

    def __init__(self, name: str, addresses: Sequence[str]) -> None:
        #: The host's name (an address for hosts made by using an address).
        self.name = name
        #: The host's addresses (loopback addresses; the first IPv4 one is
        #: where its connections come from).
        self.addresses: tuple[str, ...] = tuple(addresses)
        self._faults = NO_FAULTS
        self._down = False
        # Bound TCP listeners and UDP sockets: (kind, port) -> [bound].
        self._bound: dict[tuple[_Kind, int], list[Any]] = {}
        self._unix: dict[str, MemoryListener] = {}
        self._next_port = EPHEMERAL_FIRST
        self._client_ports: set[int] = set()
        self._round_robin: dict[tuple[_Kind, int], int] = {}

    def __repr__(self) -> str:
        state = " down" if self._down else ""
        return f"<trionet.testing.Host {self.name} {list(self.addresses)}{state}>"

    @property
    def faults(self) -> Faults:
        """The faults of every packet to or from this host."""
        return self._faults

    @property
    def down(self) -> bool:
        """Whether the host is down (see :meth:`MemoryNetwork.take_down`)."""
        return self._down

    def _address(self, v6: bool) -> str | None:
        return next((ip for ip in self.addresses if _is_v6(ip) == v6), None)

    def _in_use(self, kind: _Kind, port: int) -> bool:
        return bool(self._bound.get((kind, port))) or (
            kind == "tcp" and port in self._client_ports
        )

    def _ephemeral(self, kind: _Kind) -> int:
        for _ in range(EPHEMERAL_LAST - EPHEMERAL_FIRST + 1):
            port = self._next_port
            self._next_port = EPHEMERAL_FIRST if port >= EPHEMERAL_LAST else port + 1
            if not self._in_use(kind, port):
                return port
        raise _error(errno.EADDRNOTAVAIL, f"no free port left on {self.name}")

    def _check_free(self, kind: _Kind, ip: str, port: int, reuse_port: bool) -> None:
        for bound in self._bound.get((kind, port), ()):
            if _overlaps(bound.bound_ip, ip) and not (reuse_port and bound.reuse_port):
                raise _error(errno.EADDRINUSE, f"{format_address(_sockaddr(ip, port))}")

    def _find_datagram_socket(
        self, ip: str, port: int, source: Address
    ) -> MemoryDatagramSocket | None:
        """The socket a datagram from ``source`` to (ip, port) goes to, as
        the kernel picks it: a socket connected to ``source`` first, then
        one bound to ``ip``, then a wildcard; among several sharing the port
        (reuse_port), always the same one for one sender."""
        candidates = [
            sock
            for sock in self._bound.get(("udp", port), ())
            if _overlaps(sock.bound_ip, ip) and sock.accepts_from(source)
        ]
        for best in (
            [s for s in candidates if s.remote is not None],
            [s for s in candidates if s.bound_ip == ip],
            candidates,
        ):
            if best:
                return best[best[0].pick_key(source) % len(best)]  # type: ignore[no-any-return]
        return None

    def _find(self, kind: _Kind, ip: str, port: int) -> Any | None:
        """The socket bound to receive at (ip, port): an exact address
        before a wildcard; several with ``reuse_port`` take turns."""
        candidates = [
            b for b in self._bound.get((kind, port), ()) if _overlaps(b.bound_ip, ip)
        ]
        exact = [b for b in candidates if b.bound_ip == ip]
        choice = exact or candidates
        if not choice:
            return None
        turn = self._round_robin.get((kind, port), 0)
        self._round_robin[(kind, port)] = turn + 1
        return choice[turn % len(choice)]


class Route:
    """One direction between two hosts, as packets see it."""

    __slots__ = ("destination", "local", "network", "source")

    def __init__(
        self, network: MemoryNetwork, source: Host, destination: Host, local: bool
    ) -> None:
        self.network = network
        self.source = source
        self.destination = destination
        #: A UNIX socket: within one host, no faults but the host going down.
        self.local = local

    def deliverable(self) -> bool:
        """Whether packets get through right now."""
        return self.network._deliverable(self.source, self.destination, self.local)

    def arrival(self, now: float, size: int) -> float:
        """When ``size`` bytes sent now arrive."""
        if self.local:
            return now
        return self.network._arrival(self.source, self.destination, now, size)


class _Pair:
    """The two ends of one connection, for resets and clean-up."""

    def __init__(
        self,
        network: MemoryNetwork,
        live: LiveConnection,
        pipes: tuple[Pipe, Pipe],
        hosts: tuple[Host, Host],
        client_port: int | None,
    ) -> None:
        self.network = network
        self.live = live
        self.pipes = pipes
        self.hosts = hosts
        self.client_port = client_port
        self.ends: tuple[MemoryStream, MemoryStream] | None = None
        self._closed = 0

    def end_closed(self) -> None:
        self._closed += 1
        if self._closed == 2:
            self.live.ended("closed")
            if self.client_port is not None:
                self.hosts[0]._client_ports.discard(self.client_port)
            self.network._pairs.pop(self.live.id, None)

    def reset(self) -> None:
        assert self.ends is not None
        self.ends[0].reset()


@attrs.frozen(kw_only=True)
class _Options:
    # (Checks the arguments of MemoryNetwork.)
    seed: object = 0
    buffer_size: int = attrs.field(default=DEFAULT_BUFFER_SIZE, validator=positive_int)
    capture_bytes: int = attrs.field(default=1024 * 1024, validator=non_negative)
    max_records: int = attrs.field(default=100_000, validator=positive_int)


class MemoryNetwork(SimulatedNetwork):
    """A simulated network that trionet's servers and clients use instead
    of the kernel's while it is active.

    Make one with :func:`memory_network` (or the ``memory_network`` pytest
    fixture); see :doc:`/testing` for a tour.

    Args:
        seed: seeds every random choice (jitter, loss, duplication,
            reordering); the same seed gives the same run.
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
        self, kind: _Kind, targets: list[tuple[Host, str]], port: int, reuse: bool
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

    # -------------------------------------------------------------------- TCP

    async def listen_tcp(
        self,
        hosts: Sequence[str | None],
        port: int,
        *,
        backlog: int | None,
        reuse_port: bool,
        so_sndbuf: int | None,
        so_rcvbuf: int | None,
    ) -> list[Any]:
        await trio.lowlevel.checkpoint()
        targets = self._bind_targets(hosts)
        port = self._choose_port("tcp", targets, port, reuse_port)
        listeners: list[Any] = []
        for host, ip in targets:

            def unbind(listener: MemoryListener, host: Host = host) -> None:
                host._bound[("tcp", port)].remove(listener)

            listener = MemoryListener(
                _sockaddr(ip, port),
                _backlog(backlog),
                unbind,
                so_sndbuf=so_sndbuf,
                so_rcvbuf=so_rcvbuf,
                reuse_port=reuse_port,
            )
            host._bound.setdefault(("tcp", port), []).append(listener)
            listeners.append(listener)
        return listeners

    async def connect_tcp(
        self, host: str, port: int, local_address: str | None
    ) -> MemoryStream:
        ips = self._resolve(host)
        errors: list[OSError] = []
        for ip in ips:
            try:
                return await self._connect_to(local_address, ip, port)
            except OSError as exc:
                errors.append(exc)
        message = f"all attempts to connect to {format_address((host, port))} failed"
        raise OSError(message) from ExceptionGroup(message, errors)

    async def _connect_to(
        self, local_address: str | None, ip: str, port: int
    ) -> MemoryStream:
        await trio.lowlevel.checkpoint()
        destination = self._host_of_ip(ip)
        assert destination is not None
        server = _sockaddr(ip, port)
        v6 = _is_v6(ip)
        source = self._current()
        source_ip = source._address(v6)
        if local_address is not None:
            parsed = _ip(local_address)
            owner = None if parsed is None else self._host_of_ip(str(parsed))
            if owner is None or _is_v6(str(parsed)) != v6:
                # (trio's words, for the same mistake on the kernel.)
                raise OSError(
                    f"local_address={local_address!r} is incompatible "
                    f"with remote address {server!r}"
                )
            source, source_ip = owner, str(parsed)
        if source_ip is None:
            raise _error(errno.ENETUNREACH, f"{source.name} has no IPv6 address")
        out = Route(self, source, destination, local=False)
        back = Route(self, destination, source, local=False)
        # The SYN: across a partition it is retried until the link heals
        # (or the caller's connect timeout runs out).
        while not (out.deliverable() and back.deliverable()):
            if source._down:
                raise _error(errno.ENETUNREACH, f"{source.name} is down")
            if destination._down:
                break
            await self._changes.park()
        await trio.sleep_until(out.arrival(trio.current_time(), 0))
        while True:
            listener = None if destination._down else destination._find("tcp", ip, port)
            if listener is None or not listener.full:
                break
            await listener.room.park()
        if listener is None:
            await trio.sleep_until(back.arrival(trio.current_time(), 0))
            client = _sockaddr(source_ip, 0)
            self._recorder.connection("tcp", client, server).ended("refused")
            raise _error(errno.ECONNREFUSED)
        client_port = source._ephemeral("tcp")
        source._client_ports.add(client_port)
        client_end = self._open_pair(
            "tcp",
            listener,
            (source, destination),
            (_sockaddr(source_ip, client_port), server),
            (out, back),
            (None, None),
            client_port,
        )
        try:
            await trio.sleep_until(back.arrival(trio.current_time(), 0))
        except BaseException:
            client_end.close()
            raise
        return client_end

    def _open_pair(
        self,
        kind: str,
        listener: MemoryListener,
        hosts: tuple[Host, Host],
        addresses: tuple[Address, Address],
        routes: tuple[Route, Route],
        credentials: tuple[PeerCredentials | None, PeerCredentials | None],
        client_port: int | None,
    ) -> MemoryStream:
        """Make a connection, queue its server end at ``listener`` and
        return its client end."""
        client, server = addresses
        live = self._recorder.connection(kind, client, server)
        size = self._options.buffer_size
        to_server = Pipe(routes[0], listener.so_rcvbuf or size, live, True)
        to_client = Pipe(routes[1], listener.so_sndbuf or size, live, False)
        pair = _Pair(self, live, (to_server, to_client), hosts, client_port)
        pair.ends = stream_pair(
            to_server, to_client, client, server, credentials, pair.end_closed
        )
        self._pairs[live.id] = pair
        listener.enqueue(pair.ends[1])
        return pair.ends[0]

    # ------------------------------------------------------------------- UNIX

    def listen_unix(
        self,
        path: str,
        *,
        backlog: int | None,
        so_sndbuf: int | None,
        so_rcvbuf: int | None,
    ) -> MemoryListener:
        host = self._current()
        if path in host._unix:
            raise _error(
                errno.EADDRINUSE,
                f"{path} is in use: a server is listening on it; not taking it over",
            )

        def unbind(listener: MemoryListener) -> None:
            if host._unix.get(path) is listener:
                del host._unix[path]

        listener = MemoryListener(
            path, _backlog(backlog), unbind, so_sndbuf=so_sndbuf, so_rcvbuf=so_rcvbuf
        )
        host._unix[path] = listener
        return listener

    async def connect_unix(self, path: str) -> MemoryStream:
        await trio.lowlevel.checkpoint()
        host = self._current()
        while True:
            listener = host._unix.get(path)
            if listener is None:
                raise FileNotFoundError(
                    errno.ENOENT, f"{os.strerror(errno.ENOENT)} (memory network)", path
                )
            if host._down:
                raise _error(errno.ECONNREFUSED, f"{host.name} is down")
            if not listener.full:
                break
            await listener.room.park()
        me = PeerCredentials(os.getpid(), os.geteuid(), os.getegid())
        route = Route(self, host, host, local=True)
        return self._open_pair(
            "unix", listener, (host, host), ("", path), (route, route), (me, me), None
        )

    # -------------------------------------------------------------------- UDP

    async def getaddrinfo(
        self,
        host: str | None,
        port: int,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[tuple[Any, ...]]:
        await trio.lowlevel.checkpoint()
        if host is None:
            passive = flags & socket.AI_PASSIVE
            ips = ["0.0.0.0", "::"] if passive else ["127.0.0.1", "::1"]
        elif _ip(host) is not None:
            ips = [str(_ip(host))]
        else:
            ips = self._resolve(host)
        found = [
            (_family_of(ip), type or socket.SOCK_DGRAM, proto, "", _sockaddr(ip, port))
            for ip in ips
            if family in (0, _family_of(ip))
        ]
        if not found:
            raise socket.gaierror(
                socket.EAI_ADDRFAMILY, f"no address of that family for {host!r}"
            )
        return found

    def udp_socket(self, family: int) -> MemoryDatagramSocket:
        return MemoryDatagramSocket(self, socket.AddressFamily(family))

    async def bind_udp(
        self, hosts: Sequence[str | None], port: int, *, reuse_port: bool
    ) -> list[Any]:
        await trio.lowlevel.checkpoint()
        targets = self._bind_targets(hosts)
        port = self._choose_port("udp", targets, port, reuse_port)
        sockets: list[MemoryDatagramSocket] = []
        for host, ip in targets:
            sock = MemoryDatagramSocket(self, _family_of(ip))
            sock.reuse_port = reuse_port
            self._register_datagram(sock, host, ip, port)
            sockets.append(sock)
        return sockets

    def _register_datagram(
        self, sock: MemoryDatagramSocket, host: Host, ip: str, port: int
    ) -> None:
        host._bound.setdefault(("udp", port), []).append(sock)
        sock.bound(host, ip, port)

    def _bind_datagram(self, sock: MemoryDatagramSocket, ip: str, port: int) -> None:
        """Bind ``sock`` to (ip, port); port 0 picks a free one."""
        targets = [
            (host, bound)
            for host, bound in self._bind_targets([ip or None])
            if _family_of(bound) == sock.family
        ]
        if not targets:
            raise _error(errno.EADDRNOTAVAIL, ip)
        reuse = bool(sock.getsockopt(socket.SOL_SOCKET, _REUSE_PORT))
        sock.reuse_port = reuse
        port = self._choose_port("udp", targets[:1], port, reuse)
        self._register_datagram(sock, targets[0][0], targets[0][1], port)

    def _datagram_destination(self, family: int, host: str) -> str:
        """The IP a datagram to ``host`` goes to (OSError as the kernel's)."""
        for ip in self._resolve(host):
            if _family_of(ip) == family:
                return ip
        raise _error(errno.EAFNOSUPPORT, f"{host} is of another address family")

    def _send_datagram(
        self,
        sock: MemoryDatagramSocket,
        source: Address,
        destination: Address,
        payload: bytes,
    ) -> None:
        """Decide what becomes of one datagram, and record it."""
        origin = sock.host
        target_ip = str(destination[0])
        target_host = self._host_of_ip(target_ip)
        assert origin is not None and target_host is not None
        size = len(payload)

        def record(fate: DatagramFate, duplicate: bool = False) -> None:
            self._recorder.datagram(
                DatagramRecord(
                    sent_at=self._now(),
                    source=source,
                    destination=destination,
                    size=size,
                    fate=fate,
                    duplicate=duplicate,
                )
            )

        if origin._down or target_host._down:
            return record("host down")
        if not self._deliverable(origin, target_host, local=False):
            return record("partitioned")
        state = self._state(origin, target_host)
        faults = self._faults_between(origin, target_host)
        if state.chance(faults.loss):
            return record("lost")
        copies = 2 if state.chance(faults.duplicate) else 1
        now = trio.current_time()
        for copy in range(copies):
            target = target_host._find_datagram_socket(
                target_ip, int(destination[1]), source
            )
            if target is None:
                if copy == 0:
                    sock.unreachable()
                record("unreachable", copy > 0)
                continue
            arrival = state.arrival(faults, now, size)
            if state.chance(faults.reorder):
                arrival += faults.reorder_delay
            record(target.enqueue(arrival, payload, source), copy > 0)

    # -------------------------------------------------------------- activation

    @contextmanager
    def activated(self) -> Iterator[MemoryNetwork]:
        """Make this the network of the current context for the block (and
        every task started inside it); see :func:`memory_network`."""
        token = active_network.set(self)
        try:
            yield self
        finally:
            active_network.reset(token)


def _backlog(backlog: int | None) -> int:
    return DEFAULT_BACKLOG if backlog is None else max(1, min(backlog, DEFAULT_BACKLOG))


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _live_of(connection: Connection | MemoryStream) -> LiveConnection:
    stream: object = connection
    if isinstance(connection, Connection):
        transport = connection._transport
        stream = transport.stream if isinstance(transport, StreamTransport) else None
    for _ in range(8):
        if isinstance(stream, MemoryStream):
            return stream.live
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
