"""trionet.channels: wire format, delivery rules, policies, servers and clients."""

from __future__ import annotations

import contextlib
import functools
import inspect
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import trionet
import trionet.channels
import trionet.testing
from trionet import CloseReason, ConnectionClosed, ProtocolError
from trionet.channels import ChannelConnection, connect_channels, open_channel_server
from trionet.channels import _wire as wire

from .conftest import kernel_only

#: Every test here runs over the kernel and over a memory network.
pytestmark = pytest.mark.usefixtures("network")

# ------------------------------------------------------------------ helpers


@asynccontextmanager
async def memory_pair(
    **receiver_options: Any,
) -> AsyncIterator[tuple[ChannelConnection, ChannelConnection]]:
    """(sender, receiver) over trio's in-memory streams; options for the receiver."""
    async with trionet.testing.connection_pair() as (left, right):
        async with ChannelConnection(left) as sender:
            async with ChannelConnection(right, **receiver_options) as receiver:
                yield sender, receiver


@asynccontextmanager
async def raw_pair(
    **receiver_options: Any,
) -> AsyncIterator[tuple[trionet.Connection, ChannelConnection]]:
    """A plain Connection that sends raw bytes to a ChannelConnection."""
    async with trionet.testing.connection_pair() as (left, right):
        async with ChannelConnection(right, **receiver_options) as receiver:
            yield left, receiver


@asynccontextmanager
async def tcp_pair(
    **server_options: Any,
) -> AsyncIterator[tuple[ChannelConnection, ChannelConnection]]:
    """(client, server-side) ChannelConnections over loopback TCP."""
    accepted: list[ChannelConnection] = []
    arrived = trio.Event()
    done = trio.Event()

    async def handler(cc: ChannelConnection) -> None:
        accepted.append(cc)
        arrived.set()
        await done.wait()

    async with open_channel_server(handler, grace_period=0, **server_options) as srv:
        async with connect_channels("127.0.0.1", srv.port) as client:
            await arrived.wait()
            try:
                yield client, accepted[0]
            finally:
                done.set()


PAIRS = {"memory": memory_pair, "tcp": tcp_pair}


@pytest.fixture(params=sorted(PAIRS))
def open_pair(request: pytest.FixtureRequest) -> Callable[..., Any]:
    return PAIRS[str(request.param)]


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


# -------------------------------------------------------- wire format (no I/O)


def test_encode_layout_is_version_flags_length_name_data() -> None:
    assert wire.encode("a", b"xy") == b"\x01\x00\x00\x01axy"
    assert wire.encode("é", "ü") == b"\x01\x00\x00\x02\xc3\xa9\xc3\xbc"
    assert (
        wire.encode_frame("ab", b"", max_size=100)
        == b"\x00\x00\x00\x06\x01\x00\x00\x02ab"
    )
    assert wire.decode(b"\x01\x00\x00\x01axy") == ("a", b"xy")
    # the example in docs/channels.rst
    assert wire.encode_frame("a", b"xy", max_size=100) == bytes.fromhex(
        "00000007 01 00 0001 61 7879"
    )


@pytest.mark.parametrize(
    "data", [b"bytes", bytearray(b"bytes"), memoryview(b"bytes"), "bytes"]
)
def test_every_payload_type_decodes_as_bytes(data: Any) -> None:
    channel, payload = wire.decode(wire.encode("c", data))
    assert (channel, payload) == ("c", b"bytes")
    assert type(payload) is bytes


def test_channel_name_limits() -> None:
    assert wire.decode(wire.encode("n" * 255, b""))[0] == "n" * 255
    assert wire.decode(wire.encode("é" * 127, b""))[0] == "é" * 127  # 254 bytes
    with pytest.raises(ValueError, match="256 bytes"):
        wire.encode("n" * 256, b"")
    with pytest.raises(ValueError, match="256 bytes"):
        wire.encode("é" * 128, b"")
    with pytest.raises(ValueError, match="empty"):
        wire.encode("", b"")
    with pytest.raises(ValueError, match="UTF-8"):
        wire.encode("\ud800", b"")
    with pytest.raises(TypeError, match="str"):
        wire.encode(b"bytes", b"")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bytes or str"):
        wire.encode("c", 42)  # type: ignore[arg-type]


def test_encode_frame_checks_max_size_on_the_whole_payload() -> None:
    # header of channel "c" is 5 bytes; 5 + 95 == 100 fits exactly
    assert len(wire.encode_frame("c", bytes(95), max_size=100)) == 104
    with pytest.raises(trionet.MessageTooLarge, match="max_size=100"):
        wire.encode_frame("c", bytes(96), max_size=100)


