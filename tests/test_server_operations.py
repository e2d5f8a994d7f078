"""Server operations over real loopback TCP: registry, broadcast, accept filter,
connection limit, idle timeout, graceful shutdown, TLS, statistics and hooks."""

from __future__ import annotations

import socket
import ssl

import pytest
import trio
import trio.lowlevel
import trio.testing
import trustme

import trionet
from trionet import CloseReason, ConnectError, ConnectionClosed

from .conftest import kernel_only
from .test_server import echo_lines

#: Every test here runs over the kernel and over a memory network.
pytestmark = pytest.mark.usefixtures("network")


async def wait_until_closed(server: trionet.Server, count: int) -> None:
    """Block until ``count`` connections have ended (any reason) and every
    connection task has let its slot go."""
    for _ in range(1000):
        stats = server.statistics()
        if sum(stats.closed.values()) >= count and stats.open == len(
            server.connections
        ):
            return
        await trio.testing.wait_all_tasks_blocked()
    raise AssertionError(f"{count} closes expected; stats: {server.statistics()}")


async def test_registry_tracks_open_connections() -> None:
    async with trionet.open_tcp_server(echo_lines) as server:
        assert server.connections == []
        first = await trionet.connect_tcp("127.0.0.1", server.port)
        second = await trionet.connect_tcp("127.0.0.1", server.port)
        await trio.testing.wait_all_tasks_blocked()
        assert len(server.connections) == 2
        assert {c.remote_address for c in server.connections} == {
            first.local_address,
            second.local_address,
        }
        await first.aclose()
        await wait_until_closed(server, 1)
        assert [c.remote_address for c in server.connections] == [second.local_address]
        await second.aclose()


@kernel_only
async def test_broadcast_evicts_only_the_slow_consumer() -> None:
    """200 connections, one never reads: it is closed as SLOW_CONSUMER and the
    199 others receive every broadcast, in order."""
    readers, total, window = 199, 400, 16
    payload = b"x" * 1000
    received = [0] * readers
    progress = trio.Event()

    async def read(index: int, conn: trionet.Connection) -> None:
        expected = 0
        async for message in conn:
            assert int(message[:8]) == expected, "out of order or lost"
            assert message[8:] == payload
            expected += 1
            received[index] = expected
            progress.set()
            if expected == total:
                return

    async def idle(conn: trionet.Connection) -> None:
        await trio.sleep_forever()

    framing = trionet.Frames()
    async with trionet.open_tcp_server(
        idle, framing=framing, send_queue_size=64, so_sndbuf=16384, grace_period=0
    ) as server:
        # The non-reader gets a tiny receive buffer so it backs up quickly.
        stuck = trio.socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await stuck.connect(("127.0.0.1", server.port))
        async with trio.open_nursery() as nursery:
            conns = []
            for index in range(readers):
                conn = await trionet.connect_tcp(
                    "127.0.0.1", server.port, framing=framing
                )
                conns.append(conn)
                nursery.start_soon(read, index, conn)
            while server.statistics().accepted < readers + 1:
                await trio.lowlevel.checkpoint()
            for number in range(total):
                await server.broadcast(b"%08d" % number + payload)
                if number % window == window - 1:
                    # Readers keep pace with the broadcasts.
                    while min(received) <= number - window:
                        progress = trio.Event()
                        await progress.wait()
        assert received == [total] * readers
        closed = server.statistics().closed
        assert closed == {CloseReason.SLOW_CONSUMER: 1}
        assert len(server.connections) == readers
        # The evicted connection's handler still runs (and holds its slot).
        assert server.statistics().open == readers + 1
        for conn in conns:
            await conn.aclose()
        stuck.close()


async def test_send_waits_while_its_own_queue_is_full() -> None:
    sent = 0
    release = trio.Event()

    async def flood(conn: trionet.Connection) -> None:
        nonlocal sent
        for _ in range(100_000):
            await conn.send(b"y" * 65536)
            sent += 1
        release.set()

    async with trionet.open_tcp_server(flood, send_queue_size=4) as server:
        conn = await trionet.connect_tcp("127.0.0.1", server.port)
        await trio.testing.wait_all_tasks_blocked()
        # The handler is blocked on backpressure, nothing was dropped.
        blocked_at = sent
        assert blocked_at < 100_000
        assert server.connections[0].statistics().queued_messages == 4
        assert server.statistics().closed == {}
        data = await conn.receive_exactly(65536 * (blocked_at + 4))
        assert data == b"y" * len(data)
        await conn.aclose()


