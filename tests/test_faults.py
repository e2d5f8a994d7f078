"""Tests for the fault-injection stream wrappers in trionet.testing."""

from __future__ import annotations

import errno
import itertools
import math
import random
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

import trionet.testing
from trionet import Decoder, Frames, Lines
from trionet.testing import ChunkedStream, DelayedStream, ResetAfter, StallAfter
from trionet.testing._faults import _FaultStream

PairMaker = Callable[
    [], tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]
]

pair_makers = pytest.mark.parametrize(
    "make_pair",
    [trio.testing.memory_stream_pair, trio.testing.lockstep_stream_pair],
    ids=["memory", "lockstep"],
)

PAYLOAD = bytes(range(256)) * 4


async def send_then_eof(stream: trio.abc.HalfCloseableStream, data: bytes) -> None:
    await stream.send_all(data)
    await stream.send_eof()


async def receive_chunks(
    stream: trio.abc.ReceiveStream, max_bytes: int | None = None, limit: int = 10_000
) -> list[bytes]:
    """Every chunk up to end of stream (bounded by ``limit`` calls)."""
    chunks: list[bytes] = []
    for _ in range(limit):
        chunk = await stream.receive_some(max_bytes)
        if not chunk:
            return chunks
        chunks.append(bytes(chunk))
    raise AssertionError(f"no end of stream after {limit} receives")


async def collect_through(
    make_pair: PairMaker,
    wrap: Callable[[trio.abc.Stream], trio.abc.Stream],
    data: bytes,
    max_bytes: int | None = None,
) -> list[bytes]:
    """Send ``data`` and EOF from one end; receive it all through ``wrap(other)``."""
    left, right = make_pair()
    wrapped = wrap(right)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_then_eof, left, data)
        chunks = await receive_chunks(wrapped, max_bytes)
    return chunks


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    received = bytearray()
    for _ in range(size):
        if len(received) == size:
            break
        received += await stream.receive_some(size - len(received))
    return bytes(received)


def planned_lengths(total: int, next_length: Callable[[], int]) -> list[int]:
    """Chunk lengths for ``total`` bytes cut after each ``next_length()``."""
    lengths = []
    while total:
        length = min(next_length(), total)
        lengths.append(length)
        total -= length
    return lengths


