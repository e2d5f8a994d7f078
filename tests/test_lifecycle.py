"""Lifecycle under faults: closes and shutdowns that always end within their
bounds, admission cleaned up, broadcasts that evict only real slow consumers,
queues bounded in bytes, errors classified as trio would, and the half-close
state model.

Time-bounded scenarios run under trio's autojump clock: a wait that would
hang for ever instead runs into ``trio.fail_after`` in virtual time, and the
durations asserted are virtual, so they do not depend on the machine's load.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing

import trionet
import trionet._server
import trionet.testing
from trionet import CloseReason, ConnectionClosed

from .conftest import kernel_only

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import ExceptionGroup

CHUNK = 64 * 1024

#: Every test here runs over the kernel and over a memory network.
pytestmark = pytest.mark.usefixtures("network")


async def noop(conn: trionet.Connection) -> None:
    """A handler that returns at once."""


async def tls_client_that_never_reads(
    port: int, client_context: ssl.SSLContext
) -> trio.SSLStream[trio.SocketStream]:
    """A TLS client that completes the handshake, then reads nothing (with a
    small receive buffer, so that the server's sends back up soon)."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    tls = trio.SSLStream(
        trio.SocketStream(sock), client_context, server_hostname="localhost"
    )
    await tls.do_handshake()
    return tls


@asynccontextmanager
async def serving(
    handler: Callable[[trionet.Connection], object], **options: object
) -> AsyncIterator[tuple[trionet.Server, trio.Event]]:
    """serve_tcp in a nursery of the test's; yields the server and an event
    set when serve_tcp has returned."""
    returned = trio.Event()

    async def run(task_status: trio.TaskStatus[trionet.Server]) -> None:
        try:
            await trionet.serve_tcp(
                handler,  # type: ignore[arg-type]
                0,
                host="127.0.0.1",
                task_status=task_status,
                **options,  # type: ignore[arg-type]
            )
        finally:
            returned.set()

    async with trio.open_nursery() as nursery:
        server: trionet.Server = await nursery.start(run)
        yield server, returned
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- 1. TLS close


