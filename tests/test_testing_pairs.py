"""trionet.testing.connection_pair: two Connections over in-memory streams."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

import trionet
from trionet import CloseReason, ConnectionClosed
from trionet.testing import ChunkedStream, ResetAfter, StallAfter, connection_pair

FRAMINGS = [None, trionet.Lines(), trionet.Frames(max_size=1000, header_size=2)]
#: (queued, lockstep) for every kind of pair.
KINDS = list(itertools.product([False, True], [False, True]))
KIND_IDS = [f"queued={q}-lockstep={s}" for q, s in KINDS]


async def exchange(
    sender: trionet.Connection, receiver: trionet.Connection, message: bytes
) -> bytes:
    """Send and receive concurrently (lockstep sends wait for the receiver)."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.send, message)
        with trio.fail_after(5):
            return await receiver.receive()


@pytest.mark.parametrize(("queued", "lockstep"), KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("framing", FRAMINGS, ids=repr)
async def test_both_directions(
    framing: trionet.Framing | None, queued: bool, lockstep: bool
) -> None:
    async with connection_pair(framing, queued=queued, lockstep=lockstep) as (a, b):
        assert a.framing is framing
        assert b.framing is framing
        assert a.remote_address is None
        assert await exchange(a, b, b"from a") == b"from a"
        assert await exchange(b, a, b"from b") == b"from b"


@pytest.mark.parametrize("queued", [False, True])
async def test_framing_is_used_on_the_wire(queued: bool) -> None:
    framing = trionet.Frames(max_size=1000, header_size=2)
    async with connection_pair(framing, queued=queued) as (a, b):
        await b.send(b"abc")
        await a.send(b"xyz")
        assert await a.receive_exactly(5) == b"\x00\x03abc"
        assert await b.receive_exactly(5) == b"\x00\x03xyz"
    async with connection_pair(trionet.Lines(delimiter=b"\r\n")) as (a, b):
        await a.send("one")
        await a.send("two")
        assert await b.receive_exactly(10) == b"one\r\ntwo\r\n"


@pytest.mark.parametrize(("queued", "lockstep"), KINDS, ids=KIND_IDS)
async def test_body_exception_reaches_the_caller_as_itself(
    queued: bool, lockstep: bool
) -> None:
    error = ValueError("from the body")
    with pytest.raises(ValueError) as caught:
        async with connection_pair(queued=queued, lockstep=lockstep):
            raise error
    assert caught.value is error


async def test_body_exception_keeps_its_cause() -> None:
    cause = KeyError("cause")
    with pytest.raises(RuntimeError) as caught:
        async with connection_pair(queued=True):
            raise RuntimeError("effect") from cause
    assert caught.value.__cause__ is cause


@pytest.mark.parametrize(("queued", "lockstep"), KINDS, ids=KIND_IDS)
async def test_both_sides_closed_at_exit(queued: bool, lockstep: bool) -> None:
    async with connection_pair(queued=queued, lockstep=lockstep) as (a, b):
        assert (a.close_reason, b.close_reason) == (None, None)
    assert a.close_reason is CloseReason.CLOSED_BY_HOST
    assert b.close_reason is CloseReason.CLOSED_BY_HOST
    for conn in (a, b):
        with pytest.raises(ConnectionClosed):
            await conn.send(b"late")


@pytest.mark.parametrize(("queued", "lockstep"), KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("closing", ["first", "second"])
async def test_close_reasons(closing: str, queued: bool, lockstep: bool) -> None:
    async with connection_pair(
        trionet.Lines(), queued=queued, lockstep=lockstep
    ) as pair:
        closer, other = pair if closing == "first" else pair[::-1]
        await closer.aclose()
        assert closer.close_reason is CloseReason.CLOSED_BY_HOST
        with trio.fail_after(5), pytest.raises(ConnectionClosed) as caught:
            await other.receive()
        assert caught.value.reason is CloseReason.CLOSED_BY_PEER
        assert other.eof_received
        assert other.close_reason is None
    # Leaving the block closes the other side after the peer finished first.
    assert closer.close_reason is CloseReason.CLOSED_BY_HOST
    assert other.close_reason is CloseReason.CLOSED_BY_PEER


async def test_half_close() -> None:
    async with connection_pair(trionet.Lines(), queued=True) as (a, b):
        await a.send("last words")
        await a.send_eof()
        assert [message async for message in b] == [b"last words"]
        assert b.eof_received
        assert b.close_reason is None
        await b.send("reply after eof")
        assert await a.receive() == b"reply after eof"
    assert b.close_reason is CloseReason.CLOSED_BY_PEER


async def test_queued_side_sends_without_waiting_for_the_receiver(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Over lockstep streams a send completes only when the peer receives it;
    # the queued side hands its sends to a writer task instead.
    async with connection_pair(trionet.Lines(), queued=True, lockstep=True) as (a, b):
        with trio.fail_after(1):
            await b.send("queued")
            await b.send("again")
        assert await a.receive() == b"queued"
        assert await a.receive() == b"again"
        with trio.move_on_after(1) as scope:
            await a.send("unqueued")
        assert scope.cancelled_caught


async def test_memory_streams_buffer_sends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connection_pair(trionet.Lines()) as (a, b):
        with trio.fail_after(1):
            for i in range(100):
                await a.send(str(i))
        assert [await b.receive() for _ in range(100)] == [
            str(i).encode() for i in range(100)
        ]


async def test_wrap_gets_the_second_side_stream() -> None:
    seen: list[trio.abc.Stream] = []

    def wrap(stream: trio.abc.Stream) -> trio.abc.Stream:
        seen.append(stream)
        return ChunkedStream(stream, chunk_size=1)

    async with connection_pair(trionet.Lines(), wrap=wrap) as (a, b):
        assert len(seen) == 1
        assert isinstance(seen[0], trio.abc.HalfCloseableStream)
        await a.send_all(b"abc\n")
        assert [await b.receive_some() for _ in range(4)] == [b"a", b"b", b"c", b"\n"]
        # Only the second side is wrapped.
        await b.send_all(b"xyz")
        assert await a.receive_some() == b"xyz"


async def test_wrap_must_return_a_stream() -> None:
    with pytest.raises(TypeError, match=r"trio\.abc\.Stream"):
        not_a_stream = lambda stream: "nope"  # noqa: E731
        async with connection_pair(wrap=not_a_stream):  # type: ignore[arg-type]
            pytest.fail("the block must not run")  # pragma: no cover


@pytest.mark.parametrize("queued", [False, True])
@pytest.mark.parametrize("seed", range(5))
async def test_lines_survive_random_chunking(seed: int, queued: bool) -> None:
    lines = [b"x" * n for n in range(0, 200, 7)]

    def wrap(stream: trio.abc.Stream) -> trio.abc.Stream:
        return ChunkedStream(stream, seed=seed, max_chunk=13)

    async with connection_pair(trionet.Lines(), queued=queued, wrap=wrap) as (a, b):
        for line in lines:
            await a.send(line)
        await a.send_eof()
        assert [line async for line in b] == lines


async def test_reset_on_the_second_side() -> None:
    async with connection_pair(trionet.Lines(), wrap=lambda s: ResetAfter(s, 4)) as (
        a,
        b,
    ):
        await a.send("hello")
        with pytest.raises(ConnectionClosed) as caught:
            await b.receive()
        assert caught.value.reason is CloseReason.ERROR
        assert b.close_reason is CloseReason.ERROR
        # The broken side was closed, so the first side sees end of stream.
        with trio.fail_after(5), pytest.raises(ConnectionClosed) as caught:
            await a.receive()
        assert caught.value.reason is CloseReason.CLOSED_BY_PEER


async def test_stall_on_the_second_side_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connection_pair(
        trionet.Lines(), queued=True, wrap=lambda s: StallAfter(s, 2)
    ) as (a, b):
        b.message_timeout = 3.0
        await a.send("hello")
        start = trio.current_time()
        with pytest.raises(ConnectionClosed) as caught:
            await b.receive()
        assert caught.value.reason is CloseReason.TIMEOUT
        assert trio.current_time() - start == pytest.approx(3.0)


async def test_a_handler_runs_on_the_second_side() -> None:
    async def shout(conn: trionet.Connection) -> None:
        async for line in conn:
            await conn.send(line.upper())

    async with connection_pair(trionet.Lines(), queued=True) as (client, server):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(shout, server)
            await client.send("hi")
            assert await client.receive() == b"HI"
            await client.send_eof()
        assert server.eof_received
        await server.aclose()
        assert server.close_reason is CloseReason.CLOSED_BY_PEER


def test_public_path() -> None:
    assert connection_pair.__module__ == "trionet.testing"
    assert connection_pair.__doc__
