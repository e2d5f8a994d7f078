"""Connection.start_tls: upgrading an open connection to TLS in place."""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from types import ModuleType

import pytest
import trio
import trio.testing

import trionet
from trionet import CloseReason, ConnectError, ConnectionClosed, StartTLSRefused

LINES = trionet.Lines()
Handler = Callable[[trionet.Connection], Awaitable[object]]


@asynccontextmanager
async def server_with(
    handler: Handler, **options: object
) -> AsyncIterator[tuple[trionet.Server, list[trionet.Connection]]]:
    """A loopback server running ``handler``; also yields every connection
    it closed (in the order they closed)."""
    closed: list[trionet.Connection] = []
    async with trionet.open_tcp_server(
        handler,
        host="127.0.0.1",
        framing=LINES,
        on_close=closed.append,
        grace_period=0,
        **options,  # type: ignore[arg-type]
    ) as server:
        yield server, closed


def starttls_handler(
    server_context: ssl.SSLContext, after: Handler | None = None
) -> Handler:
    """A server handler: wait for STARTTLS, answer "220 go", upgrade, then
    run ``after`` (default: echo every line with "tls: " in front)."""

    async def handle(conn: trionet.Connection) -> None:
        assert await conn.receive() == b"STARTTLS"
        await conn.send("220 go")
        await conn.start_tls(server_context)
        if after is not None:
            await after(conn)
            return
        async for line in conn:
            await conn.send(b"tls: " + line)

    return handle


@asynccontextmanager
async def asked_for_tls(server: trionet.Server) -> AsyncIterator[trionet.Connection]:
    """A client of ``server`` that has asked for TLS and read "220 go"."""
    async with trionet.connect_tcp(
        "127.0.0.1", server.port, framing=LINES, server_hostname="localhost"
    ) as conn:
        await conn.send("STARTTLS")
        assert await conn.receive() == b"220 go"
        yield conn


# ---------------------------------------------------------------- upgrading


