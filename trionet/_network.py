"""Where sockets come from: the kernel, or a simulated network for tests.

How this works
--------------
trionet's servers and clients make kernel sockets -- unless a simulated
network is active in the current context (:func:`trionet.testing.memory_network`
sets one).  Then the few places that *make* sockets ask it instead: binding
listeners (``_listeners``), connecting (``_client``), and making UDP sockets
and resolving their addresses (``_udp``).  Each of them reads one context
variable, once, when the socket is made; nothing that runs per message or
per received chunk ever looks at it, so code under no simulated network runs
exactly as before.

A context variable, not a global: the network is active for the block that
set it and for every task started from inside that block (trio copies the
context into each new task), so two tests -- or two networks in one test --
never share one.

What a simulated network hands back is described here, below every layer
that uses it, so that imports keep pointing down:

* :class:`SimulatedListener` -- what a server's accept loop drives instead
  of a listening socket;
* :class:`SimulatedStream` -- a connected byte stream, a
  :class:`trio.abc.HalfCloseableStream` that also knows its addresses and
  can be closed without awaiting (as a socket can);
* :class:`SimulatedDatagramSocket` -- a UDP socket, driven as the UDP fast
  path drives a non-blocking stdlib socket (calls that return at once,
  :class:`BlockingIOError` when they would block), with waits of its own in
  place of trio's ``wait_readable``/``wait_writable``, and a trio-socket
  face for what the fast path leaves to trio (binding, connecting, sending
  to a name);
* :class:`SimulatedNetwork` -- the calls that make those.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from ._transport import Address, PeerCredentials

__all__ = [
    "SimulatedDatagramSocket",
    "SimulatedListener",
    "SimulatedNetwork",
    "SimulatedStream",
    "active_network",
    "current_network",
]

#: The simulated network of this context; None: the kernel's.
active_network: ContextVar[SimulatedNetwork | None] = ContextVar(
    "trionet_network", default=None
)


def current_network() -> SimulatedNetwork | None:
    """The simulated network active in this context, or None for the kernel."""
    return active_network.get()


class SimulatedStream(trio.abc.HalfCloseableStream):
    """One end of a connection over a simulated network."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close at once, as closing a socket does (no await needed)."""

    @abc.abstractmethod
    def endpoints(
        self,
    ) -> tuple[Address | None, Address | None, PeerCredentials | None]:
        """(local address, remote address, peer credentials), as a socket
        would report them."""

    @abc.abstractmethod
    def send_nowait(self, data: bytes | memoryview) -> int:
        """Send what fits now, without waiting (as a non-blocking socket's
        ``send`` does); return the byte count."""

    @abc.abstractmethod
    def refuse(self) -> None:
        """A server refused this client: drop what it sent so far (bounded)
        and end the stream, so that the client sees an end of stream rather
        than a reset."""


class SimulatedDatagramSocket(abc.ABC):
    """A UDP socket of a simulated network (see the top of this module).

    The calls mean what the socket module's do on a non-blocking socket,
    and raise the :class:`OSError` the kernel would.
    """

    @property
    @abc.abstractmethod
    def family(self) -> int:
        """The address family (AF_INET or AF_INET6)."""

    @abc.abstractmethod
    def fileno(self) -> int:
        """-1 once closed (no descriptor exists otherwise either)."""

    @abc.abstractmethod
    def setblocking(self, flag: bool) -> None:
        """Accepted and ignored: the socket never blocks."""

    @abc.abstractmethod
    def setsockopt(self, level: int, optname: int, value: int | bytes) -> None:
        """Set an option (SO_RCVBUF bounds the receive queue; most others
        are only remembered)."""

    @abc.abstractmethod
    def getsockname(self) -> tuple[Any, ...]:
        """The bound address."""

    @abc.abstractmethod
    def getpeername(self) -> tuple[Any, ...]:
        """The connected remote (OSError ENOTCONN if none)."""

    @abc.abstractmethod
    def send(self, data: bytes) -> int:
        """Send to the connected remote."""

    @abc.abstractmethod
    def sendto(self, data: bytes, address: tuple[Any, ...]) -> int:
        """Send to ``address`` (an IP address, not a name)."""

    @abc.abstractmethod
    def recvfrom(self, bufsize: int, flags: int = 0) -> tuple[bytes, tuple[Any, ...]]:
        """The next datagram that has arrived (BlockingIOError: none)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close; a task waiting on the socket gets ClosedResourceError."""

    @abc.abstractmethod
    async def wait_readable(self) -> None:
        """Wait until :meth:`recvfrom` has something to return."""

    @abc.abstractmethod
    async def wait_writable(self) -> None:
        """Wait until :meth:`sendto` would not block."""

    @abc.abstractmethod
    def trio_socket(self) -> trio.socket.SocketType:
        """The same socket as a trio socket (bind, connect, send to a name)."""


class SimulatedListener(abc.ABC):
    """A listening endpoint of a simulated network, driven like a
    non-blocking listening socket."""

    @abc.abstractmethod
    def getsockname(self) -> Address:
        """The bound address."""

    @abc.abstractmethod
    def accept(self) -> tuple[SimulatedStream, Address]:
        """Take one waiting client.

        Raises:
            BlockingIOError: nobody is waiting.
            OSError: the listener is closed (EBADF).
        """

    @abc.abstractmethod
    async def wait_acceptable(self) -> None:
        """Wait until a client is waiting.

        Raises:
            trio.ClosedResourceError: the listener was closed.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Stop listening; clients not yet accepted are reset."""


class SimulatedNetwork(abc.ABC):
    """What trionet asks of a simulated network.  Every error is the
    :class:`OSError` the kernel would raise in the same situation."""

    @abc.abstractmethod
    async def listen_tcp(
        self,
        hosts: Sequence[str | None],
        port: int,
        *,
        backlog: int | None,
        reuse_port: bool,
        so_sndbuf: int | None,
        so_rcvbuf: int | None,
    ) -> list[SimulatedListener]:
        """Listeners on every address of ``hosts``, all on one port."""

    @abc.abstractmethod
    def listen_unix(
        self,
        path: str,
        *,
        backlog: int | None,
        so_sndbuf: int | None,
        so_rcvbuf: int | None,
    ) -> SimulatedListener:
        """A listener at ``path`` (a name: no file is made)."""

    @abc.abstractmethod
    async def connect_tcp(
        self, host: str, port: int, local_address: str | None
    ) -> SimulatedStream:
        """A client stream to ``host``, as :func:`trio.open_tcp_stream` gives."""

    @abc.abstractmethod
    async def connect_unix(self, path: str) -> SimulatedStream:
        """A client stream to the listener at ``path``."""

    @abc.abstractmethod
    async def getaddrinfo(
        self,
        host: str | None,
        port: int,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[tuple[Any, ...]]:
        """Resolve as :func:`trio.socket.getaddrinfo` does, in the
        simulated network's own namespace."""

    @abc.abstractmethod
    def udp_socket(self, family: int) -> SimulatedDatagramSocket:
        """An unbound UDP socket."""

    @abc.abstractmethod
    async def bind_udp(
        self, hosts: Sequence[str | None], port: int, *, reuse_port: bool
    ) -> list[SimulatedDatagramSocket]:
        """Bound UDP sockets on every address of ``hosts``, all on one port."""
