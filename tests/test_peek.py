"""Connection.peek: look at the next bytes without consuming them.

The property test plays random sequences of peeks and receives (every mode,
batched ones included) over randomly chunked streams against a model that is
just a position in the byte string.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import trionet
from trionet import CloseReason, ConnectionClosed, IncompleteMessage
from trionet.testing import ChunkedStream, connection_pair

from .conftest import open_pair

Op = tuple[str, int]

ops = st.lists(
    st.one_of(
        st.tuples(st.just("peek"), st.integers(0, 12)),
        st.tuples(st.just("exactly"), st.integers(0, 12)),
        st.tuples(st.just("line"), st.just(0)),
        st.tuples(st.just("batch"), st.just(0)),
        st.tuples(st.just("some"), st.integers(1, 8)),
    ),
    max_size=20,
)
#: Streams rich in line ends, so line receives find lines.
streams = st.lists(st.sampled_from(b"ab\n\x00"), max_size=80).map(bytes)


class Model:
    """What each operation must return, given how far the stream was read."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def rest(self) -> bytes:
        return self.data[self.pos :]

    def expect(self, op: str, n: int) -> tuple[str, Any]:
        """``("ok", value)``, ``("incomplete", partial)`` or ``("closed", None)``
        for one operation, advancing past what it consumes."""
        rest = self.rest()
        if op in ("peek", "exactly"):
            if len(rest) >= n:
                if op == "exactly":
                    self.pos += n
                return "ok", rest[:n]
            if op == "exactly":
                self.pos = len(self.data)
            return ("incomplete", rest) if rest else ("closed", None)
        if op in ("line", "batch"):
            end = rest.find(b"\n")
            if end >= 0:
                self.pos += end + 1
                return "ok", rest[:end]
            self.pos = len(self.data)
            return ("incomplete", rest) if rest else ("closed", None)
        assert op == "some"
        return "some", None


async def play(conn: trionet.Connection, model: Model, op: str, n: int) -> None:
    calls = {
        "peek": lambda: conn.peek(n),
        "exactly": lambda: conn.receive_exactly(n),
        "line": conn.receive_line,
        "batch": conn.receive,
    }
    if op == "some":
        got = await conn.receive_some(n)
        # A chunk, however the stream was cut: the next bytes, at most n.
        assert got == model.rest()[: len(got)]
        assert got or not model.rest()
        assert len(got) <= n
        model.pos += len(got)
        return
    kind, value = model.expect(op, n)
    try:
        got = await calls[op]()
    except IncompleteMessage as exc:
        assert (kind, value) == ("incomplete", exc.partial)
        assert exc.reason is CloseReason.CLOSED_BY_PEER
        return
    except ConnectionClosed as exc:
        assert (kind, value) == ("closed", None)
        assert exc.reason is CloseReason.CLOSED_BY_PEER
        return
    assert (kind, value) == ("ok", got)


@settings(max_examples=300, deadline=None)
@given(data=streams, ops=ops, seed=st.integers(0, 2**32), max_chunk=st.integers(1, 9))
def test_peek_consumes_nothing_whatever_the_chunking(
    data: bytes, ops: list[Op], seed: int, max_chunk: int
) -> None:
    async def main() -> None:
        async with connection_pair(
            trionet.Lines(),
            wrap=lambda stream: ChunkedStream(stream, seed=seed, max_chunk=max_chunk),
        ) as (sender, receiver):
            await sender.send_all(data)
            await sender.aclose()
            model = Model(data)
            for op, n in ops:
                await play(receiver, model, op, n)
            # Whatever is left arrives, in order, and nothing else.
            rest = b""
            while chunk := await receiver.receive_some():
                rest += chunk
            assert rest == model.rest()

    trio.run(main)


async def test_peek_waits_for_n_bytes(pair_kind: str) -> None:
    async with open_pair(pair_kind) as (client, server):
        peeked: list[bytes] = []

        async def peek() -> None:
            peeked.append(await server.peek(3))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(peek)
            await client.send_all(b"ab")
            await trio.testing.wait_all_tasks_blocked()
            assert peeked == []
            await client.send_all(b"cde")
        assert peeked == [b"abc"]
        assert await server.peek(1) == b"a"
        assert await server.receive_exactly(5) == b"abcde"


async def test_peek_then_every_mode(pair_kind: str) -> None:
    # The bytes a peek saw are read again by whatever mode comes next.
    async with open_pair(pair_kind) as (client, server):
        frame = trionet.Frames().encode(b"framed")
        await client.send_all(b"line\n" + frame + b"raw")
        assert await server.peek(2) == b"li"
        assert await server.receive_line() == b"line"
        assert await server.peek(4) == frame[:4]
        assert await server.receive_frame() == b"framed"
        assert await server.peek(3) == b"raw"
        assert await server.receive_some() == b"raw"


async def test_peek_after_a_batch_sees_the_raw_bytes() -> None:
    # receive() cut every line of the chunk at once; a peek sees the lines
    # still waiting as bytes on the wire.
    async with connection_pair(trionet.Lines()) as (client, server):
        await client.send_all(b"one\ntwo\nthree\n")
        assert await server.receive() == b"one"
        assert await server.peek(5) == b"two\nt"
        assert await server.receive() == b"two"
        assert await server.receive_exactly(6) == b"three\n"


async def test_peek_past_the_end_keeps_the_partial_bytes(pair_kind: str) -> None:
    async with open_pair(pair_kind) as (client, server):
        await client.send_all(b"xy")
        if pair_kind == "tcp":
            await client.send_eof()
        else:
            await client.aclose()
        with pytest.raises(IncompleteMessage) as info:
            await server.peek(3)
        assert info.value.partial == b"xy"
        assert info.value.reason is CloseReason.CLOSED_BY_PEER
        # Still there: a second peek says the same, and a receive gets them.
        with pytest.raises(IncompleteMessage) as again:
            await server.peek(3)
        assert again.value.partial == b"xy"
        assert await server.receive_some() == b"xy"
        assert await server.receive_some() == b""
        with pytest.raises(ConnectionClosed) as closed:
            await server.peek(1)
        assert not isinstance(closed.value, IncompleteMessage)


async def test_cancelled_peek_loses_nothing(pair_kind: str) -> None:
    async with open_pair(pair_kind) as (client, server):
        await client.send_all(b"ab")
        with trio.move_on_after(0.01) as scope:
            await server.peek(3)
        assert scope.cancelled_caught
        await client.send_all(b"c")
        assert await server.receive_exactly(3) == b"abc"


async def test_peek_zero_and_negative() -> None:
    async with connection_pair() as (_client, server):
        assert await server.peek(0) == b""
        with pytest.raises(ValueError, match="n must be >= 0"):
            await server.peek(-1)


async def test_peek_on_a_closed_connection_raises() -> None:
    async with connection_pair() as (_client, server):
        await server.aclose()
        with pytest.raises(ConnectionClosed) as info:
            await server.peek(1)
        assert info.value.reason is CloseReason.CLOSED_BY_HOST
