"""trionet.testing.memory_network(): unmodified trionet code over an
in-memory network -- the same errors as the kernel, deterministic time,
every fault, the traffic record, determinism, and the pytest fixture.

(The Connection, server, lifecycle, reconnecting and channel suites also run
over a memory network: see the ``pair_kind`` and ``network`` fixtures in
conftest.py.)
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import ssl
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import trionet
import trionet.testing
from trionet import CloseReason, ConnectError, ConnectionClosed
from trionet._network import current_network
from trionet.testing import MemoryNetwork, MemoryStream, memory_network

if sys.version_info < (3, 11):
    from exceptiongroup import ExceptionGroup

pytest_plugins = ["pytester"]

LINES = trionet.Lines()


async def echo(conn: trionet.Connection) -> None:
    async for message in conn:
        await conn.send(message)


@asynccontextmanager
async def echo_server(
    host: str | list[str] = "127.0.0.1", **options: object
) -> AsyncIterator[trionet.Server]:
    async with trionet.open_tcp_server(
        echo, host=host, framing=LINES, grace_period=0, **options
    ) as server:
        yield server


async def raw_pair(net: MemoryNetwork) -> tuple[MemoryStream, MemoryStream]:
    """A bare connected pair of memory streams (client end, server end),
    made with the calls trionet's socket code makes."""
    calls = net._calls
    [listener] = await calls.listen_tcp(
        ["127.0.0.1"],
        0,
        backlog=None,
        reuse_port=False,
        so_sndbuf=None,
        so_rcvbuf=None,
    )
    client = await calls.connect_tcp("127.0.0.1", listener.getsockname()[1], None)
    server, _address = listener.accept()
    listener.close()
    assert isinstance(server, MemoryStream)
    return client, server


# ---------------------------------------------------------------- the streams


async def test_memory_streams_pass_trios_stream_checks() -> None:
    async def plain() -> tuple[MemoryStream, MemoryStream]:
        return await raw_pair(MemoryNetwork())

    async def clogged() -> tuple[MemoryStream, MemoryStream]:
        # One byte of buffer, already used in each direction.
        client, server = await raw_pair(MemoryNetwork(buffer_size=1))
        await client.send_all(b"x")
        await server.send_all(b"x")
        return client, server

    await trio.testing.check_half_closeable_stream(plain, clogged)


@settings(max_examples=40, deadline=None)
@given(
    data=st.binary(min_size=1, max_size=5000),
    sends=st.lists(st.integers(1, 700), min_size=1, max_size=30),
    receives=st.lists(st.integers(1, 900), min_size=1, max_size=30),
    jitter=st.sampled_from([0.0, 0.5]),
    buffer_size=st.integers(1, 3000),
    seed=st.integers(0, 10),
)
def test_bytes_arrive_whole_and_in_order_whatever_the_chunking(
    data: bytes,
    sends: list[int],
    receives: list[int],
    jitter: float,
    buffer_size: int,
    seed: int,
) -> None:
    """Any cutting of the sends, any receive sizes, any buffer, with jitter:
    the receiver gets exactly the bytes sent, in order, then the end."""

    async def main() -> None:
        net = MemoryNetwork(seed=seed, buffer_size=buffer_size)
        net.set_faults("localhost", latency=0.01, jitter=jitter)
        client, server = await raw_pair(net)

        async def send() -> None:
            view, cuts = memoryview(data), itertools.cycle(sends)
            while view:
                size = next(cuts)
                await client.send_all(view[:size])
                view = view[size:]
            await client.send_eof()

        got = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            sizes = itertools.cycle(receives)
            while chunk := await server.receive_some(next(sizes)):
                got += chunk
        assert got == data
        assert net.record(server).bytes_to_server == len(data)
        await client.aclose()
        await server.aclose()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_each_network_is_its_own_and_only_in_its_block() -> None:
    assert current_network() is None
    ports: list[int] = []

    async def one_network(task_status: trio.TaskStatus[None]) -> None:
        async with memory_network() as net:
            assert current_network() is net._calls
            async with echo_server() as server:
                ports.append(server.port)
                task_status.started()
                async with trionet.connect_tcp(
                    "127.0.0.1", server.port, framing=LINES
                ) as conn:
                    await conn.send(b"ping")
                    assert await conn.receive() == b"ping"
            assert len(net.traffic().connections) == 1

    async with trio.open_nursery() as nursery:
        # Two networks side by side: each has its own port 32768, and each
        # client reaches its own server.
        await nursery.start(one_network)
        await nursery.start(one_network)
    assert ports == [32768, 32768]
    assert current_network() is None


