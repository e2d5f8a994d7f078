"""Binding server sockets: several addresses, one port (TCP and UDP alike)."""

from __future__ import annotations

import errno
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any

import trio

__all__ = ["DEFAULT_BACKLOG", "bind_sockets", "open_listeners"]

#: listen() backlog when none is given; the kernel caps it (net.core.somaxconn).
DEFAULT_BACKLOG = 0xFFFF
_PORT_ATTEMPTS = 20

_Target = tuple[int, tuple[Any, ...]]


async def _resolve(
    hosts: Sequence[str | None], port: int, sock_type: int
) -> list[_Target]:
    out: list[_Target] = []
    for host in hosts:
        infos = await trio.socket.getaddrinfo(
            host, port, type=sock_type, flags=socket.AI_PASSIVE
        )
        for family, _type, _proto, _name, address in infos:
            target = (int(family), tuple(address))
            if family in (socket.AF_INET, socket.AF_INET6) and target not in out:
                out.append(target)
    if not out:
        raise OSError(f"no IPv4 or IPv6 address to bind for {list(hosts)}")
    return out


async def bind_sockets(
    hosts: Sequence[str | None],
    port: int,
    sock_type: int,
    setup: Callable[[socket.socket], None] = lambda sock: None,
) -> list[socket.socket]:
    """Bind a non-blocking socket to every address of ``hosts``, all on one port.

    ``None`` in ``hosts`` means every interface (IPv4 and IPv6), as trio's
    listeners do.  With ``port=0`` the first socket picks a free port and the
    others bind to the same one -- retrying with a new port if another family
    has it taken -- so one port number is valid for every address.  ``setup``
    sees each socket before it is bound.  Families the system lacks are
    skipped.
    """
    targets = await _resolve(hosts, port, sock_type)
    for _attempt in range(_PORT_ATTEMPTS):
        sockets: list[socket.socket] = []
        chosen = port
        try:
            for family, address in targets:
                try:
                    sock = socket.socket(family, sock_type)
                except OSError as exc:
                    if exc.errno == errno.EAFNOSUPPORT:
                        continue
                    raise
                sockets.append(sock)
                sock.setblocking(False)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                setup(sock)
                sock.bind((address[0], chosen, *address[2:]))
                chosen = sock.getsockname()[1]
        except BaseException as exc:
            for sock in sockets:
                sock.close()
            in_use = isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE
            if port == 0 and in_use and len(sockets) > 1:
                continue
            raise
        if not sockets:
            raise OSError(
                errno.EAFNOSUPPORT, f"no address family of {hosts} works here"
            )
        return sockets
    raise OSError(errno.EADDRINUSE, "no port is free on every address")


async def open_listeners(
    hosts: Sequence[str | None],
    port: int,
    *,
    backlog: int | None = None,
    reuse_port: bool = False,
    so_sndbuf: int | None = None,
    so_rcvbuf: int | None = None,
) -> list[socket.socket]:
    """Listening TCP sockets on every address of ``hosts``, all on one port."""
    options = [(socket.SO_SNDBUF, so_sndbuf), (socket.SO_RCVBUF, so_rcvbuf)]
    if sys.platform != "win32":
        options.append((socket.SO_REUSEADDR, 1))
    if reuse_port:
        options.append((reuse_port_option(), 1))

    def setup(sock: socket.socket) -> None:
        # Accepted sockets inherit the buffer sizes; set them before listen()
        # so the window scale fits the receive buffer.
        for option, value in options:
            if value is not None:
                sock.setsockopt(socket.SOL_SOCKET, option, value)

    sockets = await bind_sockets(hosts, port, socket.SOCK_STREAM, setup)
    try:
        for sock in sockets:
            sock.listen(DEFAULT_BACKLOG if backlog is None else backlog)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def reuse_port_option() -> int:
    """SO_REUSEPORT, or OSError where the platform has none."""
    option: int | None = getattr(socket, "SO_REUSEPORT", None)
    if option is None:
        raise OSError("reuse_port: this platform has no SO_REUSEPORT")
    return option
