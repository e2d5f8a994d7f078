"""The memory network's side of the seam: what trionet's socket code calls.

:class:`SocketCalls` implements ``trionet._network.SimulatedNetwork`` for one
:class:`~trionet.testing.MemoryNetwork`: it makes listeners, connections and
datagram sockets on the network's hosts, and decides, per datagram, what the
network's faults do to it.  The network hands this object (not itself) to
the context variable trionet reads, so that its own public surface is only
what tests use.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trio

from ..._network import SimulatedNetwork
from ..._transport import Address, PeerCredentials
from ..._util import format_address
from ._hosts import (
    _REUSE_PORT,
    Host,
    Route,
    _backlog,
    _family_of,
    _ip,
    _is_v6,
    _Pair,
    _sockaddr,
)
from ._records import DatagramFate, DatagramRecord
from ._stream import MemoryListener, MemoryStream, Pipe, _error, stream_pair
from ._udp import MemoryDatagramSocket

if TYPE_CHECKING:
    from ._net import MemoryNetwork

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import ExceptionGroup

__all__ = ["SocketCalls"]

#: getaddrinfo's "no address of that family" (not every platform names it).
_EAI_ADDRFAMILY = getattr(socket, "EAI_ADDRFAMILY", socket.EAI_NONAME)


class SocketCalls(SimulatedNetwork):
    """What trionet's socket code calls on one memory network."""

    def __init__(self, network: MemoryNetwork) -> None:
        self._net = network

    @property
    def buffer_size(self) -> int:
        """Bytes a connection direction or a datagram socket holds."""
        return self._net._options.buffer_size

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
        targets = self._net._bind_targets(hosts)
        port = self._net._choose_port("tcp", targets, port, reuse_port)
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
        ips = self._net._resolve(host)
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
        destination = self._net._host_of_ip(ip)
        assert destination is not None
        server = _sockaddr(ip, port)
        v6 = _is_v6(ip)
        source = self._net._current()
        source_ip = source._address(v6)
        if local_address is not None:
            parsed = _ip(local_address)
            owner = None if parsed is None else self._net._host_of_ip(str(parsed))
            if owner is None or _is_v6(str(parsed)) != v6:
                # (trio's words, for the same mistake on the kernel.)
                raise OSError(
                    f"local_address={local_address!r} is incompatible "
                    f"with remote address {server!r}"
                )
            source, source_ip = owner, str(parsed)
        if source_ip is None:
            raise _error(errno.ENETUNREACH, f"{source.name} has no IPv6 address")
        out = Route(self._net, source, destination, local=False)
        back = Route(self._net, destination, source, local=False)
        # The SYN: across a partition it is retried until the link heals
        # (or the caller's connect timeout runs out).
        while not (out.deliverable() and back.deliverable()):
            if source._down:
                raise _error(errno.ENETUNREACH, f"{source.name} is down")
            if destination._down:
                break
            await self._net._changes.park()
        await trio.sleep_until(out.arrival(trio.current_time(), 0))
        while True:
            listener = None if destination._down else destination._find("tcp", ip, port)
            if listener is None or not listener.full:
                break
            await listener.room.park()
        if listener is None:
            await trio.sleep_until(back.arrival(trio.current_time(), 0))
            client = _sockaddr(source_ip, 0)
            self._net._recorder.connection("tcp", client, server).ended("refused")
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
        live = self._net._recorder.connection(kind, client, server)
        size = self._net._options.buffer_size
        to_server = Pipe(routes[0], listener.so_rcvbuf or size, live, True)
        to_client = Pipe(routes[1], listener.so_sndbuf or size, live, False)
        pair = _Pair(self._net, live, (to_server, to_client), hosts, client_port)
        pair.ends = stream_pair(
            to_server, to_client, client, server, credentials, pair.end_closed
        )
        self._net._pairs[live.id] = pair
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
        host = self._net._current()
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
        host = self._net._current()
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
        route = Route(self._net, host, host, local=True)
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
            ips = self._net._resolve(host)
        found = [
            (_family_of(ip), type or socket.SOCK_DGRAM, proto, "", _sockaddr(ip, port))
            for ip in ips
            if family in (0, _family_of(ip))
        ]
        if not found:
            raise socket.gaierror(
                _EAI_ADDRFAMILY, f"no address of that family for {host!r}"
            )
        return found

    def udp_socket(self, family: int) -> MemoryDatagramSocket:
        return MemoryDatagramSocket(self, socket.AddressFamily(family))

    async def bind_udp(
        self, hosts: Sequence[str | None], port: int, *, reuse_port: bool
    ) -> list[Any]:
        await trio.lowlevel.checkpoint()
        targets = self._net._bind_targets(hosts)
        port = self._net._choose_port("udp", targets, port, reuse_port)
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
            for host, bound in self._net._bind_targets([ip or None])
            if _family_of(bound) == sock.family
        ]
        if not targets:
            raise _error(errno.EADDRNOTAVAIL, ip)
        reuse = bool(sock.getsockopt(socket.SOL_SOCKET, _REUSE_PORT))
        sock.reuse_port = reuse
        port = self._net._choose_port("udp", targets[:1], port, reuse)
        self._register_datagram(sock, targets[0][0], targets[0][1], port)

    def _datagram_destination(self, family: int, host: str) -> str:
        """The IP a datagram to ``host`` goes to (OSError as the kernel's)."""
        for ip in self._net._resolve(host):
            if _family_of(ip) == family:
                return ip
        raise _error(errno.EAFNOSUPPORT, f"{host} is of another address family")

    def _send_datagram(
        self,
        sock: MemoryDatagramSocket,
        source: tuple[Any, ...],
        destination: tuple[Any, ...],
        payload: bytes,
    ) -> None:
        """Decide what becomes of one datagram, and record it."""
        origin = sock.host
        target_ip = str(destination[0])
        target_host = self._net._host_of_ip(target_ip)
        assert origin is not None and target_host is not None
        size = len(payload)

        def record(fate: DatagramFate, duplicate: bool = False) -> None:
            self._net._recorder.datagram(
                DatagramRecord(
                    sent_at=self._net._now(),
                    source=source,
                    destination=destination,
                    size=size,
                    fate=fate,
                    duplicate=duplicate,
                )
            )

        if origin._down or target_host._down:
            return record("host down")
        if not self._net._deliverable(origin, target_host, local=False):
            return record("partitioned")
        state = self._net._state(origin, target_host)
        faults = self._net._faults_between(origin, target_host)
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
