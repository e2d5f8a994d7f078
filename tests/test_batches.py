"""The batch API: receive_batch / batches() and send_many.

What a batch holds (every whole message received, no more), mixing with the
other receive modes, ends and errors, cancellation; send_many's encoding (the
same bytes and checks as one send per message), its all-or-nothing
acceptance under the queue bounds in messages and bytes, its order with
corked and concurrent sends, and batches over TLS.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

import trionet
from trionet import (
    CloseReason,
    ConnectionClosed,
    IncompleteMessage,
    LineTooLong,
    MessageTooLarge,
)
from trionet._connection import Connection, _encode_many
from trionet._sending import QueuedSendPath, SendLimits
from trionet._transport import StreamTransport

from .conftest import open_pair, tls_client_of

LINES = trionet.Lines()
FRAMES = trionet.Frames()


@asynccontextmanager
async def limited_pair(
    framing: trionet.Framing | None, limits: SendLimits
) -> AsyncIterator[tuple[Connection, Connection]]:
    """(reader, queued sender) over a lockstep stream: the sender's writer
    moves only while the reader reads."""
    left, right = trio.testing.lockstep_stream_pair()
    reader = Connection(left, framing=framing)
    async with trio.open_nursery() as nursery:
        sender = Connection._over(
            StreamTransport(right), framing, QueuedSendPath(nursery, limits)
        )
        try:
            yield reader, sender
        finally:
            await reader.aclose()
            await sender.aclose()


# --------------------------------------------------------------- receiving


async def test_a_batch_is_every_whole_message_received(pair_kind: str) -> None:
    async with open_pair(pair_kind, framing=LINES) as (client, server):
        await client.send_all(b"one\ntwo\nthree\nfou")
        batch: list[bytes] = []
        while len(batch) < 3:
            batch += await server.receive_batch()
        assert batch == [b"one", b"two", b"three"]
        # The partial line waits for the rest.
        await client.send_all(b"r\nfive\n")
        batch = []
        while len(batch) < 2:
            batch += await server.receive_batch()
        assert batch == [b"four", b"five"]


async def test_a_batch_holds_what_arrived_and_no_more() -> None:
    async with trionet.testing.connection_pair(LINES) as (client, server):
        for count in (1, 7, 3):
            await client.send_all(b"".join(b"m%d\n" % i for i in range(count)))
            assert await server.receive_batch() == [b"m%d" % i for i in range(count)]


async def test_batches_mix_with_every_other_mode(pair_kind: str) -> None:
    async with open_pair(pair_kind, framing=LINES) as (client, server):
        await client.send_all(b"a\nb\nc\nd\n")
        assert await server.receive() == b"a"  # (cuts b, c, d at once)
        assert await server.receive_batch() == [b"b", b"c", b"d"]
        await client.send_all(b"e\nf\nRAW")
        assert await server.receive() == b"e"
        assert await server.receive_line() == b"f"
        assert await server.receive_exactly(3) == b"RAW"
        await client.send_all(b"g\n")
        assert await server.receive_batch() == [b"g"]


async def test_messages_before_a_bad_one_come_first(pair_kind: str) -> None:
    async with open_pair(pair_kind, framing=trionet.Lines(max_length=5)) as (
        client,
        server,
    ):
        await client.send_all(b"ok\nfine\n" + b"x" * 20 + b"\n")
        batch: list[bytes] = []
        while len(batch) < 2:
            batch += await server.receive_batch()
        assert batch == [b"ok", b"fine"]
        with pytest.raises(LineTooLong):
            await server.receive_batch()
        assert server.close_reason is CloseReason.PROTOCOL_ERROR


async def test_batches_end_when_the_peer_closes_between_messages() -> None:
    async with trionet.testing.connection_pair(FRAMES) as (client, server):
        await client.send_many([b"1", b"2", b"3"])
        await client.send_eof()
        seen = [batch async for batch in server.batches()]
        assert [m for batch in seen for m in batch] == [b"1", b"2", b"3"]
        assert server.eof_received


async def test_batches_raise_when_the_stream_ends_inside_a_message() -> None:
    async with trionet.testing.connection_pair(FRAMES) as (client, server):
        await client.send_all(FRAMES.encode(b"whole") + FRAMES.encode(b"cut")[:-1])
        await client.send_eof()
        seen: list[bytes] = []
        with pytest.raises(IncompleteMessage) as info:
            async for batch in server.batches():
                seen += batch
        assert seen == [b"whole"]
        assert info.value.partial == FRAMES.encode(b"cut")[:-1]


async def test_batches_of_raw_bytes_are_chunks() -> None:
    async with trionet.testing.connection_pair(None) as (client, server):
        await client.send_all(b"some bytes")
        assert await server.receive_batch() == [b"some bytes"]
        await client.send_eof()
        with pytest.raises(ConnectionClosed) as info:
            await server.receive_batch()
        assert info.value.reason is CloseReason.CLOSED_BY_PEER


async def test_a_large_frame_is_a_batch_of_its_own(pair_kind: str) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB: received outside the buffer
    async with open_pair(pair_kind, framing=FRAMES) as (client, server):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_many, [payload, b"after"])
            batch = await server.receive_batch()
            while len(batch) < 2:
                batch += await server.receive_batch()
        assert batch == [payload, b"after"]


async def cancelled_while_waiting(
    nursery: trio.Nursery, call: Callable[[], Awaitable[object]]
) -> bool:
    """Run ``call`` in a task, cancel it once everything is blocked; return
    whether it was still waiting then (the cancellation caught it)."""
    caught: list[bool] = []

    async def run(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            await call()
        caught.append(scope.cancelled_caught)

    scope = await nursery.start(run)
    await trio.testing.wait_all_tasks_blocked()
    scope.cancel()
    await trio.testing.wait_all_tasks_blocked()
    return caught == [True]


async def test_a_cancelled_batch_receive_loses_nothing(pair_kind: str) -> None:
    async with open_pair(pair_kind, framing=LINES) as (client, server):
        with trio.CancelScope() as scope:
            scope.cancel()
            await server.receive_batch()
        async with trio.open_nursery() as nursery:
            assert await cancelled_while_waiting(nursery, server.receive_batch)
        await client.send_all(b"still\nhere\n")
        batch: list[bytes] = []
        while len(batch) < 2:
            batch += await server.receive_batch()
        assert batch == [b"still", b"here"]


# ---------------------------------------------------------------- encoding

payloads = st.lists(st.binary(max_size=40), max_size=20)


@given(
    messages=payloads,
    delimiter=st.sampled_from([b"\n", b"\r\n", b"||", b"\n\n", b"abab"]),
)
def test_send_many_encodes_as_one_send_per_message(
    messages: list[bytes], delimiter: bytes
) -> None:
    framing = trionet.Lines(delimiter=delimiter, max_length=30)
    try:
        expected: bytes | type[Exception] = b"".join(map(framing.encode, messages))
    except (ValueError, MessageTooLarge) as exc:
        expected = type(exc)
    try:
        got: bytes | type[Exception] = _encode_many(framing, messages)[0]
    except (ValueError, MessageTooLarge) as exc:
        got = type(exc)
    assert got == expected
    if isinstance(got, bytes):
        decoder = trionet.Decoder(framing)
        decoder.feed(got)
        assert decoder.messages() == messages


@given(messages=payloads, header_size=st.sampled_from([1, 2, 4, 8]))
def test_send_many_encodes_frames_as_one_send_per_message(
    messages: list[bytes], header_size: int
) -> None:
    framing = trionet.Frames(max_size=30, header_size=header_size)
    try:
        expected: bytes | type[Exception] = b"".join(map(framing.encode, messages))
    except MessageTooLarge:
        expected = MessageTooLarge
    try:
        got: bytes | type[Exception] = _encode_many(framing, messages)[0]
    except MessageTooLarge:
        got = MessageTooLarge
    assert got == expected


async def test_send_many_refuses_a_bad_message_and_sends_nothing(
    pair_kind: str,
) -> None:
    async with open_pair(pair_kind, framing=trionet.Lines(max_length=8)) as (
        client,
        server,
    ):
        with pytest.raises(ValueError, match="delimiter"):
            await server.send_many([b"good", b"bad\nline", b"good"])
        with pytest.raises(MessageTooLarge):
            await server.send_many(["fine", "far too long"])
        with pytest.raises(TypeError):
            await server.send_many([b"fine", 42])  # type: ignore[list-item]
        await server.send_many(["only", "these"])
        assert await client.receive_batch() == [b"only", b"these"]


async def test_send_many_accepts_str_bytearray_and_memoryview(
    pair_kind: str,
) -> None:
    async with open_pair(pair_kind, framing=FRAMES) as (client, server):
        await server.send_many(["é", bytearray(b"ba"), memoryview(b"mv"), b""])
        got: list[bytes] = []
        while len(got) < 4:
            got += await client.receive_batch()
        assert got == ["é".encode(), b"ba", b"mv", b""]


# ---------------------------------------------------------- accepting sends


async def test_a_batch_counts_as_its_messages_and_waits_whole() -> None:
    limits = SendLimits(queue_size=12)
    async with limited_pair(LINES, limits) as (reader, sender):
        await sender.send_many([b"a%d" % i for i in range(7)])
        # The writer is stuck until the reader reads.  Under the bound, a
        # batch is accepted whole, even if that goes over it.
        await trio.testing.wait_all_tasks_blocked()
        await sender.send_many([b"a%d" % i for i in range(7, 10)])
        assert sender.statistics().queued_messages == 10
        await sender.send_many([b"a10", b"a11", b"a12"])
        assert sender.statistics().queued_messages == 13
        async with trio.open_nursery() as nursery:
            # Waits for room, and is cancelled there.
            assert await cancelled_while_waiting(
                nursery, partial(sender.send_many, [b"never", b"sent"])
            )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender.send_many, [b"b0", b"b1"])
            got: list[bytes] = []
            while len(got) < 15:
                got += await reader.receive_batch()
        # The cancelled batch left nothing behind; the next went whole.
        assert got == [b"a%d" % i for i in range(13)] + [b"b0", b"b1"]


async def test_a_client_send_many_cancelled_part_way_ends_the_stream() -> None:
    """A client's send_many cancelled while the kernel takes its bytes:
    the connection closes (ERROR) and the stream ends there, so the peer
    gets a prefix of the batch, each message whole, and then the end --
    never half a message followed by anything else."""
    lines = [b"%05d" % i + b"x" * 995 for i in range(2000)]  # about 2 MB
    async with open_pair("tcp", framing=LINES) as (client, server):
        # Small kernel buffers both ways: 2 MB cannot fit in them.
        for conn, option in ((client, socket.SO_SNDBUF), (server, socket.SO_RCVBUF)):
            sock = conn._transport.fast_socket
            assert sock is not None
            sock.setsockopt(socket.SOL_SOCKET, option, 16 * 1024)
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send_many, lines)
                # The server reads nothing yet: the kernel fills up and the
                # send waits for room part way through the batch.
                await trio.testing.wait_all_tasks_blocked()
                assert client._lock().locked()  # the send is under way
                scope.cancel()
        assert client.close_reason is CloseReason.ERROR
        with pytest.raises(ConnectionClosed):
            await client.send("after")
        got: list[bytes] = []
        with pytest.raises(ConnectionClosed) as info:
            while True:
                got += await server.receive_batch()
        # The cut message (if any) is reported as such, never delivered.
        assert isinstance(info.value, IncompleteMessage) or (
            info.value.reason is CloseReason.CLOSED_BY_PEER
        )
        assert 0 < len(got) < len(lines)
        assert got == lines[: len(got)]


async def test_a_batch_waits_for_the_byte_bound_too() -> None:
    limits = SendLimits(queue_bytes=1000)
    async with limited_pair(FRAMES, limits) as (reader, sender):
        await sender.send_many([b"x" * 600, b"y" * 600])
        await trio.testing.wait_all_tasks_blocked()
        assert sender.statistics().queued_bytes == 2 * 604
        accepted = trio.Event()

        async def second() -> None:
            await sender.send_many([b"z"])
            accepted.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            assert not accepted.is_set()  # over the byte bound: waiting
            got: list[bytes] = []
            while len(got) < 3:
                got += await reader.receive_batch()
        assert accepted.is_set()
        assert got == [b"x" * 600, b"y" * 600, b"z"]


async def test_a_batch_waiting_for_room_times_out_with_idle_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with limited_pair(LINES, SendLimits(queue_size=1)) as (_reader, sender):
        sender.idle_timeout = 5
        await sender.send_many([b"first"])
        with pytest.raises(ConnectionClosed) as info:
            await sender.send_many([b"second"])
        assert info.value.reason is CloseReason.TIMEOUT


async def test_send_many_on_a_closed_or_finished_connection(pair_kind: str) -> None:
    async with open_pair(pair_kind, framing=LINES) as (client, server):
        await client.send_eof()
        with pytest.raises(ConnectionClosed, match="finished sending"):
            await client.send_many([b"late"])
        await server.aclose()
        with pytest.raises(ConnectionClosed):
            await server.send_many([b"late"])


async def test_corked_replies_go_before_a_batch(pair_kind: str) -> None:
    async with open_pair(pair_kind, framing=LINES) as (client, server):
        await client.send_all(b"q1\nq2\n")
        assert await server.receive() == b"q1"
        await server.send("single")  # corked: q2 is already buffered
        await server.send_many(["batch1", "batch2"])
        got: list[bytes] = []
        while len(got) < 3:
            got += await client.receive_batch()
        assert got == [b"single", b"batch1", b"batch2"]


async def test_concurrent_batches_never_interleave(pair_kind: str) -> None:
    async with open_pair(pair_kind, framing=LINES) as (client, server):
        batches = {
            tag: [f"{tag}{i:04d}" for i in range(500)] for tag in ("a", "b", "c")
        }
        async with trio.open_nursery() as nursery:
            for batch in batches.values():
                nursery.start_soon(client.send_many, batch)
            got: list[bytes] = []
            while len(got) < 1500:
                got += await server.receive_batch()
        runs = [got[i : i + 500] for i in range(0, 1500, 500)]
        assert sorted(runs) == sorted(
            [m.encode() for m in batch] for batch in batches.values()
        )


async def test_a_batch_echo_over_tls(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    async def echo(conn: trionet.Connection) -> None:
        async for batch in conn.batches():
            await conn.send_many(batch)

    lines = [b"line %05d" % i for i in range(5000)]
    async with tls_client_of(echo, server_context, client_context, LINES) as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_many, lines)
            got: list[bytes] = []
            while len(got) < len(lines):
                got += await client.receive_batch()
    assert got == lines
