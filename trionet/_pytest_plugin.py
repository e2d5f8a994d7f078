"""trionet's pytest plugin: servers and clients as fixtures, built on pytest-trio.

pytest loads this module through the ``pytest11`` entry point whenever trionet
is installed.  The fixtures are async and use pytest-trio's ``nursery``
fixture, so they work in trio tests: with ``trio_mode = true`` in the pytest
configuration, or on tests marked ``@pytest.mark.trio``.

How this works
--------------

Every server a fixture starts is recorded in one per-test registry, the
private ``_trionet_servers`` fixture, and runs in that fixture's nursery
(pytest-trio gives each fixture a nursery that lives until the fixture's
teardown has finished).  ``tcp_client`` depends on the registry too, and
pytest-trio tears a fixture down only after everything that uses it, so the
order at the end of a test is always:

1. the clients ``tcp_client`` made are closed (handlers see end of stream);
2. every server is shut down gracefully, all at once;
3. any exception that escaped a handler fails the test, with the handler's
   name and each exception's traceback in the message.

trionet is imported only when a fixture runs, so merely loading the plugin
(which pytest does before coverage measurement starts) imports nothing else.
"""

from __future__ import annotations

import dataclasses
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeAlias

import pytest

if TYPE_CHECKING:
    import trio

    import trionet
    import trionet.testing

__all__ = [
    "echo_server",
    "memory_network",
    "pytest_configure",
    "tcp_client",
    "tcp_server",
    "udp_server",
]

#: How many handler tracebacks a failure message shows in full.
_TRACEBACKS_SHOWN = 3
#: Listen addresses that mean "every interface", and the loopback to dial instead.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


class _ServerFraming:
    """Marker default of ``tcp_client(framing=...)``: use the server's framing."""

    def __repr__(self) -> str:
        return "<the server's framing>"


_SERVER_FRAMING = _ServerFraming()

ServerTarget: TypeAlias = "trionet.Server | tuple[str, int] | int"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "memory_network(**options): options of the test's memory_network "
        "fixture (seed, buffer_size, capture_bytes, max_records)",
    )


def _describe(handler: object) -> str:
    name = getattr(handler, "__qualname__", None)
    return f"{name}()" if isinstance(name, str) else repr(handler)


@dataclasses.dataclass
class _Started:
    """One server a fixture started."""

    fixture: str
    server: trionet.Server | trionet.UdpServer
    handler: object
    stopped: trio.Event

    def failure(self) -> str | None:
        """What to tell the user if exceptions escaped the handler, else None."""
        import trionet
        from trionet._util import format_address

        server = self.server
        where = format_address(server.addresses[0])
        if isinstance(server, trionet.UdpServer):
            what, unit = f"UDP server on {where}", "peer"
        else:
            what, unit = f"TCP server on {where}", "connection"
        errors = server.handler_exceptions
        count = server.statistics().handler_errors
        if not count:
            return None
        return _failure(self.fixture, what, self.handler, errors, count, unit)