async def test_tasks_started_inside_the_block_use_the_network() -> None:
    async with trio.open_nursery() as outer:
        async with memory_network() as net:
            server = await outer.start(partial(trionet.serve_tcp, echo, 0))
        # The block is over, but the server was started inside it.
        assert isinstance(server, trionet.Server)
        assert server.addresses == [("0.0.0.0", 32768), ("::", 32768, 0, 0)]
        with net.activated():
            async with trionet.connect_tcp("::1", server.port) as conn:
                await conn.send_all(b"still here\n")
                assert await conn.receive_line() == b"still here"
        await server.aclose()


# ------------------------------------------- the same errors as the kernel


async def test_a_closed_port_refuses_as_on_the_kernel() -> None:
    async with memory_network() as net:
        with pytest.raises(ConnectError) as info:
            await trionet.connect_tcp("127.0.0.1", 8000)
    assert info.value.reason is CloseReason.ERROR
    refused = os.strerror(errno.ECONNREFUSED)
    assert str(info.value) == f"cannot connect to 127.0.0.1:8000: {refused}"
    group = info.value.__cause__.__cause__  # type: ignore[union-attr]
    assert isinstance(group, ExceptionGroup)
    [error] = group.exceptions
    assert isinstance(error, ConnectionRefusedError)
    [record] = net.traffic().connections
    assert record.end == "refused"
    assert record.server == ("127.0.0.1", 8000)


async def test_a_port_in_use_is_eaddrinuse_and_port_zero_shares_one_port() -> None:
    async with memory_network():
        async with echo_server(host=["127.0.0.1", "::1"]) as server:
            assert {a[1] for a in server.addresses} == {server.port}
            with pytest.raises(OSError) as info:
                async with trionet.open_tcp_server(echo, server.port, host="::1"):
                    pass  # pragma: no cover
            assert info.value.errno == errno.EADDRINUSE
            # Another address of the same host is free on that port, and
            # so is the wildcard of a family not in use... but not the
            # wildcard of one that is.
            async with trionet.open_tcp_server(echo, server.port, host="127.0.0.2"):
                pass
            with pytest.raises(OSError) as info:
                async with trionet.open_tcp_server(echo, server.port):
                    pass  # pragma: no cover
            assert info.value.errno == errno.EADDRINUSE
            # reuse_port lets two servers share it.
            async with trionet.open_tcp_server(
                echo, 0, host="127.0.0.1", reuse_port=True
            ) as first:
                async with trionet.open_tcp_server(
                    echo, first.port, host="127.0.0.1", reuse_port=True
                ):
                    pass


async def test_only_loopback_and_added_names_exist() -> None:
    async with memory_network() as net:
        with pytest.raises(ConnectError) as info:
            await trionet.connect_tcp("example.com", 80)
        assert isinstance(info.value.__cause__, socket.gaierror)
        assert "net.add_host" in str(info.value)
        with pytest.raises(ConnectError) as info:
            await trionet.connect_tcp("192.0.2.1", 80)
        assert os.strerror(errno.ENETUNREACH) in str(info.value)
        with pytest.raises(OSError) as bind_info:
            async with trionet.open_tcp_server(echo, host="192.0.2.1"):
                pass  # pragma: no cover
        assert bind_info.value.errno == errno.EADDRNOTAVAIL
        with pytest.raises(ConnectError) as info:
            await trionet.connect_tcp("127.0.0.1", 80, local_address="192.0.2.1")
        assert "local_address='192.0.2.1' is incompatible" in str(info.value)
        with pytest.raises(ValueError, match=r"127\.x\.y\.z"):
            net.add_host("db", "10.0.0.1")
        net.add_host("db")
        with pytest.raises(ValueError, match="already"):
            net.add_host("db")
        with pytest.raises(ValueError, match="no host"):
            net.host("cache")
    # Nothing reached the kernel: these names and addresses were never tried.
    assert [r.end for r in net.traffic().connections] == []


