"""Shared helpers for trionet's own tests: connected pairs of every kind."""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
import trustme

import trionet
import trionet.testing
from trionet._connection import Connection

#: The kinds of connected pair every Connection test runs over:
#: "tcp" -- a real loopback TCP client and a server-owned connection;
#: "unix" -- the same over a UNIX domain socket (one implementation with TCP);
#: "memory" -- two connections over trio's in-memory streams (locked sends);
#: "memory-queued" -- in-memory, the second side with a send queue and writer;
#: "memnet", "memnet-unix" -- "tcp" and "unix" again, unchanged, but over
#: trionet.testing.memory_network().
PAIR_KINDS = ["tcp", "unix", "memory", "memory-queued", "memnet", "memnet-unix"]


@asynccontextmanager
async def open_pair(
    kind: str, framing: trionet.Framing | None = None, **server_options: object
) -> AsyncIterator[tuple[Connection, Connection]]:
    """A connected (client, server-side) pair of Connections of the given kind."""
    if kind.startswith("memnet"):
        kernel_kind = "unix" if kind == "memnet-unix" else "tcp"
        async with trionet.testing.memory_network():
            async with open_pair(kernel_kind, framing, **server_options) as pair:
                yield pair
        return
    if kind in ("tcp", "unix"):
        accepted: list[Connection] = []
        arrived = trio.Event()
        done = trio.Event()

        async def handler(conn: Connection) -> None:
            accepted.append(conn)
            arrived.set()
            await done.wait()

        with tempfile.TemporaryDirectory(prefix="trionet-") as directory:
            path = os.path.join(directory, "s.sock")
            if kind == "tcp":
                serving = trionet.open_tcp_server(
                    handler, framing=framing, grace_period=0, **server_options
                )
            else:
                serving = trionet.open_unix_server(
                    handler, path, framing=framing, grace_period=0, **server_options
                )
            async with serving as server:
                if kind == "tcp":
                    connect = trionet.connect_tcp(
                        "127.0.0.1", server.port, framing=framing
                    )
                else:
                    connect = trionet.connect_unix(path, framing=framing)
                client = await connect
                try:
                    await arrived.wait()
                    yield client, accepted[0]
                finally:
                    done.set()
                    await client.aclose()
        return
    left, right = trio.testing.memory_stream_pair()
    if kind == "memory":
        yield Connection(left, framing=framing), Connection(right, framing=framing)
        return
    assert kind == "memory-queued"
    async with trionet.testing.connection_pair(framing, queued=True) as pair:
        yield pair


@asynccontextmanager
async def tls_client_of(
    handler: Callable[[Connection], Awaitable[None]],
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    framing: trionet.Framing | None = None,
) -> AsyncIterator[Connection]:
    """A TLS client connection to a loopback TLS server running ``handler``."""
    async with trionet.open_tcp_server(
        handler, host="127.0.0.1", framing=framing, ssl_context=server_context
    ) as server:
        async with trionet.connect_tcp(
            "127.0.0.1",
            server.port,
            framing=framing,
            ssl_context=client_context,
            server_hostname="localhost",
        ) as client:
            yield client


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    """A certificate authority for TLS tests."""
    return trustme.CA()


@pytest.fixture(scope="session")
def server_context(ca: trustme.CA) -> ssl.SSLContext:
    """A server context with a certificate for "localhost" issued by ``ca``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    return context


@pytest.fixture(scope="session")
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    """A client context that trusts ``ca``."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture(params=PAIR_KINDS)
def pair_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


#: For a test in a module that runs over both networks (see ``network``) but
#: opens kernel sockets of its own, or replaces trio's: kernel only.
kernel_only = pytest.mark.parametrize("network", ["kernel"], indirect=True)


@pytest.fixture(params=["kernel", "memnet"])
def network(
    request: pytest.FixtureRequest,
) -> Iterator[trionet.testing.MemoryNetwork | None]:
    """Run the test twice: over the kernel's loopback, and unchanged over
    a memory network (None, or the network).  A sync fixture, so that the
    network is active before any trio fixture or the test itself starts."""
    if request.param == "kernel":
        yield None
        return
    with trionet.testing.MemoryNetwork().activated() as net:
        yield net


@pytest.fixture
def unix_path() -> Iterator[str]:
    """A path for a UNIX socket, in a fresh directory of its own (removed
    afterwards).  Short: a socket path must fit in about 100 bytes."""
    with tempfile.TemporaryDirectory(prefix="trionet-") as directory:
        yield os.path.join(directory, "s.sock")


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def no_leaked_file_descriptors() -> Iterator[None]:
    """Every test closes every socket it opened (Linux only)."""
    import sys

    if not sys.platform.startswith("linux"):
        yield
        return
    before = _open_fds()
    yield
    leaked = _open_fds() - before
    assert not leaked, f"file descriptors left open: {sorted(leaked)}"