async def test_broadcast_and_send_share_one_order() -> None:
    gate = trio.Event()

    async def handler(conn: trionet.Connection) -> None:
        await conn.send(b"handler-1")
        await gate.wait()
        await conn.send(b"handler-2")
        await trio.sleep_forever()

    async with (
        trionet.open_tcp_server(
            handler, framing=trionet.Lines(), grace_period=0
        ) as server,
        trionet.connect_tcp("127.0.0.1", server.port, framing=trionet.Lines()) as conn,
    ):
        assert await conn.receive() == b"handler-1"
        await server.broadcast("broadcast-1")
        gate.set()
        await trio.testing.wait_all_tasks_blocked()
        await server.broadcast("broadcast-2")
        got = [await conn.receive() for _ in range(3)]
        assert got == [b"broadcast-1", b"handler-2", b"broadcast-2"]


@pytest.mark.parametrize("is_async", [False, True])
async def test_accept_filter_rejects_without_running_the_handler(
    is_async: bool,
) -> None:
    ran: list[object] = []
    seen: list[object] = []
    allowed = {"count": 1}

    def decide(address: object) -> bool:
        seen.append(address)
        allowed["count"] -= 1
        return allowed["count"] >= 0

    async def decide_async(address: object) -> bool:
        await trio.lowlevel.checkpoint()
        return decide(address)

    async def handler(conn: trionet.Connection) -> None:
        ran.append(conn)
        await echo_lines(conn)

    accept = decide_async if is_async else decide
    async with trionet.open_tcp_server(handler, accept=accept) as server:
        good = await trionet.connect_tcp("127.0.0.1", server.port)
        refused = await trionet.connect_tcp("127.0.0.1", server.port)
        assert await refused.receive_some() == b""
        await good.send_line(b"ok")
        assert await good.receive_line() == b"ok"
        assert seen == [good.local_address, refused.local_address]
        assert len(ran) == 1
        stats = server.statistics()
        assert (stats.accepted, stats.rejected) == (1, 1)
        assert stats.closed == {CloseReason.REJECTED: 1}
        await good.aclose()
        await refused.aclose()


async def test_max_connections_limits_handlers_and_serves_everyone() -> None:
    limit, clients = 10, 30
    running = 0
    peak = 0

    release = trio.Event()

    async def handler(conn: trionet.Connection) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await release.wait()
            line = await conn.receive_line()
            await conn.send_line(line)
        finally:
            running -= 1

    answered: list[int] = []

    async def client(number: int, port: int) -> None:
        async with trionet.connect_tcp("127.0.0.1", port) as conn:
            await conn.send_line(b"%d" % number)
            answered.append(int(await conn.receive_line()))

    async with trionet.open_tcp_server(handler, max_connections=limit) as server:
        async with trio.open_nursery() as nursery:
            for number in range(clients):
                nursery.start_soon(client, number, server.port)
            await trio.testing.wait_all_tasks_blocked()
            # Everyone is connected at the kernel level, but only `limit` are served.
            assert server.statistics().open == limit
            assert running == limit
            release.set()
    assert sorted(answered) == list(range(clients))
    assert peak == limit


async def test_server_idle_timeout(autojump_clock: trio.testing.MockClock) -> None:
    seen: list[CloseReason] = []

    async def handler(conn: trionet.Connection) -> None:
        try:
            await conn.receive_line()
        except ConnectionClosed as exc:
            seen.append(exc.reason)
            raise

    async with trionet.open_tcp_server(handler, idle_timeout=30) as server:
        async with trionet.connect_tcp("127.0.0.1", server.port) as conn:
            start = trio.current_time()
            assert await conn.receive_some() == b""
            assert trio.current_time() - start == pytest.approx(30, abs=0.1)
        await wait_until_closed(server, 1)
        assert seen == [CloseReason.TIMEOUT]
        assert server.statistics().closed == {CloseReason.TIMEOUT: 1}