async def test_unix_sockets_have_paths_of_their_own() -> None:
    async with memory_network():
        with pytest.raises(ConnectError) as info:
            await trionet.connect_unix("/run/app.sock")
        assert isinstance(info.value.__cause__, FileNotFoundError)

        async with trionet.open_unix_server(
            echo, "/run/app.sock", framing=LINES, accept=lambda who: who.uid >= 0
        ) as server:
            assert server.path == "/run/app.sock"
            assert not await trio.Path("/run/app.sock").exists()  # no file made
            with pytest.raises(OSError) as in_use:
                async with trionet.open_unix_server(echo, "/run/app.sock"):
                    pass  # pragma: no cover
            assert in_use.value.errno == errno.EADDRINUSE
            async with trionet.connect_unix("/run/app.sock", framing=LINES) as conn:
                await conn.send("over a path")
                assert await conn.receive() == b"over a path"
                credentials = conn.peer_credentials
                assert credentials == (os.getpid(), os.geteuid(), os.getegid())
                assert conn.remote_address == "/run/app.sock"
        with pytest.raises(ConnectError):
            await trionet.connect_unix("/run/app.sock")


async def test_closing_with_unread_bytes_resets_the_peer() -> None:
    """As on the kernel: a close with unread bytes is a reset (ERROR on the
    other side), a close without is an end of stream (CLOSED_BY_PEER)."""
    async with memory_network():
        sent = trio.Event()

        async def close_without_reading(conn: trionet.Connection) -> None:
            await sent.wait()

        async with trionet.open_tcp_server(close_without_reading) as server:
            conn = await trionet.connect_tcp("127.0.0.1", server.port)
            await conn.send_all(b"unread")
            sent.set()
            with pytest.raises(ConnectionClosed) as info:
                await conn.receive_some()
            assert info.value.reason is CloseReason.ERROR
            assert isinstance(info.value.__cause__, trio.BrokenResourceError)
            assert isinstance(info.value.__cause__.__cause__, ConnectionResetError)
            assert conn.close_reason is CloseReason.ERROR


async def test_half_close_lets_the_reply_through() -> None:
    async def reply_after_eof(conn: trionet.Connection) -> None:
        request = b""
        while chunk := await conn.receive_some():
            request += chunk
        await conn.send_all(request.upper())

    async with memory_network():
        async with trionet.open_tcp_server(reply_after_eof) as server:
            async with trionet.connect_tcp("localhost", server.port) as conn:
                await conn.send_all(b"question")
                await conn.send_eof()
                assert await conn.receive_exactly(8) == b"QUESTION"
                with pytest.raises(ConnectionClosed) as info:
                    await conn.receive_line()
                assert info.value.reason is CloseReason.CLOSED_BY_PEER


async def test_sending_to_a_peer_that_closed_fails_on_the_next_send() -> None:
    async with memory_network():
        net_client, net_server = await raw_pair(MemoryNetwork())
        await net_server.aclose()
        assert await net_client.receive_some() == b""
        await net_client.send_all(b"goes nowhere")
        with pytest.raises(trio.BrokenResourceError) as info:
            await net_client.send_all(b"fails")
        assert isinstance(info.value.__cause__, BrokenPipeError)
        await net_client.aclose()