MALFORMED = {
    "too short": (b"\x01\x00\x00", "shorter than the 4-byte channel header"),
    "version": (b"\x02\x00\x00\x01ax", "wire format version 2"),
    "flags": (b"\x01\x80\x00\x01ax", "flags 0x80"),
    "empty name": (b"\x01\x00\x00\x00x", "empty channel name"),
    "long name": (b"\x01\x00\x01\x00" + b"a" * 256, "length 256 is over the limit"),
    "name past end": (b"\x01\x00\x00\x05ab", "runs past the end"),
    "utf-8": (b"\x01\x00\x00\x02\xc3\x28", "not valid UTF-8"),
    "surrogate": (b"\x01\x00\x00\x03\xed\xa0\x80", "not valid UTF-8"),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_decode_names_the_fault(kind: str) -> None:
    payload, message = MALFORMED[kind]
    with pytest.raises(ProtocolError, match=message):
        wire.decode(payload)


channel_names = st.text(min_size=1, max_size=255).filter(
    lambda s: (
        1 <= len(s.encode("utf-8", "surrogatepass")) <= 255
        and not any(0xD800 <= ord(c) <= 0xDFFF for c in s)
    )
)


@given(channel=channel_names, data=st.binary(max_size=2000))
def test_round_trip(channel: str, data: bytes) -> None:
    assert wire.decode(wire.encode(channel, data)) == (channel, data)
    whole = wire.encode_frame(channel, data, max_size=10_000)
    assert int.from_bytes(whole[:4], "big") == len(whole) - 4
    assert wire.decode(whole[4:]) == (channel, data)


def decodes_or_refuses(payload: bytes) -> None:
    """The only outcomes allowed: ProtocolError, or a decode that re-encodes."""
    try:
        channel, data = wire.decode(payload)
    except ProtocolError:
        return
    assert wire.encode(channel, data) == payload


@given(channel=channel_names, data=st.binary(max_size=300), cut=st.integers(0, 600))
def test_any_truncation_refuses_or_decodes(channel: str, data: bytes, cut: int) -> None:
    payload = wire.encode(channel, data)
    cut = min(cut, len(payload))
    truncated = payload[:cut]
    decodes_or_refuses(truncated)
    header = len(wire.channel_header(channel))
    if cut < header:
        with pytest.raises(ProtocolError):
            wire.decode(truncated)
    else:
        assert wire.decode(truncated) == (channel, data[: cut - header])


@given(
    channel=channel_names,
    data=st.binary(max_size=300),
    position=st.integers(0, 10_000),
    value=st.integers(0, 255),
)
def test_any_corruption_refuses_or_decodes(
    channel: str, data: bytes, position: int, value: int
) -> None:
    payload = bytearray(wire.encode(channel, data))
    payload[position % len(payload)] = value
    decodes_or_refuses(bytes(payload))


@given(payload=st.binary(max_size=600))
def test_arbitrary_bytes_refuse_or_decode(payload: bytes) -> None:
    decodes_or_refuses(payload)


# ------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "data", [b"bytes", bytearray(b"bytes"), memoryview(b"bytes"), "bytes"]
)
async def test_publish_receive_round_trip(
    open_pair: Callable[..., Any], data: Any
) -> None:
    async with open_pair() as (a, b):
        await a.publish("test", data)
        got = await b.receive("test")
        assert got == b"bytes" and type(got) is bytes
        # and the other way
        await b.publish("reply", "é")
        assert await a.receive("reply") == "é".encode()


async def test_latest_peeks_and_never_consumes(open_pair: Callable[..., Any]) -> None:
    async with open_pair() as (a, b):
        assert b.latest("status") is None
        await a.publish("status", b"one")
        await a.publish("status", b"two")
        await a.publish("sync", b"")
        await b.receive("sync")  # both have arrived
        assert await b.receive("status") == b"one"
        assert b.latest("status") == b"two"  # the newest, though not yet taken
        assert b.latest("status") == b"two"
        assert await b.receive("status") == b"two"  # peeking took nothing
        assert b.latest("status") == b"two"  # and it survives being taken
        assert b.latest("other") is None


async def test_drain_takes_everything_buffered_in_order(
    open_pair: Callable[..., Any],
) -> None:
    async with open_pair() as (a, b):
        assert b.drain("log") == []
        for i in range(5):
            await a.publish("log", f"line {i}")
        await a.publish("sync", b"")
        await b.receive("sync")  # everything before it has arrived
        assert b.statistics("log") == trionet.channels.ChannelStatistics(
            received=5, buffered=5, buffered_bytes=5 * len(b"line 0"), dropped=0
        )
        assert b.drain("log") == [f"line {i}".encode() for i in range(5)]
        assert b.drain("log") == []
        assert b.statistics("log") == trionet.channels.ChannelStatistics(
            received=5, buffered=0, buffered_bytes=0, dropped=0
        )
        assert b.statistics() == trionet.channels.ChannelStatistics(
            received=6, buffered=0, buffered_bytes=0, dropped=0
        )


async def test_async_for_yields_everything_in_arrival_order(
    open_pair: Callable[..., Any],
) -> None:
    async with open_pair() as (a, b):
        sent = [("x", b"1"), ("y", b"2"), ("x", b"3"), ("z", b"4"), ("y", b"5")]
        for channel, data in sent:
            await a.publish(channel, data)
        got = []
        async for item in b:
            got.append(item)
            if len(got) == len(sent):
                break
        assert got == sent
        assert b.channels == ["x", "y", "z"]


async def test_async_for_ends_when_the_peer_closes_cleanly() -> None:
    async with memory_pair() as (a, b):
        await a.publish("x", b"1")
        await a.publish("y", b"2")
        await a.connection.send_eof()  # half-close: a still receives
        assert [item async for item in b] == [("x", b"1"), ("y", b"2")]
        with pytest.raises(ConnectionClosed) as info:
            await b.receive("x")
        assert info.value.reason is CloseReason.CLOSED_BY_PEER
        assert b.connection.eof_received
        assert b.close_reason is None  # only the receiving side has finished
        await b.publish("still", b"sending works after the peer's EOF")
        assert await a.receive("still") == b"sending works after the peer's EOF"


async def test_stream_ending_inside_a_frame_raises_incomplete_message() -> None:
    async with raw_pair() as (raw, cc):
        await raw.send_all(frame(wire.encode("x", b"whole"))[:-2])
        await raw.send_eof()
        with pytest.raises(trionet.IncompleteMessage):
            await cc.receive("x")
        with pytest.raises(trionet.IncompleteMessage):
            await cc.__anext__()


# ---------------------------------------------------- exactly-once delivery


async def test_each_message_goes_to_exactly_one_consumer() -> None:
    async with memory_pair() as (a, b):
        sent = [("a", b"a1"), ("b", b"b1"), ("a", b"a2"), ("c", b"c1")]
        sent += [("b", b"b2"), ("a", b"a3")]
        for channel, data in sent:
            await a.publish(channel, data)
        await a.publish("end", b"")
        await b.receive("end")
        assert await b.receive("a") == b"a1"
        assert b.drain("b") == [b"b1", b"b2"]
        rest = []
        async for item in b:
            rest.append(item)
            if len(rest) == 3:
                break
        assert rest == [("a", b"a2"), ("c", b"c1"), ("a", b"a3")]
        assert b.drain("a") == b.drain("b") == b.drain("c") == []
        assert b.latest("b") == b"b2"


async def test_the_consumer_that_waited_longest_gets_the_message() -> None:
    async with memory_pair() as (a, b):
        got: list[tuple[str, object]] = []

        async def by_channel() -> None:
            got.append(("receive", await b.receive("x")))

        async def by_any() -> None:
            got.append(("async for", await b.__anext__()))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(by_channel)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(by_any)
            await trio.testing.wait_all_tasks_blocked()
            await a.publish("x", b"1")
            await a.publish("x", b"2")
        assert got == [("receive", b"1"), ("async for", ("x", b"2"))]

        got.clear()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(by_any)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(by_channel)
            await trio.testing.wait_all_tasks_blocked()
            await a.publish("x", b"3")
            await a.publish("x", b"4")
        assert got == [("async for", ("x", b"3")), ("receive", b"4")]