class PlainStream(trio.abc.Stream):
    """A Stream that is not half-closeable, forwarding to a stapled stream."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


# --- public surface ----------------------------------------------------------


def test_public_names() -> None:
    names = {name for name in vars(trionet.testing) if not name.startswith("_")}
    assert {"ChunkedStream", "DelayedStream", "ResetAfter", "StallAfter"} <= names
    for name in ("ChunkedStream", "DelayedStream", "ResetAfter", "StallAfter"):
        cls = getattr(trionet.testing, name)
        assert cls.__module__ == "trionet.testing"
        assert issubclass(cls, trio.abc.HalfCloseableStream)
        assert ".. versionadded:: 0.1" in (cls.__doc__ or "")


# --- argument validation -----------------------------------------------------


def make_wrapper(kind: str, stream: trio.abc.Stream, size: int = 3) -> _FaultStream:
    if kind == "chunked":
        return ChunkedStream(stream, chunk_size=size)
    if kind == "seeded":
        return ChunkedStream(stream, seed=0, max_chunk=size)
    if kind == "delayed":
        return DelayedStream(stream, 0)
    if kind == "reset":
        return ResetAfter(stream, 1 << 40)
    assert kind == "stall"
    return StallAfter(stream, 1 << 40, stall_sends_after=1 << 40)


KINDS = ["chunked", "seeded", "delayed", "reset", "stall"]


# The type: ignore comments mark arguments of the wrong type, on purpose.
@pytest.mark.parametrize(
    ("factory", "error"),
    [
        (lambda s: ChunkedStream(s), ValueError),
        (lambda s: ChunkedStream(s, chunk_size=2, seed=1), ValueError),
        (lambda s: ChunkedStream(s, chunk_size=0), ValueError),
        (lambda s: ChunkedStream(s, chunk_size=-3), ValueError),
        (lambda s: ChunkedStream(s, seed=1, max_chunk=0), ValueError),
        (lambda s: ChunkedStream(s, chunk_size=True), TypeError),
        (lambda s: ChunkedStream(s, chunk_size=2.0), TypeError),  # type: ignore[arg-type]
        (lambda s: DelayedStream(s, -0.5), ValueError),
        (lambda s: DelayedStream(s, math.inf), ValueError),
        (lambda s: DelayedStream(s, math.nan), ValueError),
        (lambda s: DelayedStream(s, "1"), TypeError),  # type: ignore[arg-type]
        (lambda s: ResetAfter(s, -1), ValueError),
        (lambda s: ResetAfter(s, 1.5), TypeError),  # type: ignore[arg-type]
        (lambda s: StallAfter(s, -1), ValueError),
        (lambda s: StallAfter(s, None), ValueError),
        (lambda s: StallAfter(s, 3, stall_sends_after=-1), ValueError),
        (lambda s: ChunkedStream(b"not a stream", chunk_size=1), TypeError),  # type: ignore[arg-type]
        (lambda s: ResetAfter(trio.testing.MemorySendStream(), 1), TypeError),  # type: ignore[arg-type]
    ],
)
def test_invalid_arguments(
    factory: Callable[[trio.abc.Stream], object], error: type[Exception]
) -> None:
    stream, _ = trio.testing.memory_stream_pair()
    with pytest.raises(error):
        factory(stream)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("max_bytes", [0, -1])
async def test_receive_some_rejects_bad_max_bytes(kind: str, max_bytes: int) -> None:
    stream, _ = trio.testing.memory_stream_pair()
    with pytest.raises(ValueError, match="max_bytes"):
        await make_wrapper(kind, stream).receive_some(max_bytes)


# --- every wrapper is a correct stream when its fault is not triggered -------


@pytest.mark.parametrize("kind", KINDS)
async def test_wrapper_passes_trio_stream_checks(kind: str) -> None:
    HalfPair = tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]

    def wrapping(
        make: Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]],
    ) -> Callable[[], Awaitable[HalfPair]]:
        async def maker() -> HalfPair:
            left, right = make()
            # Chunks of a few hundred bytes keep the 1 MiB duplex check quick.
            return make_wrapper(kind, left, 300), make_wrapper(kind, right, 300)

        return maker

    await trio.testing.check_half_closeable_stream(
        wrapping(trio.testing.memory_stream_pair),
        wrapping(trio.testing.lockstep_stream_pair),
    )


@pytest.mark.parametrize("kind", KINDS)
async def test_forwards_sends_and_eof(kind: str) -> None:
    left, right = trio.testing.memory_stream_pair()
    wrapped = make_wrapper(kind, left)
    assert wrapped.transport_stream is left
    assert wrapped.can_send_eof
    await wrapped.send_all(b"hello")
    await wrapped.wait_send_all_might_not_block()
    await wrapped.send_eof()
    assert await receive_chunks(right) == [b"hello"]
    await wrapped.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await wrapped.receive_some()
    with pytest.raises(trio.ClosedResourceError):
        await left.receive_some()


@pytest.mark.parametrize("kind", KINDS)
async def test_send_eof_needs_a_half_closeable_stream(kind: str) -> None:
    left, right = trio.testing.memory_stream_pair()
    wrapped = make_wrapper(kind, PlainStream(left))
    assert isinstance(wrapped, trio.abc.HalfCloseableStream)
    assert not wrapped.can_send_eof
    with pytest.raises(TypeError, match="HalfCloseableStream"):
        await wrapped.send_eof()
    # The failed send_eof changed nothing: the stream still works both ways.
    await wrapped.send_all(b"ping")
    assert await right.receive_some() == b"ping"
    await right.send_all(b"pong")
    assert await receive_exactly(wrapped, 4) == b"pong"


# --- ChunkedStream -----------------------------------------------------------


@pair_makers
@pytest.mark.parametrize("chunk_size", [1, 5, 256, 5000])
async def test_chunked_fixed_size(make_pair: PairMaker, chunk_size: int) -> None:
    chunks = await collect_through(
        make_pair, lambda s: ChunkedStream(s, chunk_size=chunk_size), PAYLOAD
    )
    assert b"".join(chunks) == PAYLOAD
    assert [len(c) for c in chunks] == planned_lengths(len(PAYLOAD), lambda: chunk_size)


async def test_chunked_cuts_at_fixed_offsets_across_reads() -> None:
    left, right = trio.testing.memory_stream_pair()
    wrapped = ChunkedStream(right, chunk_size=4)
    await left.send_all(b"abcdefg")
    assert await wrapped.receive_some() == b"abcd"
    # Only three bytes are there: the chunk is cut short, not held back.
    assert await wrapped.receive_some() == b"efg"
    await left.send_all(b"hijklmn")
    # The next chunk boundary is at offset 8, so one byte finishes that chunk.
    assert await wrapped.receive_some() == b"h"
    assert await wrapped.receive_some() == b"ijkl"
    assert await wrapped.receive_some() == b"mn"
    await left.send_eof()
    assert await wrapped.receive_some() == b""


@pair_makers
async def test_chunked_respects_max_bytes(make_pair: PairMaker) -> None:
    left, right = make_pair()
    wrapped = ChunkedStream(right, chunk_size=5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_then_eof, left, b"0123456789ab")
        assert await wrapped.receive_some(2) == b"01"
        assert await wrapped.receive_some() == b"234"
        assert await wrapped.receive_some(10) == b"56789"
        assert await wrapped.receive_some(1) == b"a"
        assert await wrapped.receive_some(1) == b"b"
        assert await wrapped.receive_some(1) == b""


@pair_makers
@given(
    payload=st.binary(max_size=3000),
    seed=st.integers(min_value=0, max_value=2**64),
    max_chunk=st.integers(min_value=1, max_value=100),
)
async def test_chunked_seeded_sizes(
    make_pair: PairMaker, payload: bytes, seed: int, max_chunk: int
) -> None:
    def wrap(s: trio.abc.Stream) -> ChunkedStream:
        return ChunkedStream(s, seed=seed, max_chunk=max_chunk)

    first = await collect_through(make_pair, wrap, payload)
    second = await collect_through(make_pair, wrap, payload)
    assert b"".join(first) == payload
    assert first == second
    draws = random.Random(seed)
    assert [len(c) for c in first] == planned_lengths(
        len(payload), lambda: draws.randint(1, max_chunk)
    )


async def test_chunked_different_seeds_cut_differently() -> None:
    async def lengths(seed: int) -> list[int]:
        chunks = await collect_through(
            trio.testing.memory_stream_pair,
            lambda s: ChunkedStream(s, seed=seed, max_chunk=50),
            PAYLOAD,
        )
        return [len(c) for c in chunks]

    assert await lengths(1) != await lengths(2)
    assert max(await lengths(1)) <= 50


@pair_makers
@given(
    payload=st.binary(min_size=1, max_size=2000),
    send_sizes=st.lists(st.integers(min_value=1, max_value=300), min_size=1),
    chunk_size=st.integers(min_value=1, max_value=64),
    read_seed=st.integers(min_value=0, max_value=1000),
)
async def test_chunked_loses_nothing_and_never_crosses_a_boundary(
    make_pair: PairMaker,
    payload: bytes,
    send_sizes: list[int],
    chunk_size: int,
    read_seed: int,
) -> None:
    left, right = make_pair()
    wrapped = ChunkedStream(right, chunk_size=chunk_size)

    async def sender() -> None:
        view = memoryview(payload)
        sizes = itertools.cycle(send_sizes)
        while view:
            size = next(sizes)
            await left.send_all(view[:size])
            view = view[size:]
        await left.send_eof()

    reads = random.Random(read_seed)
    chunks: list[tuple[int, bytes]] = []
    offset = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        for _ in range(len(payload) + 1):
            max_bytes = reads.choice([None, reads.randint(1, 2 * chunk_size)])
            chunk = bytes(await wrapped.receive_some(max_bytes))
            if not chunk:
                break
            assert max_bytes is None or len(chunk) <= max_bytes
            chunks.append((offset, chunk))
            offset += len(chunk)
    assert b"".join(c for _, c in chunks) == payload
    for start, chunk in chunks:
        assert start // chunk_size == (start + len(chunk) - 1) // chunk_size


@pytest.mark.parametrize(
    "framing", [Lines(), Lines(delimiter=b"\r\n"), Frames(max_size=1000, header_size=2)]
)
@given(
    messages=st.lists(st.binary(max_size=200), max_size=20),
    seed=st.integers(min_value=0, max_value=2**32),
)
async def test_chunked_feeds_the_codec(
    framing: Lines | Frames, messages: list[bytes], seed: int
) -> None:
    if isinstance(framing, Lines):
        messages = [m.replace(framing.delimiter[:1], b"") for m in messages]
    wire = b"".join(framing.encode(m) for m in messages)
    chunks = await collect_through(
        trio.testing.memory_stream_pair,
        lambda s: ChunkedStream(s, seed=seed, max_chunk=7),
        wire,
    )
    decoder = Decoder(framing)
    received: list[bytes] = []
    for chunk in chunks:
        decoder.feed(chunk)
        received.extend(decoder.messages())
    decoder.end_of_stream()
    assert received == messages


async def test_chunked_passes_on_errors_of_the_wrapped_stream() -> None:
    left, right = trio.testing.memory_stream_pair()
    wrapped = ChunkedStream(left, chunk_size=2)
    await right.aclose()
    with pytest.raises(trio.BrokenResourceError):
        await wrapped.send_all(b"x")


async def test_chunked_close_discards_buffer() -> None:
    left, right = trio.testing.memory_stream_pair()
    wrapped = ChunkedStream(right, chunk_size=1)
    await left.send_all(b"abc")
    assert await wrapped.receive_some() == b"a"
    await wrapped.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await wrapped.receive_some()


# --- DelayedStream -----------------------------------------------------------


@pair_makers
@pytest.mark.parametrize(("delay", "chunk_size"), [(0.25, 4), (1.5, 7), (0, 3)])
async def test_delay_per_chunk(
    autojump_clock: trio.testing.MockClock,
    make_pair: PairMaker,
    delay: float,
    chunk_size: int,
) -> None:
    left, right = make_pair()
    wrapped = DelayedStream(ChunkedStream(right, chunk_size=chunk_size), delay)
    data = PAYLOAD[:30]
    start = trio.current_time()
    arrivals: list[float] = []
    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_then_eof, left, data)
        for _ in range(len(data) + 1):
            chunk = await wrapped.receive_some()
            if not chunk:
                break
            received += chunk
            arrivals.append(trio.current_time() - start)
        end_of_stream = trio.current_time() - start
    assert received == data
    count = math.ceil(len(data) / chunk_size)
    assert arrivals == [delay * n for n in range(1, count + 1)]
    # End of stream is not delayed.
    assert end_of_stream == delay * count


async def test_delay_with_max_bytes(autojump_clock: trio.testing.MockClock) -> None:
    left, right = trio.testing.memory_stream_pair()
    wrapped = DelayedStream(right, 0.5)
    await left.send_all(b"0123456789")
    start = trio.current_time()
    assert await wrapped.receive_some(4) == b"0123"
    assert await wrapped.receive_some(4) == b"4567"
    assert await wrapped.receive_some(4) == b"89"
    assert trio.current_time() - start == 1.5


async def test_cancelled_delay_keeps_the_bytes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    left, right = trio.testing.memory_stream_pair()
    wrapped = DelayedStream(right, 2.0)
    await left.send_all(b"abcdef")
    start = trio.current_time()
    with trio.move_on_after(0.5) as scope:
        await wrapped.receive_some()
    assert scope.cancelled_caught
    assert trio.current_time() - start == 0.5
    # The delay starts afresh; a smaller max_bytes takes part of the bytes.
    assert await wrapped.receive_some(2) == b"ab"
    assert trio.current_time() - start == 2.5
    assert await wrapped.receive_some() == b"cdef"
    assert trio.current_time() - start == 4.5


async def test_close_wakes_a_delayed_receive() -> None:
    left, right = trio.testing.memory_stream_pair()
    wrapped = DelayedStream(right, 1e6)
    await left.send_all(b"x")
    outcome: list[str] = []

    async def receiver() -> None:
        try:
            await wrapped.receive_some()
        except trio.ClosedResourceError:
            outcome.append("closed")

    with trio.fail_after(10):  # guard only: a broken wrapper would wait 1e6 s
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            await trio.testing.wait_all_tasks_blocked()
            assert outcome == []
            await wrapped.aclose()
    assert outcome == ["closed"]


# --- ResetAfter --------------------------------------------------------------


def assert_is_reset(error: BaseException) -> None:
    assert isinstance(error, trio.BrokenResourceError)
    cause = error.__cause__
    assert isinstance(cause, ConnectionResetError)
    assert cause.errno == errno.ECONNRESET


@pair_makers
@pytest.mark.parametrize("nbytes", [0, 1, 7, 100])
@pytest.mark.parametrize("max_bytes", [None, 3])
async def test_reset_after_exactly_nbytes(
    make_pair: PairMaker, nbytes: int, max_bytes: int | None
) -> None:
    left, right = make_pair()
    wrapped = ResetAfter(right, nbytes)
    received = bytearray()
    async with trio.open_nursery() as nursery:
        # The peer's send never finishes on a lockstep stream (nobody reads
        # the rest), so it is cancelled at the end.
        nursery.start_soon(left.send_all, PAYLOAD)
        with pytest.raises(trio.BrokenResourceError) as info:
            for _ in range(nbytes + 1):
                assert wrapped.is_reset == (len(received) == nbytes)
                received += await wrapped.receive_some(max_bytes)
        assert wrapped.is_reset
        nursery.cancel_scope.cancel()
    assert received == PAYLOAD[:nbytes]
    assert_is_reset(info.value)
    # Stays reset, on both sides of the stream.
    with pytest.raises(trio.BrokenResourceError) as info:
        await wrapped.receive_some()
    assert_is_reset(info.value)
    with pytest.raises(trio.BrokenResourceError) as info:
        await wrapped.send_all(b"reply")
    assert_is_reset(info.value)
    with pytest.raises(trio.BrokenResourceError) as info:
        await wrapped.wait_send_all_might_not_block()
    assert_is_reset(info.value)
    with pytest.raises(trio.BrokenResourceError) as info:
        await wrapped.send_eof()
    assert_is_reset(info.value)
    # Closing wins over the reset.
    await wrapped.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await wrapped.receive_some()
    with pytest.raises(trio.ClosedResourceError):
        await wrapped.send_all(b"x")


@given(
    payload=st.binary(min_size=1, max_size=500),
    data=st.data(),
)
async def test_reset_never_reads_past_nbytes(
    payload: bytes, data: st.DataObject
) -> None:
    nbytes = data.draw(st.integers(min_value=0, max_value=len(payload)))
    reads = data.draw(st.lists(st.integers(min_value=1, max_value=50), min_size=1))
    left, right = trio.testing.memory_stream_pair()
    wrapped = ResetAfter(right, nbytes)
    await left.send_all(payload)
    received = bytearray()
    with pytest.raises(trio.BrokenResourceError):
        for max_bytes in reads * (len(payload) + 1):
            chunk = await wrapped.receive_some(max_bytes)
            assert 0 < len(chunk) <= max_bytes
            received += chunk
    assert received == payload[:nbytes]
    # The rest is still in the wrapped stream, unread.
    rest = payload[nbytes:]
    if rest:
        assert await right.receive_some() == rest


async def test_reset_sends_work_until_nbytes_received() -> None:
    left, right = trio.testing.memory_stream_pair()
    wrapped = ResetAfter(right, 4)
    await wrapped.send_all(b"hello")
    assert await left.receive_some() == b"hello"
    await left.send_all(b"abcd")
    assert await wrapped.receive_some() == b"abcd"
    with pytest.raises(trio.BrokenResourceError):
        await wrapped.send_all(b"more")


@pair_makers
async def test_reset_passes_on_an_earlier_end_of_stream(make_pair: PairMaker) -> None:
    chunks = await collect_through(make_pair, lambda s: ResetAfter(s, 10), b"abc")
    assert chunks == [b"abc"]


# --- StallAfter --------------------------------------------------------------


async def assert_blocks(afn: Callable[[], Awaitable[object]]) -> None:
    """``afn()`` is still blocked once every task is; then cancel it."""
    finished: list[object] = []

    async def run() -> None:
        finished.append(await afn())

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await trio.testing.wait_all_tasks_blocked()
            assert finished == []
            scope.cancel()
    assert scope.cancelled_caught
    assert finished == []


@pair_makers
@pytest.mark.parametrize("nbytes", [0, 1, 6])
async def test_stall_after_nbytes(make_pair: PairMaker, nbytes: int) -> None:
    left, right = make_pair()
    wrapped = StallAfter(right, nbytes)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(left.send_all, PAYLOAD[:20])
        received = bytearray()
        for _ in range(nbytes):
            if len(received) == nbytes:
                break
            assert not wrapped.receive_stalled
            received += await wrapped.receive_some()
        assert received == PAYLOAD[:nbytes]
        assert wrapped.receive_stalled
        # More bytes are waiting in the wrapped stream, yet receive blocks.
        await assert_blocks(wrapped.receive_some)
        await assert_blocks(lambda: wrapped.receive_some(1))
        # Sends are not affected.
        nursery.start_soon(wrapped.send_all, b"still sending")
        assert await left.receive_some() == b"still sending"
        nursery.cancel_scope.cancel()


async def test_stall_lasts_forever_under_the_mock_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    left, right = trio.testing.memory_stream_pair()
    wrapped = StallAfter(right, 2)
    await left.send_all(b"abcdef")
    assert await wrapped.receive_some() == b"ab"
    start = trio.current_time()
    with trio.move_on_after(3600) as scope:
        await wrapped.receive_some()
    assert scope.cancelled_caught
    assert trio.current_time() - start == 3600
    assert await right.receive_some() == b"cdef"


async def test_close_wakes_a_stalled_receive() -> None:
    _, right = trio.testing.memory_stream_pair()
    wrapped = StallAfter(right, 0)
    outcome: list[str] = []

    async def receiver() -> None:
        try:
            await wrapped.receive_some()
        except trio.ClosedResourceError:
            outcome.append("closed")

    with trio.fail_after(10):  # guard only: a broken wrapper would hang
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            await trio.testing.wait_all_tasks_blocked()
            assert outcome == []
            await wrapped.aclose()
    assert outcome == ["closed"]


async def test_stalled_receive_is_still_one_at_a_time() -> None:
    _, right = trio.testing.memory_stream_pair()
    wrapped = StallAfter(right, 0)
    with trio.fail_after(10), pytest.RaisesGroup(trio.BusyResourceError):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wrapped.receive_some)
            await trio.testing.wait_all_tasks_blocked()
            await wrapped.receive_some()


@pair_makers
async def test_stall_sends_after(make_pair: PairMaker) -> None:
    left, right = make_pair()
    wrapped = StallAfter(right, None, stall_sends_after=5)
    received = bytearray()

    async def peer_reads() -> None:
        for _ in range(5):
            received.extend(await left.receive_some())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer_reads)
        await wrapped.send_all(b"01")
        # Three bytes still fit; the rest of this send stalls.
        await assert_blocks(lambda: wrapped.send_all(b"2345678"))
        assert wrapped.send_stalled
        nursery.cancel_scope.cancel()
    assert received == b"01234"
    await assert_blocks(lambda: wrapped.send_all(b"x"))
    await assert_blocks(wrapped.wait_send_all_might_not_block)
    await assert_blocks(wrapped.send_eof)
    # Receives are not affected.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(left.send_all, b"inbound")
        assert await wrapped.receive_some() == b"inbound"
    # A stalled send wakes up when the stream is closed.
    with trio.fail_after(10), pytest.RaisesGroup(trio.ClosedResourceError):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wrapped.send_all, b"y")
            await trio.testing.wait_all_tasks_blocked()
            await wrapped.aclose()


@pair_makers
async def test_stall_passes_on_an_earlier_end_of_stream(make_pair: PairMaker) -> None:
    chunks = await collect_through(make_pair, lambda s: StallAfter(s, 10), b"abc")
    assert chunks == [b"abc"]