async def test_tls_runs_over_the_memory_transport(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    async with memory_network() as net:
        async with echo_server(ssl_context=server_context) as server:
            async with trionet.connect_tcp(
                "127.0.0.1",
                server.port,
                framing=LINES,
                ssl_context=client_context,
                server_hostname="localhost",
            ) as conn:
                await conn.send(b"secret")
                assert await conn.receive() == b"secret"
                record = net.record(conn)
    # What crossed the network was TLS, not the plaintext.
    assert record.data_to_server[:1] == b"\x16"  # a TLS handshake record
    assert b"secret" not in record.data_to_server + record.data_to_client


@pytest.mark.usefixtures("network")
async def test_what_a_failing_handler_sent_first_still_arrives(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Over the kernel and the memory network alike: a send goes out at
    once when the buffer has room, so a handler that fails right after it
    does not take its words back (the peer sees them, then the end)."""

    async def greet_then_fail(conn: trionet.Connection) -> None:
        await conn.send(b"hello")
        raise RuntimeError("bug")

    async with trionet.open_tcp_server(
        greet_then_fail, host="127.0.0.1", framing=LINES
    ) as server:
        async with trionet.connect_tcp("127.0.0.1", server.port, framing=LINES) as conn:
            assert await conn.receive() == b"hello"
            with pytest.raises(ConnectionClosed) as info:
                await conn.receive()
            assert info.value.reason is CloseReason.CLOSED_BY_PEER
    assert [type(e) for e in server.handler_exceptions] == [RuntimeError]


# ----------------------------------------------------------- time and faults


async def test_latency_and_jitter_under_a_mock_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with memory_network(seed=3) as net:
        net.set_faults("localhost", latency=0.25)
        async with echo_server() as server:
            start = trio.current_time()
            async with trionet.connect_tcp(
                "127.0.0.1", server.port, framing=LINES
            ) as conn:
                assert trio.current_time() - start == pytest.approx(0.5)  # SYN, SYN-ACK
                start = trio.current_time()
                await conn.send(b"ping")
                assert await conn.receive() == b"ping"
                assert trio.current_time() - start == pytest.approx(0.5)
                net.set_faults("localhost", jitter=1.0)
                start = trio.current_time()
                for number in range(20):
                    await conn.send(b"%d" % number)
                replies = [await conn.receive() for _ in range(20)]
                # TCP stays in order whatever the jitter; each way took
                # between 0.25 and 1.25 s.
                assert replies == [b"%d" % n for n in range(20)]
                assert 0.5 <= trio.current_time() - start <= 2.5


async def test_bandwidth_spreads_a_transfer_over_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with memory_network() as net:
        net.add_host("db")
        net.set_faults("localhost", "db", bandwidth=100_000)  # bytes per second
        received = trio.Event()

        async def sink(conn: trionet.Connection) -> None:
            await conn.receive_exactly(500_000)
            received.set()

        async with trionet.open_tcp_server(sink, host="db") as server:
            async with trionet.connect_tcp("db", server.port) as conn:
                start = trio.current_time()
                await conn.send_all(bytes(500_000))
                await received.wait()
                assert trio.current_time() - start == pytest.approx(5.0)


async def test_a_partition_stalls_tcp_until_the_idle_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The server hears nothing for 30 s and closes (TIMEOUT); its reset
    cannot cross the partition, so the client only sees it after the heal."""
    async with memory_network() as net:
        db = net.add_host("db")
        closed = trio.Event()
        reasons: list[CloseReason | None] = []

        def on_close(conn: trionet.Connection) -> None:
            reasons.append(conn.close_reason)
            closed.set()

        async with trionet.open_tcp_server(
            echo, host="db", framing=LINES, idle_timeout=30, on_close=on_close
        ) as server:
            async with trionet.connect_tcp("db", server.port, framing=LINES) as conn:
                await conn.send(b"before")
                assert await conn.receive() == b"before"
                net.partition("localhost", db)
                start = trio.current_time()
                await conn.send(b"lost in the partition")
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(conn.receive)
                    await closed.wait()
                    assert trio.current_time() - start == pytest.approx(30)
                    assert reasons == [CloseReason.TIMEOUT]
                    # An hour later the client still waits: nothing crosses.
                    await trio.sleep(3600)
                    assert conn.close_reason is None
                    nursery.cancel_scope.cancel()
                net.heal("localhost", db)
                with pytest.raises(ConnectionClosed) as info:
                    await conn.receive()
                assert info.value.reason is CloseReason.ERROR


async def test_bytes_wait_in_a_partition_and_flow_when_it_heals(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with memory_network() as net:
        net.add_host("db")
        async with trionet.open_tcp_server(echo, host="db", framing=LINES) as server:
            async with trionet.connect_tcp("db", server.port, framing=LINES) as conn:
                net.partition("localhost", "db")
                await conn.send(b"waits")

                async def heal_later() -> None:
                    await trio.sleep(7)
                    net.heal("localhost", "db")

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(heal_later)
                    start = trio.current_time()
                    assert await conn.receive() == b"waits"
                    assert trio.current_time() - start == pytest.approx(7)


async def test_connecting_across_a_partition_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with memory_network() as net:
        net.add_host("db")
        async with echo_server(host="db") as server:
            net.partition("localhost", "db")
            with pytest.raises(ConnectError) as info:
                await trionet.connect_tcp("db", server.port, connect_timeout=3)
            assert info.value.reason is CloseReason.TIMEOUT
            # The attempt that was given up left nothing behind: after the
            # heal the server has never seen a client.
            net.heal()
            await trio.testing.wait_all_tasks_blocked()
            assert server.statistics().accepted == 0
            assert net.traffic().connections == ()


async def test_reset_of_one_connection_is_an_error_on_both_sides() -> None:
    async with memory_network() as net:
        reasons: list[CloseReason | None] = []
        async with echo_server(on_close=lambda c: reasons.append(c.close_reason)) as (
            server
        ):
            one = await trionet.connect_tcp("127.0.0.1", server.port, framing=LINES)
            two = await trionet.connect_tcp("127.0.0.1", server.port, framing=LINES)
            await one.send(b"hi")
            assert await one.receive() == b"hi"
            net.reset(one)
            with pytest.raises(ConnectionClosed) as info:
                await one.receive()
            assert info.value.reason is CloseReason.ERROR
            assert isinstance(info.value.__cause__.__cause__, ConnectionResetError)  # type: ignore[union-attr]
            # The other connection is untouched.
            await two.send(b"fine")
            assert await two.receive() == b"fine"
            await trio.testing.wait_all_tasks_blocked()
            assert reasons == [CloseReason.ERROR]
            await one.aclose()
            await two.aclose()
        records = net.traffic().connections
        assert [r.end for r in records] == ["reset", "closed"]
        with pytest.raises(ValueError, match="not open"):
            net.reset(records[0])


async def test_a_host_that_goes_down_refuses_and_resets(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with memory_network() as net:
        net.add_host("db")
        async with echo_server(host="db") as server:
            conn = await trionet.connect_tcp("db", server.port, framing=LINES)
            net.take_down("db")
            assert net.host("db").down
            with pytest.raises(ConnectionClosed) as closed:
                await conn.receive()
            assert closed.value.reason is CloseReason.ERROR
            with pytest.raises(ConnectError) as refused:
                await trionet.connect_tcp("db", server.port)
            assert "Connection refused" in str(refused.value)
            with net.on_host("db"), pytest.raises(ConnectError) as unreachable:
                await trionet.connect_tcp("127.0.0.1", server.port)
            assert os.strerror(errno.ENETUNREACH) in str(unreachable.value)
            net.bring_up("db")
            async with trionet.connect_tcp("db", server.port, framing=LINES) as again:
                await again.send(b"back")
                assert await again.receive() == b"back"
            await conn.aclose()


async def test_a_peer_that_stops_reading_backs_up_and_is_evicted() -> None:
    """A bounded buffer per direction: a client that never reads fills it,
    the server's queue fills behind it, and a broadcast evicts it."""
    async with memory_network(buffer_size=4096):

        async def idle(conn: trionet.Connection) -> None:
            await trio.sleep_forever()

        async with trionet.open_tcp_server(
            idle,
            framing=LINES,
            send_queue_size=4,
            send_queue_bytes=4096,
            broadcast_headroom=0,
            grace_period=0,
        ) as server:
            conn = await trionet.connect_tcp("127.0.0.1", server.port)
            await trio.testing.wait_all_tasks_blocked()
            sent = 0
            while server.connections:
                await server.broadcast(b"x" * 1000)
                sent += 1
                assert sent < 100, "the slow consumer was never evicted"
            assert server.statistics().closed == {CloseReason.SLOW_CONSUMER: 1}
            # About the buffer and the queue's bound went before it: kilobytes,
            # not the megabytes a kernel would have buffered.
            assert sent < 12
            await conn.aclose()


async def test_send_waits_on_a_full_buffer_and_continues_as_it_drains() -> None:
    async with memory_network(buffer_size=1000) as net:
        client, server = await raw_pair(net)
        done = trio.Event()

        async def send() -> None:
            await client.send_all(bytes(2500))
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()
            assert net.record(client).bytes_to_server == 1000
            got = 0
            while got < 2500:
                got += len(await server.receive_some(700))
            await done.wait()
        await client.aclose()
        await server.aclose()


# ------------------------------------------------------- hosts and addresses


async def test_hosts_by_name_and_by_loopback_address() -> None:
    async with memory_network() as net:
        db = net.add_host("db")
        assert db.addresses == ("127.0.0.2",)
        assert net.add_host("cache", "127.0.0.9").addresses == ("127.0.0.9",)
        async with echo_server(host="db") as server:
            assert server.addresses == [("127.0.0.2", server.port)]
            # The name and the address reach the same server ...
            for where in ("db", "127.0.0.2"):
                async with trionet.connect_tcp(
                    where, server.port, framing=LINES
                ) as conn:
                    await conn.send(where)
                    assert await conn.receive() == where.encode()
            # ... localhost does not.
            with pytest.raises(ConnectError):
                await trionet.connect_tcp("127.0.0.1", server.port)
            # A client on another host comes from that host's address.
            with net.on_host(net.add_host("app")):
                async with trionet.connect_tcp("db", server.port) as conn:
                    assert conn.local_address == ("127.0.0.3", 32768)
            # An unused loopback address is a host of its own.
            assert net.host("127.0.0.77").name == "127.0.0.77"
        assert [h.name for h in net.hosts] == [
            "localhost",
            "db",
            "cache",
            "app",
            "127.0.0.77",
        ]


async def test_faults_are_validated_and_combined() -> None:
    async with memory_network() as net:
        net.add_host("db")
        with pytest.raises(ValueError, match=r"loss must be in 0\.\.1"):
            net.set_faults("db", loss=1.5)
        with pytest.raises(ValueError, match="latency must be >= 0"):
            net.set_faults("db", latency=-1)
        with pytest.raises(TypeError):
            net.set_faults("db", lateness=1)
        with pytest.raises(ValueError, match="itself"):
            net.partition("db", "db")
        net.set_faults("db", latency=0.1)
        faults = net.set_faults("localhost", "db", loss=0.5)
        assert faults == trionet.testing.Faults(loss=0.5)
        assert net.faults("db") == trionet.testing.Faults(latency=0.1)
        assert net.faults("db", "localhost") is faults
        with pytest.raises(ValueError):
            MemoryNetwork(buffer_size=0)


# --------------------------------------------------------------- observation


async def test_the_record_counts_and_captures_each_direction() -> None:
    async with memory_network(capture_bytes=20) as net:
        async with echo_server() as server:
            async with trionet.connect_tcp(
                "127.0.0.1", server.port, framing=LINES
            ) as conn:
                for word in (b"alpha", b"beta", b"gamma"):
                    await conn.send(word)
                    assert await conn.receive() == word
        [record] = net.traffic().connections
    assert record.kind == "tcp"
    assert record.client == ("127.0.0.1", 32769)
    assert record.server == ("127.0.0.1", 32768)
    assert record.end == "closed"
    assert record.bytes_to_server == record.bytes_to_client == 17
    # 20 bytes of capture in all, taken in the order the bytes were sent.
    assert record.truncated
    assert record.data_to_server == b"alpha\nbeta\n"
    assert record.data_to_client == b"alpha\nbet"
    assert record.messages_to_server(LINES) == [b"alpha", b"beta"]
    assert record.messages_to_client(LINES) == [b"alpha"]


# --------------------------------------------------------------- determinism


async def traffic_of_a_run(seed: int) -> trionet.testing.Traffic:
    """Clients on two hosts talk to a server over jittery links."""
    async with memory_network(seed=seed) as net:
        for name in ("app", "db"):
            net.add_host(name)
        net.set_faults("app", "db", latency=0.01, jitter=0.05)
        async with echo_server(host="db", idle_timeout=1) as server:

            async def client(number: int) -> None:
                with net.on_host("app"):
                    async with trionet.connect_tcp(
                        "db", server.port, framing=LINES
                    ) as conn:
                        for message in range(5):
                            await conn.send(b"%d-%d" % (number, message))
                            await conn.receive()

            for number in range(3):
                await client(number)
        traffic = net.traffic()
    assert len(traffic.connections) == 3
    return traffic


# ---------------------------------------------------------------- datagrams


@asynccontextmanager
async def udp_link(
    net: MemoryNetwork,
) -> AsyncIterator[tuple[trionet.Datagram, trionet.Datagram]]:
    """A sender on host "app" connected to a receiver on host "db"."""
    for name in ("app", "db"):
        if name not in [h.name for h in net.hosts]:
            net.add_host(name)
    async with trionet.open_udp(local_host="db") as receiver:
        with net.on_host("app"):
            async with trionet.open_udp(
                remote=("db", receiver.local_address[1])
            ) as sender:
                yield sender, receiver


async def drain(endpoint: trionet.Datagram) -> list[bytes]:
    """Every datagram that arrives until nothing has for a minute."""
    got = []
    while True:
        with trio.move_on_after(60):
            got.append(await endpoint.receive_from())
            continue
        return [data for data, _address in got]


async def test_datagram_loss_is_seeded_and_recorded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with memory_network(seed=1) as net:
        async with udp_link(net) as (sender, receiver):
            net.set_faults("app", "db", loss=0.1)
            for number in range(1000):
                await sender.send(b"%d" % number)
            got = await drain(receiver)
        records = net.traffic().datagrams
    assert len(records) == 1000
    lost = [r for r in records if r.fate == "lost"]
    # About 10%, and exactly what the record says: no other datagram missing.
    assert 60 < len(lost) < 140
    assert len(got) == 1000 - len(lost)
    assert got == [b"%d" % n for n in range(1000) if records[n].fate == "delivered"]
    assert all(r.dropped == (r.fate != "delivered") for r in records)
    assert records[0].source == ("127.0.0.2", 32768)
    assert records[0].destination == ("127.0.0.3", 32768)
    assert records[0].size == 1


async def test_duplicates_arrive_twice_and_are_recorded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with memory_network() as net:
        async with udp_link(net) as (sender, receiver):
            net.set_faults("db", duplicate=1.0)
            for number in range(5):
                await sender.send(b"%d" % number)
            got = await drain(receiver)
        records = net.traffic().datagrams
    assert sorted(got) == sorted([b"%d" % n for n in range(5)] * 2)
    assert [r.duplicate for r in records] == [False, True] * 5


async def test_reordering_and_jitter_change_the_order_not_the_set(
    autojump_clock: trio.testing.MockClock,
) -> None:
    for faults in ({"reorder": 0.3, "reorder_delay": 0.05}, {"jitter": 0.05}):
        async with memory_network(seed=2) as net:
            async with udp_link(net) as (sender, receiver):
                net.set_faults("app", "db", **faults)
                sent = [b"%d" % n for n in range(50)]
                for data in sent:
                    await sender.send(data)
                    await trio.sleep(0.01)
                got = await drain(receiver)
        assert sorted(got) == sorted(sent)
        assert got != sent, faults


async def test_datagram_latency_and_bandwidth(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with memory_network() as net:
        async with udp_link(net) as (sender, receiver):
            net.set_faults("app", latency=0.2)
            start = trio.current_time()
            await sender.send(b"hello")
            assert await receiver.receive_from() == (b"hello", sender.local_address)
            assert trio.current_time() - start == pytest.approx(0.2)
            net.set_faults("app", "db", bandwidth=10_000)
            start = trio.current_time()
            for _ in range(10):
                await sender.send(bytes(1000))
            for _ in range(10):
                await receiver.receive_from()
            # 10 kB at 10 kB/s, then the latency.
            assert trio.current_time() - start == pytest.approx(1.2)


async def test_partitions_down_hosts_and_full_buffers_drop_datagrams() -> None:
    async with memory_network(buffer_size=3000) as net:
        async with udp_link(net) as (sender, receiver):
            net.partition("app", "db")
            await sender.send(b"partitioned")
            net.heal()
            net.take_down("db")
            await sender.send(b"host down")
            net.bring_up("db")
            for _ in range(4):
                await sender.send(bytes(1000))  # the fourth does not fit
            await sender.send(b"x" * 10)
            await trio.testing.wait_all_tasks_blocked()
            got = [len((await receiver.receive_from())[0]) for _ in range(3)]
        fates = [r.fate for r in net.traffic().datagrams]
    assert fates == [
        "partitioned",
        "host down",
        "delivered",
        "delivered",
        "delivered",
        "overflow",
        "overflow",
    ]
    assert got == [1000, 1000, 1000]


async def test_so_rcvbuf_bounds_what_a_udp_socket_holds() -> None:
    async with memory_network() as net:
        async with trionet.open_udp(local_host="127.0.0.1", so_rcvbuf=2500) as receiver:
            async with trionet.open_udp(
                remote=("127.0.0.1", receiver.local_address[1])
            ) as sender:
                for _ in range(3):
                    await sender.send(bytes(1000))  # the third does not fit
                got = [len((await receiver.receive_from())[0]) for _ in range(2)]
                await sender.send(b"room again")  # what was read made room
                assert (await receiver.receive_from())[0] == b"room again"
        fates = [r.fate for r in net.traffic().datagrams]
    assert got == [1000, 1000]
    assert fates == ["delivered", "delivered", "overflow", "delivered"]


async def test_a_connected_sender_hears_that_nobody_listens() -> None:
    async with memory_network() as net:
        async with trionet.open_udp(remote=("127.0.0.1", 9999)) as sender:
            await sender.send(b"anyone?")
            with pytest.raises(trionet.DatagramError) as info:
                await sender.receive()
        assert info.value.errno == errno.ECONNREFUSED
        [record] = net.traffic().datagrams
        assert record.fate == "unreachable"


async def test_the_refusal_wakes_a_receive_that_waits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with memory_network():
        async with trionet.open_udp(remote=("127.0.0.1", 9999)) as sender:
            errors: list[int | None] = []

            async def receive() -> None:
                with pytest.raises(trionet.DatagramError) as info:
                    await sender.receive()
                errors.append(info.value.errno)

            # (A hang guard in virtual time: a receive never woken fails.)
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(receive)
                    await trio.testing.wait_all_tasks_blocked()
                    await sender.send(b"anyone?")
    assert errors == [errno.ECONNREFUSED]


async def test_udp_peers_expire_under_a_mock_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    closed: list[CloseReason | None] = []
    expired = trio.Event()

    async def remember(peer: trionet.UdpPeer) -> None:
        try:
            async for data in peer:
                await peer.send(data)
        finally:
            closed.append(peer.close_reason)
            expired.set()

    async with memory_network():
        async with trionet.open_udp_server(
            remember, host="127.0.0.1", idle_timeout=600, grace_period=0
        ) as server:
            async with trionet.open_udp(remote=("127.0.0.1", server.port)) as ep:
                start = trio.current_time()
                await ep.send(b"once")
                assert await ep.receive() == b"once"
                await expired.wait()
                assert trio.current_time() - start == pytest.approx(600)
                assert server.statistics().open_peers == 0
    assert closed == [CloseReason.TIMEOUT]


async def test_one_sender_always_reaches_the_same_reuse_port_socket() -> None:
    seen: dict[int, set[tuple[object, ...]]] = {0: set(), 1: set()}

    def handler(index: int) -> Callable[[trionet.UdpPeer], Awaitable[None]]:
        async def record(peer: trionet.UdpPeer) -> None:
            async for _data in peer:
                seen[index].add(peer.remote_address)

        return record

    async with memory_network():
        async with trionet.open_udp_server(
            handler(0), host="127.0.0.1", reuse_port=True, grace_period=0
        ) as first:
            async with trionet.open_udp_server(
                handler(1),
                first.port,
                host="127.0.0.1",
                reuse_port=True,
                grace_period=0,
            ):
                for _client in range(8):
                    async with trionet.open_udp(remote=("127.0.0.1", first.port)) as ep:
                        for _ in range(3):
                            await ep.send(b"x")
                await trio.testing.wait_all_tasks_blocked()
    # Each sender went to one socket only; both sockets got senders.
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == 8
    assert seen[0] and seen[1]


async def datagrams_of_a_run(seed: int) -> trionet.testing.Traffic:
    async with memory_network(seed=seed) as net:
        async with udp_link(net) as (sender, receiver):
            net.set_faults(
                "app", "db", loss=0.2, duplicate=0.1, reorder=0.1, jitter=0.01
            )
            for number in range(200):
                await sender.send(b"%d" % number)
            await drain(receiver)
        traffic = net.traffic()
    assert len(traffic.datagrams) >= 200
    return traffic


@pytest.mark.parametrize(
    "run", [traffic_of_a_run, datagrams_of_a_run], ids=["tcp", "udp"]
)
async def test_the_same_seed_gives_the_same_traffic(
    run: Callable[[int], Awaitable[trionet.testing.Traffic]],
    autojump_clock: trio.testing.MockClock,
) -> None:
    first = await run(11)
    again = await run(11)
    other = await run(12)
    assert first == again
    # Another seed: other jitter, so other times (and other datagram fates).
    assert first != other


# ---------------------------------------------------------- the pytest plugin


def test_the_fixture_puts_the_plugins_servers_on_the_network(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini("[pytest]\ntrio_mode = true\nfilterwarnings = error\n")
    pytester.makepyfile(
        textwrap.dedent(
            """
            import pytest
            import trio

            async def test_echo_over_memory(echo_server, tcp_client, memory_network):
                # echo_server was requested first, and still runs over memory.
                conn = await tcp_client(echo_server)
                await conn.send("hi")
                assert await conn.receive() == b"hi"
                [record] = memory_network.traffic().connections
                assert record.data_to_server == b"hi\\n"

            @pytest.mark.memory_network(seed=5, buffer_size=1000)
            async def test_options_by_marker(memory_network, autojump_clock):
                memory_network.set_faults("localhost", latency=10)
                assert memory_network._options.seed == 5
                assert memory_network._options.buffer_size == 1000

            async def test_without_the_fixture_the_kernel(echo_server, tcp_client):
                from trionet._network import current_network
                assert current_network() is None
                conn = await tcp_client(echo_server)
                await conn.send("kernel")
                assert await conn.receive() == b"kernel"
            """
        )
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--strict-markers")
    result.assert_outcomes(passed=3)


def test_the_fixture_is_listed(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest_inprocess("--fixtures", "-p", "no:cacheprovider")
    assert "memory_network -- " in result.stdout.str()