@kernel_only
async def test_tls_shutdown_with_a_peer_that_never_reads_is_bounded(
    autojump_clock: trio.testing.MockClock,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    sent = trio.Event()

    async def flood(conn: trionet.Connection) -> None:
        for _ in range(128):
            await conn.send(b"x" * CHUNK)
        sent.set()
        await trio.sleep_forever()

    with trio.fail_after(60):
        async with serving(
            flood,
            ssl_context=server_context,
            flush_timeout=1,
            so_sndbuf=4096,
            send_queue_bytes=16 * 1024 * 1024,
        ) as (server, returned):
            tls = await tls_client_that_never_reads(server.port, client_context)
            await sent.wait()
            start = trio.current_time()
            await server.aclose(grace_period=0.5)
            took = trio.current_time() - start
            assert returned.is_set()
            await trio.aclose_forcefully(tls)
    assert 1.5 <= took <= 1.5 + 0.1
    assert server.statistics().closed == {CloseReason.SHUTDOWN: 1}
    assert server.statistics().open == 0


@kernel_only
async def test_tls_handler_that_returns_releases_its_slot_within_flush_timeout(
    autojump_clock: trio.testing.MockClock,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    returned_at: list[float] = []
    handler_returned = trio.Event()
    slot_released = trio.Event()

    async def flood_and_return(conn: trionet.Connection) -> None:
        if returned_at:
            await conn.send(b"second client served\n")
            return
        for _ in range(128):
            await conn.send(b"x" * CHUNK)
        returned_at.append(trio.current_time())
        handler_returned.set()

    def on_close(conn: trionet.Connection) -> None:
        # on_close runs once the connection's slot has been let go.
        slot_released.set()

    with trio.fail_after(60):
        async with serving(
            flood_and_return,
            ssl_context=server_context,
            flush_timeout=1,
            so_sndbuf=4096,
            send_queue_bytes=16 * 1024 * 1024,
            max_connections=1,
            on_close=on_close,
        ) as (server, _):
            stuck = await tls_client_that_never_reads(server.port, client_context)
            await handler_returned.wait()
            # The connection flushes: its slot is still held, and counted.
            assert server.statistics().open == 1
            await slot_released.wait()
            released = trio.current_time() - returned_at[0]
            assert released <= 1.0 + 0.05
            assert server.statistics().open == 0
            assert server.statistics().closed == {CloseReason.TIMEOUT: 1}
            # The slot is free: another client is served.
            async with await trionet.connect_tcp(
                "127.0.0.1",
                server.port,
                ssl_context=client_context,
                server_hostname="localhost",
                framing=trionet.Lines(),
            ) as second:
                assert await second.receive() == b"second client served"
            await trio.aclose_forcefully(stuck)


# -------------------------------------------------- 2. aclose is a request


async def test_aclose_from_a_handler_makes_serve_tcp_return() -> None:
    async def handler(conn: trionet.Connection) -> None:
        async for line in conn:
            if line == b"shutdown":
                await server.aclose(grace_period=1)

    with trio.fail_after(10):
        async with serving(handler, framing=trionet.Lines()) as (server, returned):
            async with trionet.connect_tcp(
                "127.0.0.1", server.port, framing=trionet.Lines()
            ) as conn:
                await conn.send("shutdown")
                await returned.wait()
                assert await conn.receive_some() == b""
    assert server.statistics().closed == {CloseReason.SHUTDOWN: 1}


async def test_aclose_cut_short_still_completes_the_shutdown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cancelled = trio.Event()
    running = trio.Event()

    async def stubborn(conn: trionet.Connection) -> None:
        running.set()
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    with trio.fail_after(60):
        async with serving(stubborn, grace_period=5) as (server, returned):
            client = await trionet.connect_tcp("127.0.0.1", server.port)
            await running.wait()
            with trio.move_on_after(0.1):
                await server.aclose()
            assert not returned.is_set()  # only the wait was abandoned
            await returned.wait()
            assert cancelled.is_set()
            await client.aclose()
    assert server.statistics().closed == {CloseReason.SHUTDOWN: 1}


async def test_a_second_aclose_with_a_shorter_grace_period_shortens_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    running = trio.Event()

    async def stubborn(conn: trionet.Connection) -> None:
        running.set()
        await trio.sleep_forever()

    with trio.fail_after(60):
        async with serving(stubborn) as (server, returned):
            client = await trionet.connect_tcp("127.0.0.1", server.port)
            await running.wait()
            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(server.aclose, grace_period=30))
                await trio.sleep(1)
                await server.aclose(grace_period=1)
            assert trio.current_time() - start == pytest.approx(2, abs=0.05)
            assert returned.is_set()
            await client.aclose()


async def test_grace_period_must_not_be_negative() -> None:
    async with trionet.open_tcp_server(noop) as server:
        with pytest.raises(ValueError, match="grace_period"):
            await server.aclose(grace_period=-1)


# --------------------------------------------------------- 3. admission


async def test_shutdown_closes_clients_still_in_the_accept_filter() -> None:
    in_filter = trio.Event()

    async def slow_filter(address: object) -> bool:
        in_filter.set()
        await trio.sleep_forever()
        raise AssertionError("not reached")

    with trio.fail_after(10):
        async with serving(noop, accept=slow_filter) as (
            server,
            returned,
        ):
            client = await trionet.connect_tcp("127.0.0.1", server.port)
            await in_filter.wait()
            stats = server.statistics()
            assert (stats.open, stats.admitting, stats.accepted) == (1, 1, 0)
            await server.aclose()
            assert returned.is_set()
            # The server closed the socket at once (no ResourceWarning later).
            assert await client.receive_some() == b""
            await client.aclose()
    assert server.statistics().closed == {CloseReason.SHUTDOWN: 1}
    assert server.statistics().open == 0


@kernel_only
async def test_silent_tls_handshakers_hold_slots_and_show_in_the_stats(
    server_context: ssl.SSLContext,
) -> None:
    with trio.fail_after(10):
        async with serving(noop, ssl_context=server_context, max_connections=5) as (
            server,
            _,
        ):
            silent = []
            for _ in range(5):
                silent.append(await trio.open_tcp_stream("127.0.0.1", server.port))
            while server.statistics().admitting < 5:
                await trio.testing.wait_all_tasks_blocked()
            stats = server.statistics()
            assert (stats.open, stats.admitting, stats.accepted) == (5, 5, 0)
            await server.aclose()
            for stream in silent:
                # Closed by the server at once, not left to the garbage collector.
                assert await stream.receive_some() == b""
                await stream.aclose()
    assert server.statistics().closed == {CloseReason.SHUTDOWN: 5}


@kernel_only
async def test_cancelling_serve_tcp_closes_sockets_in_the_handshake(
    server_context: ssl.SSLContext,
) -> None:
    with trio.fail_after(10):
        async with serving(noop, ssl_context=server_context) as (
            server,
            returned,
        ):
            silent = await trio.open_tcp_stream("127.0.0.1", server.port)
            while server.statistics().admitting < 1:
                await trio.testing.wait_all_tasks_blocked()
        # Leaving ``serving`` cancelled serve_tcp from outside.
        assert returned.is_set()
        assert await silent.receive_some() == b""
        await silent.aclose()
    assert server.statistics().open == 0


# --------------------------------------------- 4. any stream really closes


class RecordingStream(trio.abc.HalfCloseableStream):
    """A wrapper with no synchronous close: only its aclose releases it."""

    def __init__(self, stream: trio.abc.HalfCloseableStream) -> None:
        self.transport_stream = stream
        self.aclosed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.transport_stream.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.transport_stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        self.aclosed = True
        await self.transport_stream.aclose()


async def test_a_protocol_error_over_a_user_stream_closes_that_stream() -> None:
    left, right = trio.testing.memory_stream_pair()
    wrapped = RecordingStream(right)
    conn = trionet.Connection(wrapped, framing=trionet.Lines(max_length=4))
    await left.send_all(b"far too long\n")
    with pytest.raises(trionet.LineTooLong):
        await conn.receive()
    assert conn.close_reason is CloseReason.PROTOCOL_ERROR
    await conn.aclose()
    assert wrapped.aclosed
    await left.aclose()


async def test_protocol_error_with_a_stalled_queued_send_ends() -> None:
    def stall_sends(stream: trio.abc.Stream) -> trio.abc.Stream:
        return trionet.testing.StallAfter(stream, None, stall_sends_after=0)

    with trio.fail_after(10):
        async with trionet.testing.connection_pair(
            trionet.Lines(max_length=4), queued=True, wrap=stall_sends
        ) as (client, server):
            await server.send_all(b"stuck in the writer")
            await client.send_all(b"far too long\n")
            with pytest.raises(trionet.LineTooLong):
                await server.receive()
    assert server.close_reason is CloseReason.PROTOCOL_ERROR


# ----------------------------------------------------------- 5. send_eof


@kernel_only
@pytest.mark.parametrize("idle_timeout", [2.0, None])
async def test_send_eof_to_a_peer_that_never_reads_is_bounded(
    autojump_clock: trio.testing.MockClock, idle_timeout: float | None
) -> None:
    outcome: list[BaseException] = []
    done = trio.Event()

    async def flood_then_eof(conn: trionet.Connection) -> None:
        for _ in range(64):
            await conn.send(b"x" * CHUNK)
        start = trio.current_time()
        try:
            await conn.send_eof()
        except ConnectionClosed as exc:
            outcome.append(exc)
        outcome.append(trio.current_time() - start)  # type: ignore[arg-type]
        done.set()

    with trio.fail_after(60):
        async with serving(
            flood_then_eof,
            idle_timeout=idle_timeout,
            flush_timeout=3,
            so_sndbuf=4096,
            send_queue_bytes=4 * 1024 * 1024,
        ) as (server, _):
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await sock.connect(("127.0.0.1", server.port))
            await done.wait()
            sock.close()
    error, took = outcome
    assert isinstance(error, ConnectionClosed)
    assert error.reason is CloseReason.TIMEOUT
    assert took <= (idle_timeout or 3) + 0.05  # type: ignore[operator]


async def test_sending_after_send_eof_raises_and_receiving_still_works() -> None:
    async with trionet.testing.connection_pair(trionet.Lines()) as (a, b):
        await a.send_eof()
        assert a.eof_sent
        with pytest.raises(ConnectionClosed, match="send_eof"):
            await a.send("too late")
        assert a.close_reason is None  # still open: only sending finished
        await a.send_eof()  # a second call does nothing
        await b.send("still arrives")
        assert await a.receive() == b"still arrives"
        with pytest.raises(ConnectionClosed):
            await b.receive()
        assert b.eof_received


async def test_send_eof_over_tls_is_refused_clearly(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    async with trionet.open_tcp_server(noop, ssl_context=server_context) as server:
        async with trionet.connect_tcp(
            "127.0.0.1",
            server.port,
            ssl_context=client_context,
            server_hostname="localhost",
        ) as conn:
            with pytest.raises(TypeError, match="cannot half-close"):
                await conn.send_eof()
            assert not conn.eof_sent


# ------------------------------------------------------------ 6. on_close


async def test_a_slow_on_close_hook_cannot_hold_aclose(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hook_cancelled = trio.Event()

    async def slow_hook(conn: trionet.Connection) -> None:
        try:
            await trio.sleep_forever()
        finally:
            hook_cancelled.set()

    with trio.fail_after(60):
        async with serving(noop, on_close=slow_hook, flush_timeout=2) as (
            server,
            returned,
        ):
            async with trionet.connect_tcp("127.0.0.1", server.port) as client:
                assert await client.receive_some() == b""
            start = trio.current_time()
            await server.aclose(grace_period=1)
            assert trio.current_time() - start == pytest.approx(3, abs=0.05)
            assert hook_cancelled.is_set()
            assert returned.is_set()


# ------------------------------------------------------- 7, 8. broadcasts


async def test_broadcast_never_evicts_a_client_that_drains_its_queue(
    autojump_clock: trio.testing.MockClock,
) -> None:
    streaming = trio.Event()

    async def stream_chunks(conn: trionet.Connection) -> None:
        while True:
            await conn.send(b"c" * CHUNK)
            streaming.set()

    with trio.fail_after(60):
        async with serving(
            stream_chunks, send_queue_size=8, so_sndbuf=CHUNK, grace_period=0
        ) as (server, _):
            async with await trionet.connect_tcp("127.0.0.1", server.port) as client:
                got = 0

                async def read_slowly() -> None:
                    nonlocal got
                    while True:
                        got += len(await client.receive_exactly(CHUNK))
                        await trio.sleep(0.005)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read_slowly)
                    await streaming.wait()
                    await trio.sleep(0.2)
                    conn = server.connections[0]
                    # The handler is held back: its queue is at the bound.
                    assert conn.statistics().queued_messages == 8
                    await server.broadcast(b"notice")
                    await trio.sleep(0.2)
                    assert conn.close_reason is None
                    assert server.statistics().closed == {}
                    nursery.cancel_scope.cancel()
                assert got > 0


@kernel_only
async def test_broadcast_still_evicts_a_client_that_never_reads() -> None:
    async def idle(conn: trionet.Connection) -> None:
        await trio.sleep_forever()

    with trio.fail_after(20):
        async with serving(
            idle, send_queue_bytes=CHUNK, broadcast_headroom=CHUNK, so_sndbuf=4096
        ) as (server, _):
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await sock.connect(("127.0.0.1", server.port))
            while not server.connections:
                await trio.testing.wait_all_tasks_blocked()
            conn = server.connections[0]
            for _ in range(10_000):
                await server.broadcast(b"b" * 1024)
                queued = conn.statistics().queued_bytes
                # Never over the bound: send_queue_bytes + headroom.
                assert queued <= 2 * CHUNK
                if conn.close_reason is not None:
                    break
            assert conn.close_reason is CloseReason.SLOW_CONSUMER
            sock.close()


@kernel_only
async def test_a_stalled_queue_is_evicted_by_the_next_broadcast(
    autojump_clock: trio.testing.MockClock,
) -> None:
    running = trio.Event()

    async def idle(conn: trionet.Connection) -> None:
        running.set()
        await trio.sleep_forever()

    with trio.fail_after(60):
        async with serving(idle, stall_timeout=10, so_sndbuf=4096) as (server, _):
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await sock.connect(("127.0.0.1", server.port))
            await running.wait()
            conn = server.connections[0]
            while not conn.statistics().queued_bytes:
                await server.broadcast(b"b" * 1024)
            await trio.sleep(5)
            await server.broadcast(b"still within the headroom")
            assert conn.close_reason is None
            await trio.sleep(6)  # no byte written for more than stall_timeout
            await server.broadcast(b"evicts")
            assert conn.close_reason is CloseReason.SLOW_CONSUMER
            sock.close()


@kernel_only
async def test_send_waits_on_the_byte_bound(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sent = 0

    async def big_sends(conn: trionet.Connection) -> None:
        nonlocal sent
        for _ in range(100):
            await conn.send(b"m" * (1024 * 1024))
            sent += 1

    with trio.fail_after(60):
        async with serving(big_sends, so_sndbuf=4096, grace_period=0) as (server, _):
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await sock.connect(("127.0.0.1", server.port))
            await trio.sleep(1)
            conn = server.connections[0]
            stats = conn.statistics()
            # 256 messages would fit the count bound; the byte bound holds
            # the handler at send_queue_bytes (1 MiB) plus one message.
            assert sent <= 2
            assert stats.queued_bytes <= 2 * 1024 * 1024
            sock.close()


# ------------------------------------------------------ 10. accept errors


@pytest.mark.parametrize(
    "name",
    ["EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "EHOSTUNREACH", "ETIMEDOUT"],
)
async def test_accept_errors_about_one_client_are_skipped(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    failures = [OSError(getattr(errno, name), name)]
    real = trionet._server._accept_nowait

    def flaky(listener: socket.socket) -> tuple[socket.socket, object]:
        if failures:
            raise failures.pop()
        return real(listener)

    monkeypatch.setattr(trionet._server, "_accept_nowait", flaky)

    async def hello(conn: trionet.Connection) -> None:
        await conn.send(b"hello\n")

    with trio.fail_after(10):
        async with trionet.open_tcp_server(hello) as server:
            async with trionet.connect_tcp(
                "127.0.0.1", server.port, framing=trionet.Lines()
            ) as conn:
                assert await conn.receive() == b"hello"
    assert not failures


async def test_an_unexpected_accept_error_still_escapes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(listener: socket.socket) -> tuple[socket.socket, object]:
        raise OSError(errno.EINVAL, "listener broken")

    monkeypatch.setattr(trionet._server, "_accept_nowait", broken)
    with trio.fail_after(10), pytest.RaisesGroup(OSError, flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(trionet.serve_tcp, noop, 0, host="127.0.0.1"))


# -------------------------------------- 11. own nursery ending is no failure


async def test_a_disconnect_inside_a_handlers_own_nursery_is_no_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ended = trio.Event()

    async def reader_and_writer(conn: trionet.Connection) -> None:
        async def read() -> None:
            while True:
                await conn.receive_exactly(1)

        async def write() -> None:
            while True:
                await conn.send(b"tick\n")
                await trio.sleep(0.001)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                nursery.start_soon(write)
        finally:
            ended.set()

    with trio.fail_after(10), caplog.at_level(logging.ERROR, "trionet"):
        async with trionet.open_tcp_server(reader_and_writer) as server:
            async with trionet.connect_tcp("127.0.0.1", server.port) as conn:
                await conn.receive_some()
            await ended.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert server.handler_exceptions == []
            assert server.statistics().closed.keys() <= {
                CloseReason.CLOSED_BY_PEER,
                CloseReason.ERROR,
            }
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_group_with_another_error_is_still_a_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def handler(conn: trionet.Connection) -> None:
        raise ExceptionGroup(
            "mixed", [ConnectionClosed(CloseReason.CLOSED_BY_PEER), KeyError("bug")]
        )

    with caplog.at_level(logging.ERROR, "trionet"):
        async with trionet.open_tcp_server(handler) as server:
            async with trionet.connect_tcp("127.0.0.1", server.port) as conn:
                assert await conn.receive_some() == b""
            while not server.handler_exceptions:
                await trio.testing.wait_all_tasks_blocked()
    assert len(server.handler_exceptions) == 1
    assert "raised" in caplog.text


# ------------------------------------------------------ 12. TLS without close_notify


async def _tls_client_cut(
    port: int, client_context: ssl.SSLContext, data: bytes
) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(stream, client_context, server_hostname="localhost")
    await tls.send_all(data)
    # Close the socket under TLS without close_notify, as a plain ``ssl``
    # socket closed without unwrap() does.
    await tls.transport_stream.aclose()


@kernel_only
@pytest.mark.parametrize(
    ("data", "strict", "expected", "incomplete"),
    [
        (b"whole line\n", False, CloseReason.CLOSED_BY_PEER, False),
        (b"whole line\ncut li", False, CloseReason.ERROR, True),
        (b"whole line\n", True, CloseReason.ERROR, False),
    ],
    ids=["boundary", "inside-a-message", "strict"],
)
async def test_tls_peer_closing_without_close_notify(
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    data: bytes,
    strict: bool,
    expected: CloseReason,
    incomplete: bool,
) -> None:
    seen: list[object] = []
    done = trio.Event()

    async def handler(conn: trionet.Connection) -> None:
        try:
            async for line in conn:
                seen.append(line)
        except ConnectionClosed as exc:
            seen.append(type(exc).__name__)
        finally:
            done.set()

    with trio.fail_after(10):
        async with trionet.open_tcp_server(
            handler,
            framing=trionet.Lines(),
            ssl_context=server_context,
            require_close_notify=strict,
        ) as server:
            await _tls_client_cut(server.port, client_context, data)
            await done.wait()
            while not server.statistics().closed:
                await trio.testing.wait_all_tasks_blocked()
    if strict:
        assert seen[-1] == "ConnectionClosed"
    else:
        assert seen[0] == b"whole line"
        assert seen[1:] == (["IncompleteMessage"] if incomplete else [])
    assert server.statistics().closed == {expected: 1}
    assert server.handler_exceptions == []


# --------------------------------------------------------- 13. half-close


async def test_peer_eof_then_normal_close_is_closed_by_peer() -> None:
    async with trionet.testing.connection_pair(trionet.Lines(), queued=True) as (
        client,
        server,
    ):
        await client.send("request")
        await client.send_eof()
        assert await server.receive() == b"request"
        with pytest.raises(ConnectionClosed) as info:
            await server.receive()
        assert info.value.reason is CloseReason.CLOSED_BY_PEER
        assert (server.eof_received, server.close_reason) == (True, None)
        await server.send("reply")
        await server.aclose()
        assert server.close_reason is CloseReason.CLOSED_BY_PEER
        assert await client.receive() == b"reply"


async def test_our_eof_first_then_close_is_closed_by_host() -> None:
    async with trionet.testing.connection_pair(trionet.Lines()) as (a, b):
        await a.send_eof()
        await b.aclose()
        with pytest.raises(ConnectionClosed):
            await a.receive()
        await a.aclose()
        assert a.close_reason is CloseReason.CLOSED_BY_HOST


async def test_a_reply_cut_short_by_shutdown_after_the_peer_eof_is_shutdown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    got_eof = trio.Event()

    async def slow_reply(conn: trionet.Connection) -> None:
        async for _ in conn:
            pass
        got_eof.set()
        await trio.sleep(100)  # still working on the reply
        await conn.send("reply")

    with trio.fail_after(60):
        async with serving(slow_reply, framing=trionet.Lines()) as (server, _):
            async with trionet.connect_tcp(
                "127.0.0.1", server.port, framing=trionet.Lines()
            ) as client:
                await client.send("request")
                await client.send_eof()
                await got_eof.wait()
                await server.aclose(grace_period=1)
    assert server.statistics().closed == {CloseReason.SHUTDOWN: 1}


@kernel_only
async def test_flush_timeout_after_the_peer_eof_is_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    closed = trio.Event()

    async def flood_after_eof(conn: trionet.Connection) -> None:
        async for _ in conn:
            pass
        for _ in range(64):
            await conn.send(b"x" * CHUNK)

    with trio.fail_after(60):
        async with serving(
            flood_after_eof,
            framing=trionet.Lines(),
            so_sndbuf=4096,
            flush_timeout=1,
            send_queue_bytes=8 * 1024 * 1024,
            on_close=lambda conn: closed.set(),
        ) as (server, _):
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await sock.connect(("127.0.0.1", server.port))
            sock.shutdown(socket.SHUT_WR)
            await closed.wait()
            sock.close()
    # The peer finished first, but our side was cut short: not CLOSED_BY_PEER.
    assert server.statistics().closed == {CloseReason.TIMEOUT: 1}


def test_connection_docstring_has_the_state_table() -> None:
    doc = trionet.Connection.__doc__ or ""
    for state in ("open", "peer finished", "we finished", "flushing", "closed"):
        assert state in doc
