"""Testing a small line protocol with trionet's testing tools and pytest fixtures.

Run it with pytest and pytest-trio installed, in a project whose pytest
configuration says ``trio_mode = true``.  No conftest.py is needed: the
fixtures ``tcp_server``, ``tcp_client``, ``udp_server``, ``echo_server`` and
``memory_network`` come with trionet.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

import trionet
from trionet.testing import (
    ChunkedStream,
    DelayedStream,
    ResetAfter,
    StallAfter,
    connection_pair,
)

# -- the code under test (in a real project, import it from your package) ----


async def shout(conn: trionet.Connection) -> None:
    """Answer each line with the same line in capitals; ``QUIT`` says BYE."""
    async for line in conn:
        if line == b"QUIT":
            await conn.send("BYE")
            return
        await conn.send(line.upper())


async def udp_shout(peer: trionet.UdpPeer) -> None:
    """Answer each datagram with the same bytes in capitals."""
    async for data in peer:
        await peer.send(data.upper())


# -- unit tests over in-memory connections: no sockets ------------------------


async def test_shout_in_memory() -> None:
    async with connection_pair(trionet.Lines()) as (client, server_side):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(shout, server_side)
            await client.send("hello")
            assert await client.receive() == b"HELLO"
            await client.send("QUIT")
            assert await client.receive() == b"BYE"


async def test_shout_one_byte_at_a_time() -> None:
    # The handler's side receives every byte in a separate chunk.
    def one_byte_chunks(stream: trio.abc.Stream) -> trio.abc.Stream:
        return ChunkedStream(stream, chunk_size=1)

    async with connection_pair(trionet.Lines(), wrap=one_byte_chunks) as pair:
        client, server_side = pair
        async with trio.open_nursery() as nursery:
            nursery.start_soon(shout, server_side)
            await client.send_all(b"split\nacross\nQUIT\n")
            assert [await client.receive() for _ in range(3)] == [
                b"SPLIT",
                b"ACROSS",
                b"BYE",
            ]


async def test_shout_when_the_connection_resets() -> None:
    # The handler's side is reset once 8 bytes have arrived, inside "world".
    def reset_after_8(stream: trio.abc.Stream) -> trio.abc.Stream:
        return ResetAfter(stream, 8)

    async with connection_pair(trionet.Lines(), wrap=reset_after_8) as pair:
        client, server_side = pair
        await client.send_all(b"hello\nworld\n")
        with pytest.raises(trionet.ConnectionClosed) as caught:
            await shout(server_side)
        assert caught.value.reason is trionet.CloseReason.ERROR
        assert server_side.close_reason is trionet.CloseReason.ERROR


async def test_a_stalled_peer_times_out(autojump_clock: trio.testing.MockClock) -> None:
    # Only "hel" ever arrives; message_timeout ends the wait.  The
    # autojump_clock skips the idle time, so the test takes no real time.
    def stall_after_3(stream: trio.abc.Stream) -> trio.abc.Stream:
        return StallAfter(stream, 3)

    async with connection_pair(trionet.Lines(), wrap=stall_after_3) as pair:
        client, server_side = pair
        server_side.message_timeout = 10.0
        await client.send("hello")
        with pytest.raises(trionet.ConnectionClosed):
            await server_side.receive()
        assert server_side.close_reason is trionet.CloseReason.TIMEOUT


async def test_slow_delivery(autojump_clock: trio.testing.MockClock) -> None:
    # Each chunk the handler's side receives arrives 2 seconds late.
    def slow(stream: trio.abc.Stream) -> trio.abc.Stream:
        return DelayedStream(stream, 2.0)

    async with connection_pair(trionet.Lines(), wrap=slow) as (client, server_side):
        start = trio.current_time()
        await client.send("ping")
        assert await server_side.receive() == b"ping"
        assert trio.current_time() - start == pytest.approx(2.0)


async def test_closing_one_side() -> None:
    async with connection_pair(trionet.Lines()) as (client, server_side):
        await client.aclose()
        assert client.close_reason is trionet.CloseReason.CLOSED_BY_HOST
        with pytest.raises(trionet.ConnectionClosed):
            await server_side.receive()
        # The peer finished sending; this side is still open until it closes.
        assert server_side.eof_received
        assert server_side.close_reason is None
        await server_side.aclose()
        assert server_side.close_reason is trionet.CloseReason.CLOSED_BY_PEER


# -- end to end over loopback, with the plugin's fixtures ---------------------


async def test_shout_over_tcp(tcp_server, tcp_client) -> None:
    server = await tcp_server(shout, framing=trionet.Lines())
    conn = await tcp_client(server)  # takes the server's framing
    await conn.send("over tcp")
    assert await conn.receive() == b"OVER TCP"
    await conn.send("QUIT")
    assert await conn.receive() == b"BYE"


async def test_echo_server(echo_server, tcp_client) -> None:
    conn = await tcp_client(echo_server)
    await conn.send("same again")
    assert await conn.receive() == b"same again"


async def test_shout_over_udp(udp_server) -> None:
    server = await udp_server(udp_shout)
    async with trionet.open_udp(remote=("127.0.0.1", server.port)) as endpoint:
        await endpoint.send(b"datagram")
        with trio.fail_after(5):
            assert await endpoint.receive() == b"DATAGRAM"


# -- the same fixtures over an in-memory network, with faults -------------------


async def test_shout_survives_a_partition(
    memory_network, tcp_server, tcp_client, autojump_clock
) -> None:
    # With the memory_network fixture, tcp_server and tcp_client meet in
    # memory: no sockets, virtual time, and faults on demand.
    memory_network.add_host("db")
    server = await tcp_server(shout, framing=trionet.Lines(), host="db")
    conn = await tcp_client(server)
    memory_network.partition("localhost", "db")
    await conn.send("anyone there?")
    with trio.move_on_after(10) as deadline:
        await conn.receive()
    assert deadline.cancelled_caught  # nothing crosses a partition
    memory_network.heal()
    assert await conn.receive() == b"ANYONE THERE?"  # the bytes waited


async def test_shout_over_lossy_udp(memory_network, udp_server, autojump_clock) -> None:
    memory_network.set_faults("localhost", loss=0.5)
    server = await udp_server(udp_shout)
    replies = 0
    async with trionet.open_udp(remote=("127.0.0.1", server.port)) as endpoint:
        for _ in range(100):
            await endpoint.send(b"x")
            with trio.move_on_after(1):
                await endpoint.receive()
                replies += 1
    lost = sum(record.dropped for record in memory_network.traffic().datagrams)
    assert replies + lost == 100  # each exchange loses its request or reply