class _Registry:
    """The servers started during one test, and their teardown."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.started: list[_Started] = []

    async def _start(
        self,
        fixture: str,
        serve: Callable[..., Awaitable[object]],
        handler: Callable[[Any], Awaitable[object]],
        options: dict[str, Any],
    ) -> _Started:
        import trio

        options.setdefault("host", "127.0.0.1")
        port = options.pop("port", 0)
        stopped = trio.Event()

        async def run(task_status: trio.TaskStatus[Any]) -> None:
            try:
                await serve(handler, port, task_status=task_status, **options)
            finally:
                stopped.set()

        server = await self.nursery.start(run)
        started = _Started(fixture, server, handler, stopped)
        self.started.append(started)
        return started

    async def start_tcp(
        self,
        fixture: str,
        handler: Callable[[trionet.Connection], Awaitable[object]],
        framing: trionet.Framing | None,
        options: dict[str, Any],
    ) -> trionet.Server:
        import trionet

        options["framing"] = framing
        started = await self._start(fixture, trionet.serve_tcp, handler, options)
        assert isinstance(started.server, trionet.Server)
        return started.server

    async def start_udp(
        self,
        fixture: str,
        handler: Callable[[trionet.UdpPeer], Awaitable[object]],
        options: dict[str, Any],
    ) -> trionet.UdpServer:
        import trionet

        # UDP has no end of stream to wait for: unless told otherwise, the
        # handlers are cancelled at the end of the test, without a grace period.
        options.setdefault("grace_period", 0)
        started = await self._start(fixture, trionet.serve_udp, handler, options)
        assert isinstance(started.server, trionet.UdpServer)
        return started.server

    async def aclose(self) -> None:
        """Shut every server down, wait until each has stopped, report errors."""
        import trio

        async with trio.open_nursery() as nursery:
            for started in self.started:
                nursery.start_soon(started.server.aclose)
        for started in self.started:
            await started.stopped.wait()
        failures = [
            message
            for started in self.started
            if (message := started.failure()) is not None
        ]
        if failures:
            pytest.fail("\n\n".join(failures), pytrace=False)


def _failure(
    fixture: str,
    what: str,
    handler: object,
    errors: list[BaseException],
    count: int,
    unit: str,
) -> str:
    noun = "exception" if count == 1 else "exceptions"
    lines = [
        f"trionet {fixture}: the handler {_describe(handler)} of the {what} "
        f"raised {count} {noun} (each was logged and closed only its own {unit}):"
    ]
    for exc in errors[:_TRACEBACKS_SHOWN]:
        lines.append("")
        lines.append("".join(traceback.format_exception(exc)).rstrip())
    rest = errors[_TRACEBACKS_SHOWN:]
    if rest:
        lines.append("")
        lines.append(f"... and {len(rest)} more: " + ", ".join(map(repr, rest)))
    return "\n".join(lines)


@pytest.fixture
async def _trionet_servers(nursery: trio.Nursery) -> AsyncIterator[_Registry]:
    """The servers the trionet fixtures started in this test (internal)."""
    registry = _Registry(nursery)
    yield registry
    await registry.aclose()


@pytest.fixture
async def tcp_server(
    _trionet_servers: _Registry,
) -> Callable[..., Awaitable[trionet.Server]]:
    """A factory that starts :func:`trionet.serve_tcp` servers for this test.

    ::

        async def test_greeting(tcp_server, tcp_client):
            server = await tcp_server(greet, framing=trionet.Lines())
            conn = await tcp_client(server)
            assert await conn.receive() == b"hello"

    ``await tcp_server(handler, framing=None, **options)`` listens on
    127.0.0.1 and a free port (pass ``host=`` or ``port=`` to change that),
    takes every :class:`trionet.ServerOptions` keyword, and returns the
    running :class:`trionet.Server`.  The server runs in the test's nursery.
    At the end of the test, after the clients ``tcp_client`` made are closed,
    it is shut down gracefully (:meth:`trionet.Server.aclose`), and if any
    exception escaped the handler the test fails, showing it.

    .. versionadded:: 0.1
    """

    async def start(
        handler: Callable[[trionet.Connection], Awaitable[object]],
        *,
        framing: trionet.Framing | None = None,
        **options: Any,
    ) -> trionet.Server:
        return await _trionet_servers.start_tcp("tcp_server", handler, framing, options)

    return start


@pytest.fixture
async def udp_server(
    _trionet_servers: _Registry,
) -> Callable[..., Awaitable[trionet.UdpServer]]:
    """A factory that starts :func:`trionet.serve_udp` servers for this test.

    ::

        async def test_ping(udp_server):
            server = await udp_server(echo)
            async with trionet.open_udp(remote=("127.0.0.1", server.port)) as ep:
                await ep.send(b"ping")
                assert await ep.receive() == b"ping"

    ``await udp_server(handler, **options)`` binds 127.0.0.1 and a free port
    (pass ``host=`` or ``port=`` to change that), takes every
    :class:`trionet.UdpServerOptions` keyword, and returns the running
    :class:`trionet.UdpServer`.  At the end of the test the server is shut
    down (:meth:`trionet.UdpServer.aclose`); since UDP has no end of stream
    that tells a handler to finish, ``grace_period`` is 0 here unless you
    pass one, so open peers are closed with ``SHUTDOWN`` and their handlers
    cancelled at once.  If any exception escaped the handler (other than the
    end of its own peer, see :attr:`trionet.UdpServer.handler_exceptions`)
    the test fails, showing it.

    .. versionadded:: 0.1
    """

    async def start(
        handler: Callable[[trionet.UdpPeer], Awaitable[object]], **options: Any
    ) -> trionet.UdpServer:
        return await _trionet_servers.start_udp("udp_server", handler, options)

    return start


@pytest.fixture
async def echo_server(_trionet_servers: _Registry) -> trionet.Server:
    """A running line echo server (a :class:`trionet.Server` on 127.0.0.1).

    Every line a client sends comes back to it unchanged.  The server's
    framing is ``trionet.Lines()``, which ``tcp_client`` picks up::

        async def test_echo(echo_server, tcp_client):
            conn = await tcp_client(echo_server)
            await conn.send("hi")
            assert await conn.receive() == b"hi"

    .. versionadded:: 0.1
    """
    import trionet

    async def echo(conn: trionet.Connection) -> None:
        async for line in conn:
            await conn.send(line)

    return await _trionet_servers.start_tcp("echo_server", echo, trionet.Lines(), {})


@pytest.fixture
async def tcp_client(
    _trionet_servers: _Registry,
) -> AsyncIterator[Callable[..., Awaitable[trionet.Connection]]]:
    """A factory of :func:`trionet.connect_tcp` clients, closed at test end.

    ``conn = await tcp_client(server, framing=..., **options)`` connects to
    ``server``: a :class:`trionet.Server` (from ``tcp_server``,
    ``echo_server`` or elsewhere), a ``(host, port)`` tuple, or a port on
    127.0.0.1.  Without ``framing`` it uses the server's framing when given a
    :class:`trionet.Server`, else raw bytes.  Other keywords go to
    :func:`trionet.connect_tcp`.  Every connection it made is closed at the
    end of the test, before the fixtures' servers shut down.

    .. versionadded:: 0.1
    """
    import trionet

    clients: list[trionet.Connection] = []

    async def connect(
        server: ServerTarget,
        *,
        framing: trionet.Framing | _ServerFraming | None = _SERVER_FRAMING,
        **options: Any,
    ) -> trionet.Connection:
        host, port = _target(server)
        if isinstance(framing, _ServerFraming):
            framing = server.framing if isinstance(server, trionet.Server) else None
        conn = await trionet.connect_tcp(host, port, framing=framing, **options)
        clients.append(conn)
        return conn

    yield connect
    for conn in reversed(clients):
        await conn.aclose()


def _target(server: ServerTarget) -> tuple[str, int]:
    import trionet

    if isinstance(server, trionet.Server):
        if server.port is None:
            raise TypeError(
                f"tcp_client needs a TCP server; {server!r} listens on a UNIX "
                "socket (connect with trionet.connect_unix(server.path))"
            )
        host = str(server.addresses[0][0])
        return _WILDCARDS.get(host, host), server.port
    if isinstance(server, tuple) and len(server) == 2:
        return server[0], server[1]
    if isinstance(server, int) and not isinstance(server, bool):
        return "127.0.0.1", server
    raise TypeError(
        "tcp_client needs a trionet.Server, a (host, port) tuple or a port, "
        f"not {server!r}"
    )


@pytest.fixture
def memory_network(
    request: pytest.FixtureRequest,
) -> Iterator[trionet.testing.MemoryNetwork]:
    """Run the test over a fresh in-memory network instead of the kernel's.

    ::

        @pytest.mark.memory_network(seed=7)
        async def test_partition(memory_network, echo_server, tcp_client):
            conn = await tcp_client(echo_server)
            memory_network.add_host("db")
            ...

    Every trionet server and client of the test -- including those of the
    ``tcp_server``, ``tcp_client``, ``udp_server`` and ``echo_server``
    fixtures, whatever order they are requested in -- runs over the
    :class:`trionet.testing.MemoryNetwork` this returns.  Give the network's
    options with a marker: ``@pytest.mark.memory_network(seed=7)``.

    .. versionadded:: 0.1
    """
    import trionet.testing

    marker = request.node.get_closest_marker("memory_network")
    options = {} if marker is None else dict(marker.kwargs)
    with trionet.testing.MemoryNetwork(**options).activated() as network:
        yield network
