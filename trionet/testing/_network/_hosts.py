"""Hosts of a memory network, and the routes and connections between them."""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from ..._transport import Address
from ..._util import format_address
from ._faults import NO_FAULTS, Faults
from ._records import LiveConnection
from ._stream import MemoryListener, MemoryStream, Pipe, _error
from ._udp import MemoryDatagramSocket

if TYPE_CHECKING:
    from ._net import MemoryNetwork

__all__ = ["Host", "Route"]

#: The first port given out for port 0 and for clients (Linux's default range).
EPHEMERAL_FIRST = 32768
EPHEMERAL_LAST = 60999
#: The accept backlog when a server gives none (Linux's ``somaxconn``).
DEFAULT_BACKLOG = 4096

Kind: TypeAlias = Literal["tcp", "udp"]


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
        self._bound: dict[tuple[Kind, int], list[Any]] = {}
        self._unix: dict[str, MemoryListener] = {}
        self._next_port = EPHEMERAL_FIRST
        self._client_ports: set[int] = set()
        self._round_robin: dict[tuple[Kind, int], int] = {}

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

    def _in_use(self, kind: Kind, port: int) -> bool:
        return bool(self._bound.get((kind, port))) or (
            kind == "tcp" and port in self._client_ports
        )

    def _ephemeral(self, kind: Kind) -> int:
        for _ in range(EPHEMERAL_LAST - EPHEMERAL_FIRST + 1):
            port = self._next_port
            self._next_port = EPHEMERAL_FIRST if port >= EPHEMERAL_LAST else port + 1
            if not self._in_use(kind, port):
                return port
        raise _error(errno.EADDRNOTAVAIL, f"no free port left on {self.name}")

    def _check_free(self, kind: Kind, ip: str, port: int, reuse_port: bool) -> None:
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

    def _find(self, kind: Kind, ip: str, port: int) -> Any | None:
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


def _backlog(backlog: int | None) -> int:
    return DEFAULT_BACKLOG if backlog is None else max(1, min(backlog, DEFAULT_BACKLOG))


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