async def test_both_sides_upgrade_and_the_connection_goes_on(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    handle = starttls_handler(server_context)
    async with server_with(handle) as (server, closed):
        async with asked_for_tls(server) as conn:
            await conn.start_tls(client_context)
            # The same object, its framing and receive modes, now over TLS.
            await conn.send("one")
            await conn.send_all(b"two\nthree\n")
            assert await conn.receive() == b"tls: one"
            assert await conn.receive_exactly(9) == b"tls: two\n"
            assert await conn.receive_line() == b"tls: three"
            with pytest.raises(TypeError, match="cannot half-close"):
                await conn.send_eof()  # TLS cannot; plain TCP could
            stats = conn.statistics()
        assert conn.close_reason is CloseReason.CLOSED_BY_HOST
    assert stats.bytes_sent == len(b"STARTTLS\none\ntwo\nthree\n")
    assert stats.bytes_received == len(b"220 go\ntls: one\ntls: two\ntls: three\n")
    [server_side] = closed
    assert server_side.close_reason is CloseReason.CLOSED_BY_PEER
    assert server.statistics().handler_errors == 0


async def test_nothing_after_the_upgrade_crosses_the_wire_in_plaintext(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    # Two connections made by hand over in-memory streams; every byte that
    # travels from the client to the server is recorded.
    left, right = trio.testing.memory_stream_pair()
    wire = bytearray()
    put_data = right.receive_stream.put_data

    def record(data: bytes) -> None:
        wire.extend(data)
        put_data(data)

    right.receive_stream.put_data = record  # type: ignore[method-assign]
    client = trionet.Connection(left, framing=LINES)
    server = trionet.Connection(right, framing=LINES)
    async with client, server:
        await client.send("STARTTLS")
        assert await server.receive() == b"STARTTLS"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial_start_tls(client, client_context, False, "localhost")
            )
            nursery.start_soon(partial_start_tls(server, server_context, True, None))
        await client.send("attack at dawn")
        assert await server.receive() == b"attack at dawn"
        # Hand-made connections have no peer credentials or socket addresses.
        assert server.peer_credentials is None
    assert b"STARTTLS" in wire
    assert b"attack at dawn" not in wire
    assert len(wire) > 200  # (the handshake and the encrypted record went through)


def partial_start_tls(
    conn: trionet.Connection,
    context: ssl.SSLContext,
    server_side: bool,
    server_hostname: str | None,
) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        await conn.start_tls(
            context, server_side=server_side, server_hostname=server_hostname
        )

    return run


async def test_a_connection_made_by_hand_must_say_its_side(
    server_context: ssl.SSLContext,
) -> None:
    left, right = trio.testing.memory_stream_pair()
    async with trionet.Connection(left) as a, trionet.Connection(right) as b:
        with pytest.raises(ValueError, match="server_side"):
            await a.start_tls(server_context)
        # Nothing changed: the connection still works in plaintext.
        await a.send_all(b"still plain")
        assert await b.receive_some() == b"still plain"
        assert a.close_reason is None


async def test_starttls_over_a_unix_socket(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext, unix_path: str
) -> None:
    handle = starttls_handler(server_context)
    async with trionet.open_unix_server(handle, unix_path, framing=LINES):
        async with trionet.connect_unix(unix_path, framing=LINES) as conn:
            await conn.send("STARTTLS")
            assert await conn.receive() == b"220 go"
            # A socket file has no host name: the client must name one.
            with pytest.raises(ValueError, match="server_hostname"):
                await conn.start_tls(client_context)
            assert conn.close_reason is None
            await conn.start_tls(client_context, server_hostname="localhost")
            await conn.send("over unix")
            assert await conn.receive() == b"tls: over unix"
            credentials = conn.peer_credentials
            assert credentials is not None  # (the socket underneath)


# ---------------------------------------------------------- the injection hole


@pytest.mark.parametrize("server_reads", ["receive", "receive_line"])
async def test_bytes_pipelined_behind_starttls_are_refused(
    server_context: ssl.SSLContext, server_reads: str
) -> None:
    outcome: dict[str, object] = {}

    async def handle(conn: trionet.Connection) -> None:
        # receive() cuts every whole line of the chunk at once (the rest
        # waits, already cut); receive_line() leaves it in the buffer.
        read = conn.receive if server_reads == "receive" else conn.receive_line
        assert await read() == b"STARTTLS"
        try:
            await conn.start_tls(server_context)
        except StartTLSRefused as exc:
            outcome["error"] = exc
            outcome["reason"] = conn.close_reason
            # The injected bytes are never handed over.
            with pytest.raises(ConnectionClosed):
                await conn.receive_some()
            raise  # (the connection's own end: not a handler error)

    async with server_with(handle) as (server, closed):
        async with trionet.connect_tcp("127.0.0.1", server.port) as conn:
            await conn.send_all(b"STARTTLS\nMAIL FROM:<mallory>\n")
            try:
                rest = await conn.receive_some()
            except ConnectionClosed:  # (a reset is as good as an end here)
                rest = b""
            assert rest == b""
    error = outcome["error"]
    assert isinstance(error, StartTLSRefused)
    assert isinstance(error, trionet.ProtocolError)  # the peer's fault
    assert error.buffered == len(b"MAIL FROM:<mallory>\n")
    assert outcome["reason"] is CloseReason.PROTOCOL_ERROR
    stats = server.statistics()
    assert stats.closed == {CloseReason.PROTOCOL_ERROR: 1}
    assert stats.handler_errors == 0
    assert closed[0].close_reason is CloseReason.PROTOCOL_ERROR


async def test_a_client_refuses_bytes_injected_after_the_servers_answer(
    client_context: ssl.SSLContext,
) -> None:
    async def handle(conn: trionet.Connection) -> None:
        assert await conn.receive() == b"STARTTLS"
        await conn.send_all(b"220 go\n250 forged reply\n")
        with contextlib.suppress(ConnectionClosed):  # (an end, or a reset)
            assert await conn.receive_some() == b""

    async with server_with(handle) as (server, _):
        async with asked_for_tls(server) as conn:
            with pytest.raises(StartTLSRefused) as info:
                await conn.start_tls(client_context)
            assert info.value.buffered == len(b"250 forged reply\n")
            assert conn.close_reason is CloseReason.PROTOCOL_ERROR
            with pytest.raises(ConnectionClosed):
                await conn.receive()


# ------------------------------------------------------------------- sending


async def test_what_was_sent_before_goes_out_in_plaintext_first(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    banner = b"B" * (4 * 1024 * 1024)
    queued: list[int] = []

    async def handle(conn: trionet.Connection) -> None:
        assert await conn.receive() == b"STARTTLS"
        await conn.send_all(banner)  # more than the kernel takes at once
        await conn.send("220 go")
        queued.append(conn.statistics().queued_bytes)
        await conn.start_tls(server_context)
        async for line in conn:
            await conn.send(b"tls: " + line)

    async with server_with(handle, so_sndbuf=65536) as (server, _):
        async with trionet.connect_tcp(
            "127.0.0.1", server.port, framing=LINES, server_hostname="localhost"
        ) as conn:
            await conn.send("STARTTLS")
            assert await conn.receive_exactly(len(banner)) == banner
            assert await conn.receive() == b"220 go"
            await conn.start_tls(client_context)
            await conn.send("after")
            assert await conn.receive() == b"tls: after"
    # The upgrade really had a queue to flush first.
    assert queued[0] > 0


async def test_a_flush_that_does_not_finish_closes_with_timeout(
    server_context: ssl.SSLContext, autojump_clock: trio.testing.MockClock
) -> None:
    outcome: list[object] = []
    done = trio.Event()

    async def handle(conn: trionet.Connection) -> None:
        assert await conn.receive() == b"STARTTLS"
        await conn.send_all(b"B" * (8 * 1024 * 1024))  # the client never reads
        try:
            await conn.start_tls(server_context)
        except ConnectionClosed as exc:
            outcome.append(exc.reason)
            outcome.append(conn.close_reason)
            outcome.append(trio.current_time() - started)
        finally:
            done.set()

    async with server_with(handle, so_sndbuf=65536, flush_timeout=1) as (server, _):
        async with trionet.connect_tcp("127.0.0.1", server.port) as conn:
            started = trio.current_time()
            await conn.send_all(b"STARTTLS\n")
            await done.wait()
    assert outcome[:2] == [CloseReason.TIMEOUT, CloseReason.TIMEOUT]
    elapsed = outcome[2]
    assert isinstance(elapsed, float)
    assert 1 <= elapsed < 2  # bounded by flush_timeout (virtual seconds)


async def test_a_broadcast_during_the_handshake_goes_out_over_tls(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    handle = starttls_handler(server_context)
    async with server_with(handle) as (server, _):
        async with asked_for_tls(server) as conn:
            # The server's side now waits in its handshake for our hello.
            await trio.testing.wait_all_tasks_blocked()
            await server.broadcast("news")  # held, not written in plaintext
            await conn.start_tls(client_context)
            assert await conn.receive() == b"news"
            await conn.send("and then")
            assert await conn.receive() == b"tls: and then"


async def test_a_send_from_another_task_waits_for_the_handshake(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    release = trio.Event()

    async def handle(conn: trionet.Connection) -> None:
        assert await conn.receive() == b"STARTTLS"
        await conn.send("220 go")
        await release.wait()
        await conn.start_tls(server_context)
        async for line in conn:
            await conn.send(b"tls: " + line)

    sent: list[bool] = []

    async def send_meanwhile(conn: trionet.Connection) -> None:
        await conn.send("sent meanwhile")
        sent.append(True)

    async with server_with(handle) as (server, _):
        async with asked_for_tls(server) as conn:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn.start_tls, client_context)
                # Our hello is out; the server has not answered yet.
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(send_meanwhile, conn)
                await trio.testing.wait_all_tasks_blocked()
                assert sent == []  # it waits for the upgrade
                release.set()
            assert sent == [True]
            assert await conn.receive() == b"tls: sent meanwhile"


async def test_a_send_under_way_finishes_in_plaintext_before_the_handshake(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    data = b"D" * (16 * 1024 * 1024)
    release = trio.Event()
    sent: list[bool] = []

    async def send_data(conn: trionet.Connection) -> None:
        await conn.send_all(data)
        sent.append(True)

    async def after(conn: trionet.Connection) -> None:
        async for line in conn:
            await conn.send(b"tls: " + line)

    async def handle(conn: trionet.Connection) -> None:
        assert await conn.receive() == b"STARTTLS"
        await conn.send("220 go")
        await release.wait()  # (so that the client's send stays under way)
        assert await conn.receive_exactly(len(data)) == data
        await conn.start_tls(server_context)
        await after(conn)

    async with server_with(handle) as (server, _):
        async with asked_for_tls(server) as conn:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_data, conn)
                await trio.testing.wait_all_tasks_blocked()
                assert sent == []  # (the kernel is full: the send is under way)
                nursery.start_soon(conn.start_tls, client_context)
                await trio.testing.wait_all_tasks_blocked()
                release.set()
            await conn.send("after")
            assert await conn.receive() == b"tls: after"


# ------------------------------------------------------------------ failures


async def test_a_handshake_that_never_comes_times_out_on_the_server(
    server_context: ssl.SSLContext, autojump_clock: trio.testing.MockClock
) -> None:
    outcome: list[BaseException] = []
    done = trio.Event()

    async def handle(conn: trionet.Connection) -> None:
        try:
            await starttls_handler(server_context)(conn)
        except ConnectError as exc:
            outcome.append(exc)
            done.set()
            raise

    async with server_with(handle, handshake_timeout=2) as (server, closed):
        async with trionet.connect_tcp("127.0.0.1", server.port, framing=LINES) as conn:
            await conn.send("STARTTLS")
            assert await conn.receive() == b"220 go"
            start = trio.current_time()
            await done.wait()  # the client never starts its handshake
            assert trio.current_time() - start == pytest.approx(2, abs=0.01)
    [error] = outcome
    assert isinstance(error, ConnectError)
    assert error.reason is CloseReason.TIMEOUT
    assert "timed out" in str(error)
    assert closed[0].close_reason is CloseReason.TIMEOUT
    # The connection's own end, with its reason: not a handler failure.
    assert server.statistics().handler_errors == 0


async def test_a_client_handshake_timeout_closes_the_connection(
    client_context: ssl.SSLContext, autojump_clock: trio.testing.MockClock
) -> None:
    async def handle(conn: trionet.Connection) -> None:
        assert await conn.receive() == b"STARTTLS"
        await conn.send("220 go")
        await trio.sleep_forever()  # and never upgrade

    async with server_with(handle) as (server, _):
        async with asked_for_tls(server) as conn:
            with pytest.raises(ConnectError) as info:
                await conn.start_tls(client_context, handshake_timeout=3)
            assert info.value.reason is CloseReason.TIMEOUT
            assert conn.close_reason is CloseReason.TIMEOUT
            with pytest.raises(ConnectionClosed):
                await conn.send("too late")


async def test_a_failed_handshake_closes_both_sides_with_error(
    server_context: ssl.SSLContext,
) -> None:
    outcome: list[BaseException] = []

    async def handle(conn: trionet.Connection) -> None:
        try:
            await starttls_handler(server_context)(conn)
        except ConnectError as exc:
            outcome.append(exc)

    untrusting = ssl.create_default_context()  # does not know the test CA
    async with server_with(handle) as (server, closed):
        async with asked_for_tls(server) as conn:
            with pytest.raises(ConnectError) as info:
                await conn.start_tls(untrusting)
    assert info.value.reason is CloseReason.ERROR
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
    assert "TLS handshake with 127.0.0.1:" in str(info.value)
    assert conn.close_reason is CloseReason.ERROR
    [server_error] = outcome
    assert isinstance(server_error, ConnectError)
    assert server_error.reason is CloseReason.ERROR
    assert closed[0].close_reason is CloseReason.ERROR


async def test_a_cancelled_handshake_leaves_no_half_tls_connection(
    client_context: ssl.SSLContext, autojump_clock: trio.testing.MockClock
) -> None:
    async def handle(conn: trionet.Connection) -> None:
        assert await conn.receive() == b"STARTTLS"
        await conn.send("220 go")
        await trio.sleep_forever()

    async with server_with(handle) as (server, _):
        conn = await trionet.connect_tcp(
            "127.0.0.1", server.port, framing=LINES, server_hostname="localhost"
        )
        await conn.send("STARTTLS")
        assert await conn.receive() == b"220 go"
        with trio.move_on_after(1) as scope:
            await conn.start_tls(client_context)
        assert scope.cancelled_caught
        # Closed at once (its socket too: the fixture checks for leaks).
        assert conn.close_reason is CloseReason.ERROR
        with pytest.raises(ConnectionClosed):
            await conn.send("half")
        await conn.aclose()


@pytest.mark.parametrize("require_close_notify", [False, True])
async def test_require_close_notify_applies_after_the_upgrade(
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    require_close_notify: bool,
) -> None:
    handle = starttls_handler(server_context)
    async with server_with(handle, require_close_notify=require_close_notify) as (
        server,
        closed,
    ):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        conn = trionet.Connection(stream, framing=LINES)
        await conn.send("STARTTLS")
        assert await conn.receive() == b"220 go"
        await conn.start_tls(
            client_context, server_side=False, server_hostname="localhost"
        )
        await conn.send("bye")
        assert await conn.receive() == b"tls: bye"
        # Cut the TCP connection without TLS's close_notify.
        await trio.aclose_forcefully(stream)
        await conn.aclose()
        await server.aclose()
    expected = CloseReason.ERROR if require_close_notify else CloseReason.CLOSED_BY_PEER
    assert closed[0].close_reason is expected


@pytest.mark.parametrize("require_close_notify", [False, True])
async def test_a_clients_require_close_notify(
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    require_close_notify: bool,
) -> None:
    async def cut_short(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, server_context, server_side=True)
        await tls.send_all(b"bye\n")
        await trio.aclose_forcefully(tls)  # no close_notify

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, cut_short, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        async with trionet.connect_tcp(
            "127.0.0.1",
            port,
            framing=LINES,
            ssl_context=client_context,
            server_hostname="localhost",
            require_close_notify=require_close_notify,
        ) as conn:
            assert await conn.receive() == b"bye"
            with pytest.raises(ConnectionClosed) as info:
                await conn.receive()
        nursery.cancel_scope.cancel()
    if require_close_notify:
        assert info.value.reason is CloseReason.ERROR
    else:
        assert info.value.reason is CloseReason.CLOSED_BY_PEER


# -------------------------------------------------------------------- misuse


async def test_start_tls_where_it_cannot_run(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    async with trionet.testing.connection_pair(LINES) as (a, b):
        with pytest.raises(ValueError, match="handshake_timeout"):
            await a.start_tls(client_context, server_side=False, handshake_timeout=0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.receive)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await a.start_tls(client_context, server_side=False)
            await b.send("unblock")
        await a.send_eof()
        with pytest.raises(ConnectionClosed, match="finished sending"):
            await a.start_tls(client_context, server_side=False)
        # The peer has finished sending: no handshake is possible.
        with pytest.raises(ConnectionClosed) as info:
            await b.receive()
        assert info.value.reason is CloseReason.CLOSED_BY_PEER
        with pytest.raises(ConnectionClosed, match="peer has finished"):
            await b.start_tls(server_context, server_side=True)
        assert b.close_reason is CloseReason.CLOSED_BY_PEER
    with pytest.raises(ConnectionClosed):
        await a.start_tls(client_context, server_side=False)


# ------------------------------------------------- the example, and openssl

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "starttls_lines.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("starttls_lines", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
async def test_openssl_s_client_starttls_smtp_with_the_example_server() -> None:
    example = load_example()
    ca, server_context, _ = example.make_contexts()
    mail = example.MailLikeServer(server_context)
    async with trionet.open_tcp_server(
        mail.handle, host="127.0.0.1", framing=example.LINES
    ) as server:
        output = await example.openssl_session(server.port, ca)
    assert output is not None
    # After openssl's own EHLO and STARTTLS: EHLO (no STARTTLS offered any
    # more), SECRET (only answered over TLS) and QUIT.
    assert output.splitlines() == ["250-hello", "250 OK", example.SECRET, "221 bye"]
    assert mail.secrets_told == 1
    assert mail.refused == []
    assert server.statistics().closed == {CloseReason.CLOSED_BY_HOST: 1}