async def test_a_message_for_another_channel_skips_a_channel_waiter() -> None:
    async with memory_pair() as (a, b):
        async with trio.open_nursery() as nursery:
            got = []

            async def wait_for_x() -> None:
                got.append(await b.receive("x"))

            nursery.start_soon(wait_for_x)
            await trio.testing.wait_all_tasks_blocked()
            await a.publish("y", b"for y")
            await a.publish("x", b"for x")
        assert got == [b"for x"]
        assert b.drain("y") == [b"for y"]


async def test_a_cancelled_waiter_loses_no_message() -> None:
    async with memory_pair() as (_a, b):
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def wait() -> None:
                with scope:
                    await b.receive("x")

            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()  # the waiter leaves its queue now ...
            assert b._deliver("x", b"kept")  # ... so this message is buffered
        assert scope.cancelled_caught
        assert b.drain("x") == [b"kept"]


async def test_a_message_handed_over_survives_a_later_cancel() -> None:
    async with memory_pair() as (_a, b):
        got = []
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def wait() -> None:
                with scope:
                    got.append(await b.receive("x"))

            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            assert b._deliver("x", b"mine")
            scope.cancel()
        assert got == [b"mine"]
        assert b.drain("x") == []


async def test_cancelled_waiters_leave_nothing_behind() -> None:
    async with memory_pair() as (_a, b):
        async with trio.open_nursery() as nursery:
            for i in range(100):
                nursery.start_soon(b.receive, f"channel {i}")
                nursery.start_soon(b.__anext__)
            await trio.testing.wait_all_tasks_blocked()
            assert len(b._waiters) == 100 and len(b._any_waiters) == 100
            nursery.cancel_scope.cancel()
        assert b._waiters == {} and not b._any_waiters


async def test_concurrent_consumers_share_messages_exactly_once() -> None:
    rng = random.Random(7)
    sent = [(rng.choice("abc"), f"{i}".encode()) for i in range(3000)]
    by_receive: list[tuple[str, bytes]] = []
    by_drain: list[tuple[str, bytes]] = []
    by_iteration: list[tuple[str, bytes]] = []
    async with memory_pair(channel_buffer=50) as (a, b):

        async def receiver() -> None:
            with pytest.raises(ConnectionClosed):
                while True:
                    by_receive.append(("a", await b.receive("a")))

        async def drainer() -> None:
            with pytest.raises(ConnectionClosed):
                while True:
                    by_drain.append(("b", await b.receive("b")))
                    by_drain.extend(("b", data) for data in b.drain("b"))

        async def iterator() -> None:
            async for item in b:
                by_iteration.append(item)

        async def sender() -> None:
            for channel, data in sent:
                await a.publish(channel, data)
            await a.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            nursery.start_soon(drainer)
            nursery.start_soon(iterator)
            nursery.start_soon(sender)
    everything = by_receive + by_drain + by_iteration
    assert sorted(everything) == sorted(sent)  # nothing lost, nothing twice
    assert by_iteration  # all three kinds of consumer took part
    for taken in (by_receive, by_drain, by_iteration):
        for channel in "abc":
            numbers = [int(data) for ch, data in taken if ch == channel]
            assert numbers == sorted(numbers)


async def test_stale_arrival_entries_stay_bounded() -> None:
    async with memory_pair() as (a, b):
        await a.publish("old", b"never taken by receive")
        for i in range(5000):
            await a.publish("busy", f"{i}")
            assert await b.receive("busy") == f"{i}".encode()
            assert len(b._order) <= 2 * b._buffered + 65
        assert await b.__anext__() == ("old", b"never taken by receive")
        await a.publish("busy", b"last")
        assert await b.__anext__() == ("busy", b"last")


# -------------------------------------------------------- order and sizes


async def test_three_interleaved_channels_keep_their_order() -> None:
    per_channel = 4000
    rng = random.Random(3)
    plan = [c for c in "xyz" for _ in range(per_channel)]
    rng.shuffle(plan)
    async with tcp_pair() as (client, server_side):

        async def publish() -> None:
            counters = dict.fromkeys("xyz", 0)
            for channel in plan:
                await client.publish(channel, counters[channel].to_bytes(4, "big"))
                counters[channel] += 1

        async def take(channel: str, out: list[int]) -> None:
            for _ in range(per_channel):
                out.append(int.from_bytes(await server_side.receive(channel), "big"))

        got: dict[str, list[int]] = {c: [] for c in "xyz"}
        async with trio.open_nursery() as nursery:
            for channel in "xyz":
                nursery.start_soon(take, channel, got[channel])
            nursery.start_soon(publish)
        assert got == {c: list(range(per_channel)) for c in "xyz"}

        # and in arrival order through async for
        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish)
            arrived: list[tuple[str, int]] = []
            async for channel, data in server_side:
                arrived.append((channel, int.from_bytes(data, "big")))
                if len(arrived) == len(plan):
                    break
        assert [c for c, _ in arrived] == plan
        for channel in "xyz":
            assert [n for c, n in arrived if c == channel] == list(range(per_channel))


