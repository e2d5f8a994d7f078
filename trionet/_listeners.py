"""Listening sockets: several addresses, one port."""

from __future__ import annotations

import errno
import socket
import sys
from collections.abc import Sequence

__all__ = ["DEFAULT_BACKLOG", "open_listeners"]

#: listen() backlog when none is given; the kernel caps it (net.core.somaxconn).
DEFAULT_BACKLOG = 0xFFFF
_PORT_ATTEMPTS = 20


def _resolve(
    hosts: Sequence[str | None], port: int
) -> list[tuple[int, tuple[object, ...]]]:
    seen: set[tuple[int, tuple[object, ...]]] = set()
    out: list[tuple[int, tuple[object, ...]]] = []
    for host in hosts:
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, _type, _proto, _name, address in infos:
            key = (int(family), tuple(address))
            if family in (socket.AF_INET, socket.AF_INET6) and key not in seen:
                seen.add(key)
                out.append(key)
    if not out:
        raise OSError(f"no IPv4 or IPv6 address to listen on for {list(hosts)}")
    return out


def _bind_one(
    family: int,
    address: tuple[object, ...],
    port: int,
    backlog: int,
    reuse_port: bool,
    buffers: dict[int, int],
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # Accepted sockets inherit these; set before listen() so the window
        # scale fits the receive buffer.
        for option, size in buffers.items():
            sock.setsockopt(socket.SOL_SOCKET, option, size)
        if sys.platform != "win32":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            reuse: int | None = getattr(socket, "SO_REUSEPORT", None)
            if reuse is None:
                raise OSError("reuse_port: this platform has no SO_REUSEPORT")
            sock.setsockopt(socket.SOL_SOCKET, reuse, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address[0], port, *address[2:]))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def open_listeners(
    hosts: Sequence[str | None],
    port: int,
    *,
    backlog: int | None = None,
    reuse_port: bool = False,
    so_sndbuf: int | None = None,
    so_rcvbuf: int | None = None,
) -> list[socket.socket]:
    """Bind and listen on every address of ``hosts``, all on one port.

    With ``port=0`` the first socket picks a free port and the others bind to
    the same one (retrying with a new port if another family has it taken), so
    the server's port is valid for every address.  ``None`` in ``hosts`` means
    every interface, as trio's listeners do.
    """
    addresses = _resolve(hosts, port)
    buffers = {
        option: size
        for option, size in (
            (socket.SO_SNDBUF, so_sndbuf),
            (socket.SO_RCVBUF, so_rcvbuf),
        )
        if size is not None
    }
    backlog = DEFAULT_BACKLOG if backlog is None else backlog
    for _attempt in range(_PORT_ATTEMPTS):
        sockets: list[socket.socket] = []
        chosen = port
        try:
            for family, address in addresses:
                sock = _bind_one(family, address, chosen, backlog, reuse_port, buffers)
                sockets.append(sock)
                chosen = sock.getsockname()[1]
        except OSError as exc:
            for sock in sockets:
                sock.close()
            if port == 0 and exc.errno == errno.EADDRINUSE and sockets:
                continue
            raise
        return sockets
    raise OSError(errno.EADDRINUSE, "no port is free on every listen address")