async def test_graceful_shutdown_flushes_everything_sent_before_it() -> None:
    """50 clients mid-stream: each receives every message the server sent
    before shutdown began, then a clean close."""
    clients = 50
    sent_before: dict[int, int] = {}
    sent_count: dict[int, int] = {}
    closing = False

    async def stream(conn: trionet.Connection) -> None:
        ident = int(await conn.receive_line())
        sent_count[ident] = 0
        for number in range(1_000_000):
            await conn.send_line(b"%d" % number)
            sent_count[ident] = number + 1
            if closing and ident not in sent_before:
                sent_before[ident] = number + 1

    results: dict[int, list[int]] = {}

    async def client(ident: int, port: int, started: trio.Event) -> None:
        async with trionet.connect_tcp("127.0.0.1", port, framing=trionet.Lines()) as c:
            await c.send(b"%d" % ident)
            got: list[int] = []
            async for line in c:
                got.append(int(line))
                if len(got) == 100:
                    started.set()
            results[ident] = got

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: trionet.serve_tcp(
                stream, 0, host="127.0.0.1", task_status=task_status
            )
        )
        events = []
        for ident in range(clients):
            started = trio.Event()
            events.append(started)
            nursery.start_soon(client, ident, server.port, started)
        for started in events:
            await started.wait()
        snapshot = dict(sent_count)
        closing = True
        await server.aclose(grace_period=0.05)
    for ident in range(clients):
        got = results[ident]
        assert got == list(range(len(got)))  # in order, nothing missing
        assert len(got) >= snapshot[ident]
        assert len(got) == sent_count[ident]  # everything sent was flushed
    assert server.statistics().closed == {CloseReason.SHUTDOWN: clients}


@kernel_only
async def test_shutdown_flush_is_bounded_by_flush_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def flood(conn: trionet.Connection) -> None:
        while True:
            await conn.send(b"z" * 65536)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: trionet.serve_tcp(
                flood, 0, host="127.0.0.1", flush_timeout=3, task_status=task_status
            )
        )
        stuck = trio.socket.socket()
        await stuck.connect(("127.0.0.1", server.port))
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        await server.aclose(grace_period=1)
        # grace period, then at most the flush timeout; the peer never read.
        assert trio.current_time() - start == pytest.approx(4, abs=0.1)
        assert server.statistics().closed == {CloseReason.SHUTDOWN: 1}
        stuck.close()