async def test_latest_under_a_fast_publisher() -> None:
    count = 20_000
    async with tcp_pair(policy="latest", channel_buffer=16) as (client, server_side):

        async def publish() -> None:
            for i in range(count):
                await client.publish("position", i.to_bytes(4, "big"))
                if i % 500 == 499:
                    await client.publish("tick", b"")

        seen = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish)
            for _ in range(count // 500):
                await server_side.receive("tick")
                latest = server_side.latest("position")
                assert latest is not None
                seen.append(int.from_bytes(latest, "big"))
        assert seen == sorted(seen)  # never goes back
        assert seen[-1] == count - 1
        stats = server_side.statistics("position")
        assert stats.received == count
        assert stats.buffered == 16
        assert stats.dropped == server_side.dropped == count - 16
        kept = [int.from_bytes(d, "big") for d in server_side.drain("position")]
        assert kept == list(range(count - 16, count))


async def test_a_20_mb_image_travels_both_ways() -> None:
    image = random.Random(1).randbytes(20_000_000)
    received: list[bytes] = []

    async def handler(cc: ChannelConnection) -> None:
        received.append(await cc.receive("image"))
        await cc.publish("ack", f"{len(received[0])}")
        await cc.receive("bye")

    async with open_channel_server(handler) as server:
        async with connect_channels("127.0.0.1", server.port) as client:
            await client.publish("image", image)
            assert await client.receive("ack") == b"20000000"
            await server.publish("image", image[::-1])
            back = await client.receive("image")
            assert back == image[::-1]
            await client.publish("bye", b"")
    assert received == [image]


async def test_max_size_limits_both_sides() -> None:
    async with memory_pair(max_size=1000) as (a, b):
        assert b.max_size == 1000
        with pytest.raises(trionet.MessageTooLarge):
            await b.publish("c", bytes(996))
        await b.publish("c", bytes(995))  # 5 header bytes + 995 == 1000
        await a.publish("c", bytes(995))
        assert len(await b.receive("c")) == 995
        await a.publish("c", bytes(996))  # the default 64 MiB lets it go
        with pytest.raises(trionet.FrameTooLarge):
            await b.receive("c")
        assert b.close_reason is CloseReason.PROTOCOL_ERROR


# ------------------------------------------------------------ bad frames


def bad_frames(kind: str) -> list[bytes]:
    """The frames a peer sends for each kind of fault (the last one is bad)."""
    good = frame(wire.encode("x", b"good"))
    if kind == "frame too large":
        return [good, (2000).to_bytes(4, "big")]
    if kind == "too many channels":
        return [good, frame(wire.encode("y", b"")), frame(wire.encode("z", b""))]
    return [good, frame(MALFORMED[kind][0])]


BAD_KINDS = [*sorted(MALFORMED), "frame too large", "too many channels"]
EXPECTED = {
    **{kind: message for kind, (_, message) in MALFORMED.items()},
    "frame too large": "2000",
    "too many channels": "max_channels=2",
}


@pytest.mark.parametrize("mode", ["receive", "async for", "drain"])
@pytest.mark.parametrize("kind", BAD_KINDS)
async def test_a_malformed_frame_raises_protocol_error_to_the_receiver(
    kind: str, mode: str
) -> None:
    async with raw_pair(max_size=1000, max_channels=2) as (raw, cc):
        if mode == "drain":
            # Everything sent before the fault is still delivered; the next
            # receive after the drain gets the error.
            await raw.send_all(b"".join(bad_frames(kind)))
            await trio.testing.wait_all_tasks_blocked()
            assert cc.drain("x") == [b"good"]
            with pytest.raises(ProtocolError, match=EXPECTED[kind]):
                await cc.receive("x")
        else:
            *before, bad = bad_frames(kind)
            await raw.send_all(b"".join(before))
            if mode == "receive":
                assert await cc.receive("x") == b"good"
                consume: Callable[[], Any] = lambda: cc.receive("x")  # noqa: E731
            else:
                assert await cc.__anext__() == ("x", b"good")
                if kind == "too many channels":
                    assert await cc.__anext__() == ("y", b"")
                consume = cc.__anext__
            async with trio.open_nursery() as nursery:

                async def waiting_consumer() -> None:
                    with pytest.raises(ProtocolError, match=EXPECTED[kind]):
                        await consume()

                nursery.start_soon(waiting_consumer)
                await trio.testing.wait_all_tasks_blocked()
                await raw.send_all(bad)
        assert cc.close_reason is CloseReason.PROTOCOL_ERROR
        # the one good message on "y" is delivered before the error
        y_left = kind == "too many channels" and mode != "async for"
        assert cc.drain("y") == ([b""] if y_left else [])
        # every later receive says the same; drain and latest do not raise
        with pytest.raises(ProtocolError, match=EXPECTED[kind]):
            await cc.receive("other")
        with pytest.raises(ProtocolError, match=EXPECTED[kind]):
            await cc.__anext__()
        assert cc.drain("x") == []
        assert cc.latest("x") == b"good"
        # the peer sees the connection end
        with pytest.raises(ConnectionClosed):
            await raw.receive_frame()


@pytest.mark.parametrize("kind", ["utf-8", "long name", "frame too large"])
async def test_a_malformed_frame_over_tcp_closes_with_protocol_error(
    kind: str,
) -> None:
    errors: list[BaseException] = []
    reasons: list[CloseReason | None] = []

    async def handler(cc: ChannelConnection) -> None:
        try:
            async for _ in cc:
                pass
        except ProtocolError as exc:
            errors.append(exc)
            reasons.append(cc.close_reason)

    async with open_channel_server(handler, max_size=1000) as server:
        framing = trionet.Frames(max_size=1 << 20)
        async with trionet.connect_tcp(
            "127.0.0.1", server.port, framing=framing
        ) as raw:
            for data in bad_frames(kind)[:2]:
                await raw.send_all(data)
            with pytest.raises(ConnectionClosed):
                await raw.receive()
    assert len(errors) == 1
    assert EXPECTED[kind] in str(errors[0])
    assert reasons == [CloseReason.PROTOCOL_ERROR]
    assert server.statistics().closed == {CloseReason.PROTOCOL_ERROR: 1}


# --------------------------------------------------------------- policies


async def test_block_policy_stops_reading_and_loses_nothing() -> None:
    async with memory_pair(channel_buffer=2) as (a, b):
        for data in (b"a1", b"a2", b"a3"):
            await a.publish("a", data)
        await a.publish("b", b"b1")
        await trio.testing.wait_all_tasks_blocked()
        assert b.statistics("a").buffered == 2
        assert b.latest("b") is None  # the reader is held up behind "a"
        assert await b.receive("a") == b"a1"
        await trio.testing.wait_all_tasks_blocked()
        assert b.latest("b") == b"b1"
        assert b.drain("a") == [b"a2", b"a3"]
        assert b.dropped == 0


async def test_block_policy_pushes_back_on_the_sender_through_tcp() -> None:
    count = 64
    body = bytes(1 << 20)
    sent_all = trio.Event()
    async with tcp_pair(channel_buffer=2, so_rcvbuf=65536) as (client, server_side):

        async def publish() -> None:
            for i in range(count):
                await client.publish("bulk", i.to_bytes(4, "big") + body)
            sent_all.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish)
            # (On a loaded machine the kernel may hand bytes over after every
            # task looked blocked once: wait until the buffer has filled.)
            for _ in range(1000):
                await trio.testing.wait_all_tasks_blocked()
                if server_side.statistics("bulk").buffered == 2:
                    break
            # 64 MiB cannot all be in kernel buffers: the sender is waiting
            assert not sent_all.is_set()
            assert server_side.statistics("bulk").buffered == 2
            for i in range(count):
                data = await server_side.receive("bulk")
                assert int.from_bytes(data[:4], "big") == i
        assert sent_all.is_set()


