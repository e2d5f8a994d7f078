"""Binding server sockets: several addresses, one port (TCP and UDP alike);
a UNIX socket's file.

A UNIX socket's file
--------------------
``open_unix_listener`` creates the file so that it is never more open than
``mode``: on Linux the file ``bind()`` creates takes its permission bits from
the socket's own inode (less the umask), so the socket is ``fchmod``-ed to
``mode`` before the bind; the file is then ``chmod``-ed to exactly ``mode``
(adding back what the umask took) before ``listen()``, so nobody can connect
before the bits are final.  Where ``fchmod`` on a socket fails (not Linux)
the bind runs under a umask of 0o777 instead (the file starts with no
permissions at all).

A file already at the path is looked at first.  A socket that refuses a
connection belongs to a server that is gone and is replaced; one that
accepts (or whose backlog is full) belongs to a live server and is left
alone (EADDRINUSE); one we may not even try is not ours to take (the
error is raised); anything that is not a socket is never touched.  The file
is removed when the server stops listening, only if it is still the one the
bind made (same device and inode): a newer server may have replaced it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import sys
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import trio

from ._network import SimulatedListener, current_network

__all__ = [
    "DEFAULT_BACKLOG",
    "Listener",
    "UnixSocketFile",
    "bind_sockets",
    "open_listeners",
    "open_unix_listener",
]

#: listen() backlog when none is given; the kernel caps it (net.core.somaxconn).
DEFAULT_BACKLOG = 0xFFFF
_PORT_ATTEMPTS = 20

_Target = tuple[int, tuple[Any, ...]]
#: A listening socket, or a simulated network's listener.
Listener = socket.socket | SimulatedListener


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
) -> list[Listener]:
    """Listening TCP sockets on every address of ``hosts``, all on one port
    (listeners of the simulated network, when one is active)."""
    network = current_network()
    if network is not None:
        return list(
            await network.listen_tcp(
                hosts,
                port,
                backlog=backlog,
                reuse_port=reuse_port,
                so_sndbuf=so_sndbuf,
                so_rcvbuf=so_rcvbuf,
            )
        )
    options = _buffer_options(so_sndbuf, so_rcvbuf)
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
    return list(sockets)


def reuse_port_option() -> int:
    """SO_REUSEPORT, or OSError where the platform has none."""
    option: int | None = getattr(socket, "SO_REUSEPORT", None)
    if option is None:
        raise OSError("reuse_port: this platform has no SO_REUSEPORT")
    return option


def _buffer_options(
    so_sndbuf: int | None, so_rcvbuf: int | None
) -> list[tuple[int, int | None]]:
    return [(socket.SO_SNDBUF, so_sndbuf), (socket.SO_RCVBUF, so_rcvbuf)]


@attrs.frozen
class UnixSocketFile:
    """The file a UNIX listener's bind made, known by device and inode."""

    path: str
    device: int
    inode: int

    def remove(self) -> None:
        """Remove the file if it is still this one (a newer server may have
        replaced it since)."""
        try:
            st = os.lstat(self.path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) == (self.device, self.inode):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


#: connect() errors that mean a live server has the path: it accepted, or
#: its backlog is full.
_LIVE = {0, errno.EAGAIN, errno.EWOULDBLOCK, errno.EINPROGRESS}


def _clear_stale(path: str) -> None:
    """Remove a socket file left by a server that is gone; refuse to touch
    anything else at ``path``."""
    try:
        before = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(before.st_mode):
        raise OSError(
            errno.EEXIST, f"{path} exists and is not a socket; not replacing it"
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        error = probe.connect_ex(path)
    if error in _LIVE:
        raise OSError(
            errno.EADDRINUSE,
            f"{path} is in use: a server is listening on it; not taking it over",
        )
    if error == errno.ENOENT:
        return  # (gone meanwhile)
    if error != errno.ECONNREFUSED:
        raise OSError(
            error,
            f"cannot tell whether a server listens on {path} "
            f"({os.strerror(error)}); not replacing it",
        )
    # Nobody listens: a stale file.  Remove it only if it is still the one
    # that was looked at.
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return
    if (now.st_dev, now.st_ino) == (before.st_dev, before.st_ino):
        os.unlink(path)


def _bind_with_mode(sock: socket.socket, path: str, mode: int) -> UnixSocketFile:
    try:
        os.fchmod(sock.fileno(), mode)
    except OSError:
        old = os.umask(0o777)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
    else:
        sock.bind(path)
    st = os.lstat(path)
    made = UnixSocketFile(path, st.st_dev, st.st_ino)
    try:
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
            raise OSError(errno.EPERM, f"{path} changed hands during the bind")
        os.chmod(path, mode)
    except BaseException:
        made.remove()
        raise
    return made


def open_unix_listener(
    path: str | os.PathLike[str],
    *,
    mode: int = 0o600,
    backlog: int | None = None,
    so_sndbuf: int | None = None,
    so_rcvbuf: int | None = None,
) -> tuple[Listener, UnixSocketFile | None]:
    """A listening UNIX stream socket at ``path``, its file made with
    ``mode`` (see the top of this module), and that file's identity --
    or, when a simulated network is active, its listener at ``path`` and
    None (no file is made).

    Raises:
        OSError: EADDRINUSE for a path a live server listens on, EEXIST for
            a file that is not a socket, or whatever the bind reports.
        ValueError: ``mode`` is not a permission mask, or ``path`` is empty
            or in the abstract namespace.
    """
    if not hasattr(socket, "AF_UNIX"):  # pragma: no cover - not on Unix
        raise OSError(errno.EAFNOSUPPORT, "this system has no UNIX sockets")
    path = os.fspath(path)
    if not isinstance(path, str) or not path or path.startswith("\0"):
        raise ValueError(f"path must name a file, not {path!r}")
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777:
        raise ValueError(f"mode must be permission bits 0..0o777, not {mode!r}")
    network = current_network()
    if network is not None:
        listener = network.listen_unix(
            path, backlog=backlog, so_sndbuf=so_sndbuf, so_rcvbuf=so_rcvbuf
        )
        return listener, None
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    made: UnixSocketFile | None = None
    try:
        sock.setblocking(False)
        for option, value in _buffer_options(so_sndbuf, so_rcvbuf):
            if value is not None:
                sock.setsockopt(socket.SOL_SOCKET, option, value)
        made = _bind_with_mode(sock, path, mode)
        sock.listen(DEFAULT_BACKLOG if backlog is None else backlog)
    except BaseException:
        sock.close()
        if made is not None:
            made.remove()
        raise
    return sock, made
