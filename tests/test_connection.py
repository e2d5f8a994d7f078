"""Connection: every receive mode, mixed modes, sends, close reasons, cancellation.

Each test runs over real loopback TCP and over in-memory streams (with and
without a send queue), through the ``pair_kind`` fixture.
"""

from __future__ import annotations

import socket
import struct
import tracemalloc

import pytest
import trio
import trio.testing

import trionet
from trionet import CloseReason, ConnectionClosed, IncompleteMessage
from trionet._connection import Connection
from trionet._receive_direct import DIRECT_RECEIVE_MIN

from .conftest import open_pair


async def test_receive_line_exactly_frame_some(pair_kind: str) -> None:
    async with open_pair(pair_kind) as (client, server):
        await client.send_all(b"first line\nABCDE" + struct.pack(">I", 3) + b"xyzraw")
        assert await server.receive_line() == b"first line"
        assert await server.receive_exactly(5) == b"ABCDE"
        assert await server.receive_frame() == b"xyz"
        assert await server.receive_some() == b"raw"


async def test_mixed_modes_across_chunk_boundaries(pair_kind: str) -> None:
    # A header line, then a sized body, then a frame, sent one byte at a time.
    async with open_pair(pair_kind) as (client, server):
        body = bytes(range(256)) * 4
        wire = b"LENGTH 1024\r\n" + body + trionet.Frames().encode(b"trailer")

        async def send_slowly() -> None:
            for i in range(len(wire)):
                await client.send_all(wire[i : i + 1])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_slowly)
            server.framing = trionet.Lines(b"\r\n")
            header = await server.receive_line()
            assert header == b"LENGTH 1024"
            assert await server.receive_exactly(int(header.split()[1])) == body
            assert await server.receive_frame() == b"trailer"


async def test_framing_drives_receive_send_and_iteration(pair_kind: str) -> None:
    async with open_pair(pair_kind, framing=trionet.Frames()) as (client, server):
        messages = [b"", b"one", b"two" * 1000, bytes(70000)]
        for message in messages:
            await client.send(message)
        if pair_kind in ("tcp", "unix"):
            await client.send_eof()
        else:
            await client.aclose()
        received = [message async for message in server]
        assert received == messages
        # Only the receiving side has finished: the connection is still open.
        assert server.eof_received
        assert server.close_reason is None
        await server.aclose()
        assert server.close_reason is CloseReason.CLOSED_BY_PEER


async def test_lines_framing_accepts_str_and_strips_delimiter(pair_kind: str) -> None:
    framing = trionet.Lines(b"\r\n")
    async with open_pair(pair_kind, framing=framing) as (client, server):
        await client.send("héllo")
        await client.send_line(b"bytes too")
        assert await server.receive() == "héllo".encode()
        assert await server.receive_line() == b"bytes too"


async def test_raw_iteration_ends_at_eof(pair_kind: str) -> None:
    async with open_pair(pair_kind) as (client, server):
        await client.send_all(b"some raw bytes")
        await client.aclose()
        chunks = [chunk async for chunk in server]
        assert b"".join(chunks) == b"some raw bytes"
        assert await server.receive_some() == b""


async def test_send_line_refuses_delimiter_and_oversize(pair_kind: str) -> None:
    framing = trionet.Lines(max_length=10)
    async with open_pair(pair_kind, framing=framing) as (client, server):
        with pytest.raises(ValueError, match="delimiter"):
            await client.send_line(b"two\nlines")
        with pytest.raises(trionet.MessageTooLarge):
            await client.send(b"x" * 11)
        await client.send(b"fine")
        # Nothing of the refused messages reached the peer.
        assert await server.receive() == b"fine"
        assert client.close_reason is None


async def test_send_frame_over_max_size_sends_nothing(pair_kind: str) -> None:
    async with open_pair(pair_kind, framing=trionet.Frames(max_size=100)) as (
        client,
        server,
    ):
        with pytest.raises(trionet.MessageTooLarge):
            await client.send(bytes(101))
        await client.send(b"ok")
        assert await server.receive() == b"ok"


async def test_line_too_long_closes_with_protocol_error(pair_kind: str) -> None:
    async with open_pair(pair_kind, framing=trionet.Lines(max_length=8)) as (
        client,
        server,
    ):
        await client.send_all(b"short\n" + b"y" * 20)
        assert await server.receive() == b"short"
        with pytest.raises(trionet.LineTooLong):
            await server.receive()
        assert server.close_reason is CloseReason.PROTOCOL_ERROR
        with pytest.raises(ConnectionClosed) as info:
            await server.receive()
        assert info.value.reason is CloseReason.PROTOCOL_ERROR
        with pytest.raises(ConnectionClosed):
            await server.send(b"late")