async def test_latest_policy_drops_the_oldest_and_counts() -> None:
    rng = random.Random(5)
    sent = [(rng.choice("ab"), f"{i}".encode()) for i in range(200)]
    async with memory_pair(channel_buffer=3, policy="latest") as (a, b):
        for channel, data in sent:
            await a.publish(channel, data)
        await a.aclose()
        await trio.testing.wait_all_tasks_blocked()
        expected_kept = [
            (c, d) for c, d in sent if (c, d) in [x for x in sent if x[0] == c][-3:]
        ]
        assert b.latest("a") == [d for c, d in sent if c == "a"][-1]
        assert (
            await b.receive("a")
            == expected_kept[[c for c, _ in expected_kept].index("a")][1]
        )
        rest = [item async for item in b]
        first_a = expected_kept[[c for c, _ in expected_kept].index("a")]
        assert rest == [item for item in expected_kept if item != first_a]
        assert b.dropped == len(sent) - 6
        assert b.statistics("a").dropped + b.statistics("b").dropped == b.dropped


async def test_close_policy_closes_with_slow_consumer() -> None:
    async with memory_pair(channel_buffer=2, policy="close") as (a, b):
        for data in (b"1", b"2", b"3"):
            await a.publish("a", data)
        await trio.testing.wait_all_tasks_blocked()
        assert b.close_reason is CloseReason.SLOW_CONSUMER
        assert await b.receive("a") == b"1"  # what was buffered still arrives
        assert b.drain("a") == [b"2"]
        with pytest.raises(ConnectionClosed, match="slow consumer") as info:
            await b.receive("a")
        assert info.value.reason is CloseReason.SLOW_CONSUMER
        with pytest.raises(ConnectionClosed):
            await b.__anext__()
        with pytest.raises(ConnectionClosed):
            await a.receive("anything")  # the sender sees the connection end


async def test_close_policy_on_a_server_counts_slow_consumer() -> None:
    closed = trio.Event()
    reasons: list[CloseReason | None] = []

    async def handler(cc: ChannelConnection) -> None:
        with pytest.raises(ConnectionClosed):
            await cc.receive("never")

    def on_close(conn: trionet.Connection) -> None:
        reasons.append(conn.close_reason)
        closed.set()

    async with open_channel_server(
        handler, channel_buffer=4, policy="close", on_close=on_close
    ) as server:
        async with connect_channels("127.0.0.1", server.port) as client:
            for i in range(5):
                await client.publish("flood", f"{i}")
            await closed.wait()
    assert reasons == [CloseReason.SLOW_CONSUMER]


# ------------------------------------------- bytes buffered per connection


def sized(index: int, size: int) -> bytes:
    """A payload of ``size`` bytes (at least 4) that says which message it is."""
    return index.to_bytes(4, "big") + bytes(size - 4)


def model(
    policy: str, sent: list[tuple[str, bytes]], channel_buffer: int, max_bytes: int
) -> tuple[list[tuple[str, bytes]], int, bool]:
    """What a receiver that takes nothing buffers after ``sent``:
    ``(buffered, dropped, closed)``, from the documented rules alone."""
    kept: list[tuple[str, bytes]] = []
    dropped = 0
    for channel, data in sent:
        on_channel = [item for item in kept if item[0] == channel]
        used = sum(len(d) for _, d in kept)
        full = len(on_channel) >= channel_buffer or (
            kept != [] and used + len(data) > max_bytes
        )
        if full and policy in ("block", "close"):
            return kept, 0, policy == "close"
        if full:
            if len(on_channel) >= channel_buffer:
                kept.remove(on_channel[0])
                dropped += 1
            while kept and sum(len(d) for _, d in kept) + len(data) > max_bytes:
                del kept[0]
                dropped += 1
        kept.append((channel, data))
    return kept, dropped, False


@settings(max_examples=60, deadline=None)
@given(
    policy=st.sampled_from(["block", "latest", "close"]),
    shape=st.lists(st.tuples(st.sampled_from("abc"), st.integers(4, 300)), max_size=40),
    channel_buffer=st.integers(1, 6),
    max_bytes=st.integers(1, 800),
)
def test_buffers_hold_what_the_bounds_allow_and_no_more(
    policy: str,
    shape: list[tuple[str, int]],
    channel_buffer: int,
    max_bytes: int,
) -> None:
    sent = [(channel, sized(i, size)) for i, (channel, size) in enumerate(shape)]
    kept, dropped, closed = model(policy, sent, channel_buffer, max_bytes)

    async def main() -> None:
        options = {
            "policy": policy,
            "channel_buffer": channel_buffer,
            "max_buffered_bytes": max_bytes,
        }
        async with memory_pair(**options) as (a, b):
            for channel, data in sent:
                if b.close_reason is not None:
                    break  # "close" closed it: nothing more can be sent
                await a.publish(channel, data)
                await trio.testing.wait_all_tasks_blocked()
                total = b.statistics()
                # never over the bound, unless one message alone is buffered
                assert total.buffered_bytes <= max_bytes or total.buffered == 1
            total = b.statistics()
            assert total.buffered == len(kept)
            assert total.buffered_bytes == sum(len(d) for _, d in kept)
            assert total.dropped == b.dropped == dropped
            for channel in "abc":
                mine = [d for c, d in kept if c == channel]
                one = b.statistics(channel)
                assert (one.buffered, one.buffered_bytes) == (
                    len(mine),
                    sum(map(len, mine)),
                )
            assert (b.close_reason is CloseReason.SLOW_CONSUMER) is closed
            await a.aclose()
            got = []
            with contextlib.suppress(ConnectionClosed):
                async for item in b:
                    got.append(item)
            if policy == "block":
                assert got == sent  # held back, never lost
            else:
                assert got == kept

    trio.run(main)


