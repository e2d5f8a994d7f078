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
* UDP sockets are :class:`trio.socket.SocketType` objects: the UDP code
  drives them with the same calls as trio's own UDP sockets;
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
    def udp_socket(self, family: int) -> trio.socket.SocketType:
        """An unbound UDP socket, driven as a trio socket is."""

    @abc.abstractmethod
    async def bind_udp(
        self, hosts: Sequence[str | None], port: int, *, reuse_port: bool
    ) -> list[trio.socket.SocketType]:
        """Bound UDP sockets on every address of ``hosts``, all on one port."""