async def test_frame_too_large_is_refused_at_the_header(pair_kind: str) -> None:
    async with open_pair(pair_kind, framing=trionet.Frames(max_size=1024)) as (
        client,
        server,
    ):
        # Only the header is sent: the verdict must not wait for the body.
        await client.send_all(struct.pack(">I", 2**31))
        with pytest.raises(trionet.FrameTooLarge, match="2147483648"):
            await server.receive()
        assert server.close_reason is CloseReason.PROTOCOL_ERROR


@pytest.mark.parametrize("mode", ["line", "exactly", "frame"])
async def test_stream_ending_inside_a_message(pair_kind: str, mode: str) -> None:
    async with open_pair(pair_kind) as (client, server):
        partial = {"line": b"no newline", "exactly": b"abc", "frame": b"\x00\x00"}[mode]
        await client.send_all(partial)
        await client.aclose()
        with pytest.raises(IncompleteMessage) as info:
            if mode == "line":
                await server.receive_line()
            elif mode == "exactly":
                await server.receive_exactly(10)
            else:
                await server.receive_frame()
        assert info.value.partial == partial
        assert info.value.reason is CloseReason.CLOSED_BY_PEER
        assert isinstance(info.value, ConnectionClosed)
        assert client.close_reason is CloseReason.CLOSED_BY_HOST
        assert server.eof_received
        assert server.close_reason is None
        await server.aclose()
        assert server.close_reason is CloseReason.CLOSED_BY_PEER


async def test_clean_end_of_stream_raises_connection_closed(pair_kind: str) -> None:
    async with open_pair(pair_kind) as (client, server):
        await client.aclose()
        with pytest.raises(ConnectionClosed) as info:
            await server.receive_line()
        assert not isinstance(info.value, IncompleteMessage)
        assert info.value.reason is CloseReason.CLOSED_BY_PEER


async def test_send_after_close_raises(pair_kind: str) -> None:
    async with open_pair(pair_kind) as (client, _server):
        await client.aclose()
        assert client.close_reason is CloseReason.CLOSED_BY_HOST
        with pytest.raises(ConnectionClosed) as info:
            await client.send_all(b"x")
        assert info.value.reason is CloseReason.CLOSED_BY_HOST
        with pytest.raises(ConnectionClosed):
            await client.receive_some()
        await client.aclose()  # closing twice is fine
        assert client.close_reason is CloseReason.CLOSED_BY_HOST


async def test_cancelled_receive_loses_nothing(pair_kind: str) -> None:
    async with open_pair(pair_kind) as (client, server):
        await client.send_all(b"partial li")
        with trio.move_on_after(0.05) as scope:
            await server.receive_line()
        assert scope.cancelled_caught
        await client.send_all(b"ne\nnext\n")
        assert await server.receive_line() == b"partial line"
        assert await server.receive_line() == b"next"
        assert server.close_reason is None


async def test_cancelled_receive_exactly_keeps_its_bytes(pair_kind: str) -> None:
    async with open_pair(pair_kind) as (client, server):
        await client.send_all(b"12345")
        with trio.CancelScope() as scope:
            scope.cancel()
            await server.receive_exactly(3)
        assert await server.receive_exactly(5) == b"12345"


async def test_concurrent_senders_never_interleave(pair_kind: str) -> None:
    async with open_pair(pair_kind, framing=trionet.Frames()) as (client, server):
        senders, per_sender = 8, 50
        big = 50_000

        async def sender(tag: int) -> None:
            for i in range(per_sender):
                await server.send(bytes([tag]) * big + i.to_bytes(4, "big"))

        async def collect() -> list[bytes]:
            return [await client.receive() for _ in range(senders * per_sender)]

        async with trio.open_nursery() as nursery:
            for tag in range(senders):
                nursery.start_soon(sender, tag)
            received = await collect()
        seen: dict[int, list[int]] = {}
        for message in received:
            tag = message[0]
            assert message[:big] == bytes([tag]) * big
            seen.setdefault(tag, []).append(int.from_bytes(message[big:], "big"))
        assert seen == {tag: list(range(per_sender)) for tag in range(senders)}


async def test_two_concurrent_receivers_are_refused(pair_kind: str) -> None:
    async with open_pair(pair_kind) as (_client, server):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.receive_line)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await server.receive_line()
            nursery.cancel_scope.cancel()


async def test_closing_wakes_a_waiting_receiver(pair_kind: str) -> None:
    async with open_pair(pair_kind) as (_client, server):
        async with trio.open_nursery() as nursery:

            async def receive() -> None:
                with pytest.raises(ConnectionClosed) as info:
                    await server.receive_line()
                assert info.value.reason is CloseReason.CLOSED_BY_HOST

            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            await server.aclose()