async def test_block_at_the_byte_bound_resumes_as_bytes_are_taken() -> None:
    async with memory_pair(max_buffered_bytes=1000) as (a, b):
        sent = [("ab"[i % 2], sized(i, 300)) for i in range(10)]
        for channel, data in sent:
            await a.publish(channel, data)
        await trio.testing.wait_all_tasks_blocked()
        # three fit (900 bytes); the fourth waits in the reader
        assert b.statistics() == trionet.channels.ChannelStatistics(
            received=3, buffered=3, buffered_bytes=900, dropped=0
        )
        assert b.statistics("a").buffered_bytes == 600
        assert await b.receive("b") == sent[1][1]  # frees 300: one more fits
        await trio.testing.wait_all_tasks_blocked()
        assert b.statistics().buffered_bytes == 900
        assert b.statistics().received == 4
        assert b.drain("a") == [sent[0][1], sent[2][1]]  # "a4" is still held
        await trio.testing.wait_all_tasks_blocked()
        assert b.statistics().buffered_bytes == 900
        rest = [await b.__anext__() for _ in range(7)]
        assert rest == sent[3:]
        assert b.dropped == 0
        assert b.statistics().buffered_bytes == 0


async def test_block_admits_a_message_over_the_bound_when_nothing_is_buffered() -> None:
    async with memory_pair(max_buffered_bytes=100) as (a, b):
        await a.publish("big", sized(0, 500))
        await a.publish("small", sized(1, 10))
        await trio.testing.wait_all_tasks_blocked()
        assert b.statistics().buffered_bytes == 500  # admitted, alone
        assert b.latest("small") is None  # the next one waits for it
        assert await b.receive("big") == sized(0, 500)
        await trio.testing.wait_all_tasks_blocked()
        assert b.drain("small") == [sized(1, 10)]
        await a.publish("big", sized(2, 500))  # and again, nothing buffered
        assert await b.receive("big") == sized(2, 500)


async def test_block_hands_the_held_message_to_a_consumer_that_starts_waiting() -> None:
    async with memory_pair(max_buffered_bytes=100) as (a, b):
        await a.publish("unread", sized(0, 80))
        await a.publish("wanted", sized(1, 50))  # does not fit beside "unread"
        await trio.testing.wait_all_tasks_blocked()
        assert b.statistics("wanted").received == 0
        with trio.fail_after(10):  # a guard against a hang, not a timing
            assert await b.receive("wanted") == sized(1, 50)
        assert b.statistics().buffered_bytes == 80


async def test_a_reader_blocked_on_bytes_ends_with_the_connection() -> None:
    async with memory_pair(max_buffered_bytes=100) as (a, b):
        await a.publish("x", sized(0, 80))
        await a.publish("x", sized(1, 80))
        await trio.testing.wait_all_tasks_blocked()
        async with trio.open_nursery() as nursery:

            async def wait_on_another_channel() -> None:
                with pytest.raises(ConnectionClosed):
                    await b.receive("other")

            nursery.start_soon(wait_on_another_channel)
            await trio.testing.wait_all_tasks_blocked()
            await b.aclose()
        assert b.close_reason is CloseReason.CLOSED_BY_HOST
        assert b.drain("x") == [sized(0, 80)]  # what was buffered stays readable


async def test_close_policy_at_the_byte_bound_says_which_bound() -> None:
    async with memory_pair(max_buffered_bytes=100, policy="close") as (a, b):
        await a.publish("x", sized(0, 60))
        await a.publish("y", sized(1, 60))
        await trio.testing.wait_all_tasks_blocked()
        assert b.close_reason is CloseReason.SLOW_CONSUMER
        assert b.drain("x") == [sized(0, 60)]
        with pytest.raises(ConnectionClosed, match="max_buffered_bytes=100") as info:
            await b.receive("y")
        assert info.value.reason is CloseReason.SLOW_CONSUMER
        assert "60 bytes are unread" in str(info.value)


async def test_latest_policy_at_the_byte_bound_drops_the_oldest_of_any_channel() -> (
    None
):
    async with memory_pair(max_buffered_bytes=1000, policy="latest") as (a, b):
        sent = [("abc"[i % 3], sized(i, 100)) for i in range(30)]
        for channel, data in sent:
            await a.publish(channel, data)
        await a.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert b.dropped == 20
        assert sum(b.statistics(c).dropped for c in "abc") == 20
        assert b.latest("a") == sent[27][1]
        assert [item async for item in b] == sent[20:]


@asynccontextmanager
async def flood_server(
    **options: Any,
) -> AsyncIterator[tuple[trionet.channels.ChannelServer, list[ChannelConnection]]]:
    """A server whose handler answers "rpc" requests and never reads the
    other channels; yields it and the list of its ChannelConnections."""
    accepted: list[ChannelConnection] = []

    async def handler(cc: ChannelConnection) -> None:
        accepted.append(cc)
        while True:
            request = await cc.receive("rpc")
            await cc.publish("rpc", request.upper())

    async with open_channel_server(handler, grace_period=0, **options) as server:
        yield server, accepted


async def test_a_flooding_client_is_held_back_and_the_server_serves_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bound = 1 << 20
    size = 256 * 1024
    count = 128  # 32 MiB: more than every kernel buffer on the way
    peak = 0
    deliver = ChannelConnection._deliver

    def watched(self: ChannelConnection, name: str, data: bytes) -> bool:
        nonlocal peak
        delivered = deliver(self, name, data)
        peak = max(peak, self.statistics().buffered_bytes)
        return delivered

    monkeypatch.setattr(ChannelConnection, "_deliver", watched)
    published = 0
    async with flood_server(max_buffered_bytes=bound) as (server, accepted):
        async with connect_channels("127.0.0.1", server.port) as flooder:
            await flooder.publish("rpc", b"hello")
            assert await flooder.receive("rpc") == b"HELLO"
            (flooded,) = accepted

            async def flood() -> None:
                nonlocal published
                for i in range(count):
                    await flooder.publish(f"bulk{i % 8}", sized(i, size))
                    published += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood)
                await trio.testing.wait_all_tasks_blocked()
                assert published < count  # its publishes wait: TCP backpressure
                assert flooded.statistics().buffered_bytes <= bound
                async with connect_channels("127.0.0.1", server.port) as other:
                    for i in range(20):
                        await other.publish("rpc", f"request {i}")
                        assert await other.receive("rpc") == f"REQUEST {i}".encode()
                        assert published < count  # still held back
                # the handler starts reading: everything arrives, in order
                got = [await flooded.__anext__() for _ in range(count)]
            assert published == count
    assert got == [(f"bulk{i % 8}", sized(i, size)) for i in range(count)]
    assert peak <= bound