async def test_tls_echo(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    async with trionet.open_tcp_server(
        echo_lines, framing=trionet.Lines(), ssl_context=server_context
    ) as server:
        async with trionet.connect_tcp(
            "127.0.0.1",
            server.port,
            framing=trionet.Lines(),
            ssl_context=client_context,
            server_hostname="localhost",
        ) as conn:
            await conn.send(b"secret")
            assert await conn.receive() == b"secret"
            assert conn.remote_address == ("127.0.0.1", server.port)
        await wait_until_closed(server, 1)
        assert server.statistics().closed == {CloseReason.CLOSED_BY_PEER: 1}


async def test_tls_wrong_ca_fails_and_server_keeps_serving(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    stranger = ssl.create_default_context()
    trustme.CA().configure_trust(stranger)
    async with trionet.open_tcp_server(
        echo_lines, ssl_context=server_context
    ) as server:
        with pytest.raises(ConnectError) as info:
            await trionet.connect_tcp(
                "127.0.0.1",
                server.port,
                ssl_context=stranger,
                server_hostname="localhost",
            )
        assert info.value.reason is CloseReason.ERROR
        await wait_until_closed(server, 1)
        assert server.statistics().closed == {CloseReason.ERROR: 1}
        assert server.statistics().accepted == 0
        async with trionet.connect_tcp(
            "127.0.0.1",
            server.port,
            ssl_context=client_context,
            server_hostname="localhost",
        ) as conn:
            await conn.send_line(b"after")
            assert await conn.receive_line() == b"after"


async def test_tls_plaintext_client_is_an_error(server_context: ssl.SSLContext) -> None:
    async with trionet.open_tcp_server(
        echo_lines, ssl_context=server_context
    ) as server:
        async with trionet.connect_tcp("127.0.0.1", server.port) as conn:
            await conn.send_all(b"GET / HTTP/1.0\r\n\r\n")
            # The server answers with a TLS alert at most, then hangs up at
            # once: its socket is closed, not left for the collector.
            with trio.fail_after(10):
                for _ in range(100):
                    if not await conn.receive_some():
                        break
                else:
                    raise AssertionError("the server kept the plaintext client open")
        await wait_until_closed(server, 1)
        assert server.statistics().closed == {CloseReason.ERROR: 1}


async def test_stats_count_bytes_and_reasons() -> None:
    async with trionet.open_tcp_server(echo_lines, framing=trionet.Lines()) as server:
        async with trionet.connect_tcp("127.0.0.1", server.port) as conn:
            await conn.send_line(b"12345")
            assert await conn.receive_line() == b"12345"
            stats = server.statistics()
            assert (stats.accepted, stats.open, stats.rejected) == (1, 1, 0)
            assert (stats.bytes_received, stats.bytes_sent) == (6, 6)
        await wait_until_closed(server, 1)
        stats = server.statistics()
        assert stats.open == 0
        assert (stats.bytes_received, stats.bytes_sent) == (6, 6)
        assert stats.closed == {CloseReason.CLOSED_BY_PEER: 1}


async def test_lifecycle_hooks_called_once_each() -> None:
    events: list[tuple[str, object]] = []

    def on_connect(conn: trionet.Connection) -> None:
        events.append(("connect", conn.close_reason))

    async def on_close(conn: trionet.Connection) -> None:
        await trio.lowlevel.checkpoint()
        events.append(("close", conn.close_reason))

    async with trionet.open_tcp_server(
        echo_lines, on_connect=on_connect, on_close=on_close
    ) as server:
        async with trionet.connect_tcp("127.0.0.1", server.port):
            pass
        await wait_until_closed(server, 1)
    assert events == [("connect", None), ("close", CloseReason.CLOSED_BY_PEER)]


async def test_options_are_validated() -> None:
    with pytest.raises(ValueError):
        trionet.ServerOptions(max_connections=0)
    with pytest.raises(ValueError):
        trionet.ServerOptions(idle_timeout=-1)
    with pytest.raises(TypeError):
        async with trionet.open_tcp_server(echo_lines, no_such_option=1):  # type: ignore[call-arg]
            pass


async def test_max_connections_with_a_listener_nobody_uses() -> None:
    """A slot is taken only for a client that waits: a second listen address
    that nobody connects to must not hold the only slot."""

    async def hello(conn: trionet.Connection) -> None:
        await conn.send_line(b"hello")

    with trio.fail_after(10):
        async with trionet.open_tcp_server(
            hello, host=["127.0.0.1", "127.0.0.2"], max_connections=1
        ) as server:
            for _ in range(3):
                async with trionet.connect_tcp("127.0.0.1", server.port) as conn:
                    assert await conn.receive_line() == b"hello"


async def test_a_refused_client_that_already_sent_data_gets_an_end_not_a_reset() -> (
    None
):
    refused = trio.Event()

    async def refuse(address: object) -> bool:
        await refused.wait()  # the client's bytes are in by now
        return False

    async def never(conn: trionet.Connection) -> None:
        raise AssertionError("a refused client's handler ran")

    with trio.fail_after(10):
        async with trionet.open_tcp_server(
            never, host="127.0.0.1", accept=refuse
        ) as server:
            async with trionet.connect_tcp("127.0.0.1", server.port) as conn:
                await conn.send_all(b"hello before the verdict\n" * 100)
                await trio.testing.wait_all_tasks_blocked()
                refused.set()
                # A FIN: a clean end of stream, not ConnectionClosed(ERROR)
                # from a reset.
                assert await conn.receive_some() == b""
    assert server.statistics().closed == {CloseReason.REJECTED: 1}