async def test_idle_timeout_on_a_connection(
    pair_kind: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_pair(pair_kind) as (_client, server):
        server.idle_timeout = 5.0
        start = trio.current_time()
        with pytest.raises(ConnectionClosed) as info:
            await server.receive_line()
        assert info.value.reason is CloseReason.TIMEOUT
        assert server.close_reason is CloseReason.TIMEOUT
        assert trio.current_time() - start == pytest.approx(5.0, abs=0.01)


async def test_message_timeout_catches_a_trickling_peer(
    pair_kind: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_pair(pair_kind) as (client, server):
        server.idle_timeout = 10.0
        server.message_timeout = 3.0

        async def trickle() -> None:
            with pytest.raises(ConnectionClosed):
                for _ in range(100):
                    await client.send_all(b"a")
                    await trio.sleep(1.0)  # the slow peer's pace, not a sync

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            with pytest.raises(ConnectionClosed) as info:
                await server.receive_line()
            assert info.value.reason is CloseReason.TIMEOUT
            nursery.cancel_scope.cancel()


async def test_framing_must_be_a_framing() -> None:
    left, _right = trio.testing.memory_stream_pair()
    with pytest.raises(TypeError):
        trionet.Connection(left, framing=b"\n")  # type: ignore[arg-type]


async def test_addresses_over_tcp() -> None:
    async with open_pair("tcp") as (client, server):
        assert client.remote_address == server.local_address
        assert client.local_address == server.remote_address
        assert client.remote_address is not None
        assert client.remote_address[0] == "127.0.0.1"


@pytest.mark.parametrize("side", ["client", "server"])
async def test_addresses_are_kept_after_close_even_if_never_read(side: str) -> None:
    # (Addresses are looked up lazily; closing must not lose them.)
    async with open_pair("tcp") as (client, server):
        conn = client if side == "client" else server
        peer = server if side == "client" else client
        await conn.aclose()
        assert conn.close_reason is CloseReason.CLOSED_BY_HOST
        assert conn.remote_address == peer.local_address
        assert conn.local_address == peer.remote_address
        assert conn.local_address is not None
        assert str(conn.local_address[1]) in repr(peer)


async def test_addresses_are_none_off_sockets() -> None:
    async with open_pair("memory") as (client, _server):
        assert client.local_address is None
        assert client.remote_address is None


async def test_peer_reset_is_an_error() -> None:
    async with open_pair("tcp") as (client, server):
        await client.send_all(b"half a li")
        # Abort the client's socket with an RST instead of a FIN.
        transport = client._transport
        sock: socket.socket = transport._sock  # type: ignore[attr-defined]
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await client.aclose()
        with pytest.raises(ConnectionClosed) as info:
            await server.receive_line()
        assert info.value.reason is CloseReason.ERROR
        assert server.close_reason is CloseReason.ERROR


async def test_half_close_still_gets_the_reply() -> None:
    async with open_pair("tcp", framing=trionet.Lines()) as (client, server):
        await client.send(b"request")
        await client.send_eof()
        assert await server.receive() == b"request"
        with pytest.raises(ConnectionClosed):
            await server.receive()
        assert server.eof_received
        assert server.close_reason is None
        await server.send(b"reply after the peer's EOF")
        assert await client.receive() == b"reply after the peer's EOF"
        await server.aclose()
        assert server.close_reason is CloseReason.CLOSED_BY_PEER


async def test_batched_messages_before_bad_data_are_delivered(pair_kind: str) -> None:
    framing = trionet.Lines(max_length=4)
    async with open_pair(pair_kind, framing=framing) as (client, server):
        await client.send_all(b"a\nbb\nccc\n" + b"x" * 10 + b"\n")
        assert [await server.receive() for _ in range(3)] == [b"a", b"bb", b"ccc"]
        with pytest.raises(trionet.LineTooLong):
            await server.receive()
        assert server.close_reason is CloseReason.PROTOCOL_ERROR


async def test_message_right_before_bad_data_is_delivered(pair_kind: str) -> None:
    framing = trionet.Lines(max_length=4)
    async with open_pair(pair_kind, framing=framing) as (client, server):
        await client.send_all(b"good\n" + b"x" * 10 + b"\n")
        assert await server.receive() == b"good"
        with pytest.raises(trionet.LineTooLong):
            await server.receive()


async def test_switching_modes_after_a_batch_loses_nothing(pair_kind: str) -> None:
    async with open_pair(pair_kind, framing=trionet.Lines()) as (client, server):
        frame = trionet.Frames().encode(b"framed")
        await client.send_all(b"one\ntwo\nthree\nRAW" + frame + b"four\n")
        assert await server.receive() == b"one"  # cuts two and three in a batch
        assert await server.receive_line() == b"two"
        assert await server.receive() == b"three"
        assert await server.receive_exactly(3) == b"RAW"
        assert await server.receive_frame() == b"framed"
        server.framing = trionet.Frames()
        client.framing = trionet.Frames()
        await client.send(b"five")
        assert await server.receive_line() == b"four"
        assert await server.receive() == b"five"


# ------------------------------------------- large messages, received directly

#: Bigger than two DIRECT_RECEIVE_MIN, so the body is received directly.
BIG = 3 * DIRECT_RECEIVE_MIN + 12_345


def pattern(size: int) -> bytes:
    return (bytes(range(251)) * (size // 251 + 1))[:size]


@pytest.fixture
def direct_receives(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The body sizes of every message taken by the direct-receive path."""
    sizes: list[int] = []
    original = trionet._connection.receive_direct

    async def spy(conn: Connection, header_size: int, size: int) -> bytes:
        sizes.append(size)
        return await original(conn, header_size, size)

    monkeypatch.setattr(trionet._connection, "receive_direct", spy)
    return sizes


async def test_large_messages_arrive_whole_between_small_ones(
    pair_kind: str, direct_receives: list[int]
) -> None:
    body = pattern(BIG)
    async with open_pair(pair_kind, framing=trionet.Frames()) as (client, server):
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                await client.send(body)
                await client.send(b"small")
                await client.send_all(body[::-1])
                await client.send_line(b"after")

            nursery.start_soon(send)
            assert await server.receive() == body
            assert await server.receive() == b"small"
            assert await server.receive_exactly(BIG) == body[::-1]
            assert await server.receive_line() == b"after"
    assert direct_receives == [BIG, BIG]
    assert server.statistics().bytes_received == 2 * BIG + 4 + 4 + 5 + 6


async def test_cancelled_large_receive_gives_its_bytes_back(
    pair_kind: str, direct_receives: list[int]
) -> None:
    body = pattern(BIG)
    frame = trionet.Frames().encode(body)
    first = 2 * DIRECT_RECEIVE_MIN + 100
    async with open_pair(pair_kind, framing=trionet.Frames()) as (client, server):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, frame[:first])
            with trio.CancelScope() as scope:

                async def cancel_once_blocked() -> None:
                    # Blocked means every byte sent so far has been received.
                    while server.statistics().bytes_received < first:
                        await trio.testing.wait_all_tasks_blocked()
                    scope.cancel()

                nursery.start_soon(cancel_once_blocked)
                await server.receive_frame()
            assert scope.cancelled_caught
        assert direct_receives == [BIG]
        async with trio.open_nursery() as nursery:
            # (Concurrently: the kernel's buffers need not hold the rest.)
            nursery.start_soon(client.send_all, frame[first:])
            assert await server.receive_frame() == body
        assert server.close_reason is None


async def test_stream_ending_inside_a_large_message(
    pair_kind: str, direct_receives: list[int]
) -> None:
    frame = trionet.Frames().encode(pattern(BIG))
    partial = frame[: 2 * DIRECT_RECEIVE_MIN + 7]
    async with open_pair(pair_kind) as (client, server):

        async def send_and_close() -> None:
            await client.send_all(partial)
            await client.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_and_close)
            with pytest.raises(IncompleteMessage) as info:
                await server.receive_frame()
        assert info.value.partial == partial
        assert info.value.reason is CloseReason.CLOSED_BY_PEER
    assert direct_receives == [BIG]


async def test_message_timeout_covers_a_large_body(
    pair_kind: str, autojump_clock: trio.testing.MockClock, direct_receives: list[int]
) -> None:
    frame = trionet.Frames().encode(pattern(BIG))
    async with open_pair(pair_kind) as (client, server):
        server.message_timeout = 3.0
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, frame[: 2 * DIRECT_RECEIVE_MIN])
            with pytest.raises(ConnectionClosed) as info:
                await server.receive_frame()
        assert info.value.reason is CloseReason.TIMEOUT
        assert trio.current_time() - start == pytest.approx(3.0, abs=0.01)
    assert direct_receives == [BIG]


async def test_memory_follows_what_arrived_not_what_was_announced() -> None:
    # A 16 MiB frame is announced but only 2 x DIRECT_RECEIVE_MIN of it
    # arrive: the receiver must not allocate anywhere near 16 MiB.
    arrived = 2 * DIRECT_RECEIVE_MIN
    left, right = trio.testing.memory_stream_pair()
    client = Connection(left)
    server = Connection(right, framing=trionet.Frames())
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.receive)
            await client.send_all((16 << 20).to_bytes(4, "big") + bytes(arrived))
            await trio.testing.wait_all_tasks_blocked()
            peak = tracemalloc.get_traced_memory()[1] - base
            nursery.cancel_scope.cancel()
    finally:
        tracemalloc.stop()
    # The sent bytes, the receive buffer, the pieces and one transient copy.
    assert peak < 6 * arrived, peak