async def test_close_policy_at_the_byte_bound_evicts_only_the_flooder() -> None:
    async with flood_server(max_buffered_bytes=1 << 20, policy="close") as (
        server,
        accepted,
    ):
        async with connect_channels("127.0.0.1", server.port) as flooder:
            await flooder.publish("rpc", b"hello")
            await flooder.receive("rpc")
            with pytest.raises(ConnectionClosed):
                for i in range(64):  # 16 MiB, far past the bound
                    await flooder.publish(f"bulk{i % 8}", sized(i, 256 * 1024))
                with trio.fail_after(10):  # a guard against a hang
                    await flooder.receive("never")
            async with connect_channels("127.0.0.1", server.port) as other:
                await other.publish("rpc", b"still there?")
                assert await other.receive("rpc") == b"STILL THERE?"
            assert accepted[0].close_reason is CloseReason.SLOW_CONSUMER
            assert accepted[0].statistics().buffered_bytes <= 1 << 20
        closed = server.statistics().closed
        assert closed[CloseReason.SLOW_CONSUMER] == 1


async def test_latest_policy_at_the_byte_bound_over_tcp_keeps_the_newest() -> None:
    kept: list[tuple[str, bytes]] = []

    async def handler(cc: ChannelConnection) -> None:
        await cc.receive("done")  # every message before it went through
        total = cc.statistics()
        assert total.buffered_bytes <= 1 << 20
        kept.extend([await cc.__anext__() for _ in range(total.buffered)])
        await cc.publish("done", str(total.dropped))

    size = 256 * 1024
    sent = [(f"bulk{i % 8}", sized(i, size)) for i in range(40)]
    async with open_channel_server(
        handler, max_buffered_bytes=1 << 20, policy="latest"
    ) as server:
        async with connect_channels("127.0.0.1", server.port) as client:
            for channel, data in sent:
                await client.publish(channel, data)
            await client.publish("done", b"")
            assert await client.receive("done") == b"36"
    assert kept == sent[-4:]


# ------------------------------------------------------- server and client


async def test_server_publish_reaches_100_clients() -> None:
    clients_n = 100
    all_in = trio.Event()
    heard: list[bytes] = []

    async def handler(cc: ChannelConnection) -> None:
        heard.append(await cc.receive("hello"))
        if len(heard) == clients_n:
            all_in.set()
        await cc.receive("bye")

    async with open_channel_server(handler) as server:
        async with AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(
                    connect_channels("127.0.0.1", server.port)
                )
                for _ in range(clients_n)
            ]
            for i, client in enumerate(clients):
                await client.publish("hello", f"{i}")
            await all_in.wait()
            assert len(server.clients) == clients_n
            assert all(isinstance(c, ChannelConnection) for c in server.clients)
            await server.publish("news", "for everyone")
            await server.publish("image", bytes(100_000))
            for client in clients:
                assert await client.receive("news") == b"for everyone"
                assert await client.receive("image") == bytes(100_000)
                await client.publish("bye", b"")
    assert sorted(heard) == sorted(f"{i}".encode() for i in range(clients_n))
    assert server.statistics().accepted == clients_n
    assert server.clients == []


async def test_server_clients_lists_open_connections_only() -> None:
    left = trio.Event()

    async def handler(cc: ChannelConnection) -> None:
        async for _ in cc:
            pass
        left.set()

    async with open_channel_server(handler) as server:
        assert server.clients == []
        assert server.addresses[0][1] == server.port
        async with connect_channels("127.0.0.1", server.port) as client:
            await client.publish("hello", b"")
            await trio.testing.wait_all_tasks_blocked()
            (cc,) = server.clients
            assert cc.connection.remote_address == client.connection.local_address
        await left.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert server.clients == []
        assert server.statistics().closed == {CloseReason.CLOSED_BY_PEER: 1}


async def test_server_publish_closes_a_slow_client_only() -> None:
    closed = trio.Event()
    reasons: list[CloseReason | None] = []

    async def handler(cc: ChannelConnection) -> None:
        with pytest.raises(ConnectionClosed):
            await cc.receive("never")

    def on_close(conn: trionet.Connection) -> None:
        reasons.append(conn.close_reason)
        closed.set()

    big = bytes(1 << 20)
    async with open_channel_server(
        handler, send_queue_size=4, so_sndbuf=65536, on_close=on_close
    ) as server:
        # The client buffers one message and then stops reading the socket.
        async with connect_channels(
            "127.0.0.1", server.port, channel_buffer=1
        ) as client:
            await client.publish("hello", b"")
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(500):
                if closed.is_set():
                    break
                await server.publish("bulk", big)  # never waits
            assert reasons == [CloseReason.SLOW_CONSUMER]


async def test_serve_channels_with_nursery_start() -> None:
    async def handler(cc: ChannelConnection) -> None:
        async for channel, data in cc:
            await cc.publish(channel, data.upper())

    async with trio.open_nursery() as nursery:
        server = await nursery.start(trionet.channels.serve_channels, handler, 0)
        assert isinstance(server, trionet.channels.ChannelServer)
        assert isinstance(server.tcp_server, trionet.Server)
        async with connect_channels("127.0.0.1", server.port) as client:
            await client.publish("shout", "hello")
            assert await client.receive("shout") == b"HELLO"
        await server.aclose()


@kernel_only
async def test_serve_channels_reports_a_failure_to_start_as_itself() -> None:
    # serve_channels runs serve_tcp in its own task, with no nursery between
    # them to wrap what serve_tcp raises before it started.
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with trio.open_nursery() as nursery:
            with pytest.raises(OSError):
                await nursery.start(
                    functools.partial(
                        trionet.channels.serve_channels,
                        ChannelConnection.aclose,
                        port,
                        host="127.0.0.1",
                    )
                )


async def test_channel_server_counts_like_a_tcp_server() -> None:
    async def handler(cc: ChannelConnection) -> None:
        await cc.receive("go")
        raise KeyError("from the handler")

    async with open_channel_server(handler) as server:
        async with connect_channels("127.0.0.1", server.port) as client:
            await client.publish("go", b"")
            with pytest.raises(ConnectionClosed):
                await client.receive("anything")
        statistics = server.statistics()
        assert statistics.accepted == 1
        assert statistics.closed == {CloseReason.ERROR: 1}
        assert [type(e) for e in server.handler_exceptions] == [KeyError]
    assert not hasattr(server, "stats")
    assert not hasattr(server, "handler_errors")


async def test_handler_exceptions_are_not_wrapped() -> None:
    done = trio.Event()

    async def handler(cc: ChannelConnection) -> None:
        await cc.receive("go")
        done.set()
        raise KeyError("from the handler")

    async with open_channel_server(handler) as server:
        async with connect_channels("127.0.0.1", server.port) as client:
            await client.publish("go", b"")
            await done.wait()
            with pytest.raises(ConnectionClosed):
                await client.receive("anything")
        (error,) = server.handler_exceptions
        assert type(error) is KeyError


async def test_block_exceptions_reach_the_caller_as_themselves() -> None:
    async def handler(cc: ChannelConnection) -> None:
        await cc.receive("never")

    with pytest.raises(ValueError, match="from the client block"):
        async with open_channel_server(handler, grace_period=0) as server:
            async with connect_channels("127.0.0.1", server.port):
                raise ValueError("from the client block")
    with pytest.raises(ValueError, match="from the memory block"):
        async with memory_pair():
            raise ValueError("from the memory block")


async def test_aclose_wakes_waiting_consumers() -> None:
    async with memory_pair() as (_a, b):
        async with trio.open_nursery() as nursery:

            async def wait() -> None:
                with pytest.raises(ConnectionClosed) as info:
                    await b.receive("x")
                assert info.value.reason is CloseReason.CLOSED_BY_HOST

            async def iterate() -> None:
                with pytest.raises(ConnectionClosed):
                    await b.__anext__()

            nursery.start_soon(wait)
            nursery.start_soon(iterate)
            await trio.testing.wait_all_tasks_blocked()
            await b.aclose()
        assert b.close_reason is CloseReason.CLOSED_BY_HOST
        with pytest.raises(ConnectionClosed):
            await b.publish("x", b"")


async def test_connect_channels_reports_connect_errors() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with pytest.raises(trionet.ConnectError):
            async with connect_channels("127.0.0.1", port):
                pass  # pragma: no cover


async def test_without_a_reader_receiving_is_an_error() -> None:
    async with trionet.testing.connection_pair() as (left, right):
        cc = ChannelConnection(left)
        await cc.publish("x", b"publishing needs no reader")
        with pytest.raises(RuntimeError, match="no reader task"):
            await cc.receive("x")
        async with cc:
            with pytest.raises(RuntimeError, match="already running"):
                async with cc:
                    pass  # pragma: no cover
        other = ChannelConnection(right)
        async with other:
            assert await other.receive("x") == b"publishing needs no reader"


@pytest.mark.parametrize(
    "options",
    [
        {"policy": "sometimes"},
        {"channel_buffer": 0},
        {"max_buffered_bytes": 0},
        {"max_buffered_bytes": -1},
        {"max_channels": 0},
        {"max_size": 4},
        {"max_size": 1 << 32},
    ],
)
async def test_options_are_validated(options: dict[str, Any]) -> None:
    async with trionet.testing.connection_pair() as (left, _right):
        with pytest.raises(ValueError):
            ChannelConnection(left, **options)
        with pytest.raises(ValueError):
            async with open_channel_server(ChannelConnection.aclose, **options):
                pass  # pragma: no cover


async def test_max_buffered_bytes_must_be_an_int() -> None:
    async with trionet.testing.connection_pair() as (left, _right):
        with pytest.raises(TypeError, match="max_buffered_bytes must be an int"):
            ChannelConnection(left, max_buffered_bytes=1.5)  # type: ignore[arg-type]
        cc = ChannelConnection(left)
        assert cc.max_buffered_bytes == 16 * 1024 * 1024  # the documented default
        assert cc.policy == "block"


async def test_invalid_channel_names_are_refused_everywhere() -> None:
    async with memory_pair() as (a, b):
        for bad in ("", "n" * 256):
            with pytest.raises(ValueError):
                await a.publish(bad, b"")
            with pytest.raises(ValueError):
                await b.receive(bad)
            with pytest.raises(ValueError):
                b.drain(bad)
            with pytest.raises(ValueError):
                b.latest(bad)


# ----------------------------------------------------------- public surface

PUBLIC = {
    "BackplaneStatistics",
    "ChannelConnection",
    "ChannelServer",
    "ChannelStatistics",
    "MAX_NAME_LENGTH",
    "Policy",
    "RedisBackplane",
    "VERSION",
    "connect_channels",
    "connect_unix_channels",
    "open_channel_server",
    "open_unix_channel_server",
    "serve_channels",
    "serve_unix_channels",
}


def test_channels_exports_exactly_the_public_api() -> None:
    names = {
        name
        for name in vars(trionet.channels)
        if not name.startswith("_")
        and not inspect.ismodule(getattr(trionet.channels, name))
    }
    assert names == PUBLIC
    for name in PUBLIC - {"Policy", "MAX_NAME_LENGTH", "VERSION"}:
        obj = getattr(trionet.channels, name)
        assert obj.__module__ == "trionet.channels", name
        assert obj.__doc__ and "versionadded" in obj.__doc__, name
    assert trionet.channels.VERSION == 1
    assert trionet.channels.MAX_NAME_LENGTH == 255


def test_example_runs_its_selftest() -> None:
    example = Path(__file__).parent.parent / "examples" / "engine_host_client.py"
    result = subprocess.run(
        [sys.executable, str(example), "--selftest"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "selftest passed" in result.stdout
    assert result.stdout.count("status b'server is ready'") == 3
