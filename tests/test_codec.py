"""Tests for the sans-IO codecs (``trionet._codec``) and the exception hierarchy.

Everything here is synchronous: no event loop, no sockets.  Each codec is fed
its wire bytes whole, one byte at a time and in random splits, and checked
against the messages that went in.
"""

from __future__ import annotations

import itertools
import operator
import tracemalloc
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, SupportsIndex

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trionet import (
    CloseReason,
    ConnectError,
    ConnectionClosed,
    Decoder,
    Frames,
    FrameTooLarge,
    IncompleteMessage,
    Lines,
    LineTooLong,
    MessageTooLarge,
    ProtocolError,
    TrionetError,
)
from trionet._codec import Framing, ReceiveBuffer, _buffer, as_bytes

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

# Delimiters without a border (no proper prefix is also a suffix): for these a
# stream of encoded lines has exactly one parse.  See
# test_lines_self_overlapping_delimiter for the others.
DELIMITERS = [b"\n", b"\r\n", b"END"]
HEADER_SIZES = [1, 2, 4, 8]


# --------------------------------------------------------------------------
# helpers


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """``data`` cut at the given positions (out-of-range and repeats ignored)."""
    if not data:
        return []
    points = sorted({cut for cut in cuts if 0 < cut < len(data)})
    bounds = [0, *points, len(data)]
    return [data[start:stop] for start, stop in itertools.pairwise(bounds)]


def bytewise(data: bytes) -> list[bytes]:
    """``data`` one byte per chunk."""
    return [data[i : i + 1] for i in range(len(data))]


def chunkings(data: st.DataObject, wire: bytes) -> list[list[bytes]]:
    """A random split of ``wire`` drawn by hypothesis, plus one byte at a time."""
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=40), label="cuts")
    return [split_at(wire, cuts), bytewise(wire)]


Collect = Callable[[Decoder, list[bytes]], None]


def collect_next(decoder: Decoder, out: list[bytes]) -> None:
    while (message := decoder.next_message()) is not None:
        out.append(message)


def collect_iter(decoder: Decoder, out: list[bytes]) -> None:
    out.extend(decoder)


def collect_messages(decoder: Decoder, out: list[bytes]) -> None:
    # Every call removes at least one message or returns [], so this ends.
    while batch := decoder.messages():
        out.extend(batch)


COLLECTORS: list[Collect] = [collect_next, collect_iter, collect_messages]


def decode(
    framing: Framing, chunks: list[bytes], collect: Collect
) -> tuple[list[bytes], Decoder]:
    decoder = Decoder(framing)
    out: list[bytes] = []
    for chunk in chunks:
        decoder.feed(chunk)
        collect(decoder, out)
    return out, decoder


def without_delimiter(data: bytes, delimiter: bytes) -> bytes:
    # Each pass makes ``data`` shorter, so this loop ends.
    while delimiter in data:
        data = data.replace(delimiter, b"")
    return data


def line_contents(delimiter: bytes, max_length: int) -> st.SearchStrategy[bytes]:
    """Lines of 0..max_length bytes with delimiter fragments but no delimiter."""
    byte = st.one_of(st.integers(0, 255), st.sampled_from(sorted(set(delimiter))))
    return (
        st.lists(byte, max_size=max_length)
        .map(bytes)
        .map(lambda data: without_delimiter(data, delimiter))
    )


def exact_line(delimiter: bytes, length: int) -> st.SearchStrategy[bytes]:
    """A line of exactly ``length`` bytes that cannot contain ``delimiter``.

    The delimiter's last byte never occurs, but its other bytes often do.
    """
    last = delimiter[-1]
    byte = st.integers(0, 255).filter(lambda b: b != last)
    if len(delimiter) > 1:
        byte = st.one_of(byte, st.sampled_from(sorted(set(delimiter[:-1]))))
    return st.lists(byte, min_size=length, max_size=length).map(bytes)


def assert_round_trip(
    framing: Framing,
    chunkings_of_wire: Iterable[list[bytes]],
    expected: list[bytes],
    trailing: bytes,
) -> None:
    """Decoding each chunking of the wire, with each collector, gives
    ``expected`` and leaves ``trailing`` buffered, which the end of the
    stream reports as an incomplete message."""
    for chunks in chunkings_of_wire:
        for collect in COLLECTORS:
            out, decoder = decode(framing, chunks, collect)
            assert out == expected
            assert decoder.buffered == len(trailing)
            if trailing:
                with pytest.raises(IncompleteMessage) as info:
                    decoder.end_of_stream()
                assert info.value.partial == trailing
                assert info.value.reason is CloseReason.CLOSED_BY_PEER
            else:
                decoder.end_of_stream()


def assert_failed_for_good(decoder: Decoder, error: ProtocolError) -> None:
    calls: list[Callable[[], object]] = [
        decoder.next_message,
        decoder.messages,
        decoder.end_of_stream,
        lambda: list(decoder),
    ]
    for call in calls:
        with pytest.raises(ProtocolError) as info:
            call()
        assert info.value is error


# --------------------------------------------------------------------------
# 1. Lines round trip


@st.composite
def line_streams(draw: st.DrawFn) -> tuple[Lines, list[bytes], bytes]:
    delimiter = draw(st.sampled_from(DELIMITERS))
    max_length = draw(st.integers(0, 40))
    contents = line_contents(delimiter, max_length)
    lines = draw(st.lists(contents, max_size=12))
    trailing = draw(contents)
    return Lines(delimiter=delimiter, max_length=max_length), lines, trailing


@given(stream=line_streams(), data=st.data())
def test_lines_round_trip(
    stream: tuple[Lines, list[bytes], bytes], data: st.DataObject
) -> None:
    framing, lines, trailing = stream
    wire = b"".join(framing.encode(line) for line in lines) + trailing
    assert_round_trip(framing, chunkings(data, wire), lines, trailing)


@pytest.mark.parametrize(
    ("delimiter", "chunks", "expected", "rest"),
    [
        (b"\r\n", [b"one\r", b"\ntwo\r", b"\n"], [b"one", b"two"], b""),
        (b"\r\n", [b"a\r\r", b"\n\r", b"\n\n\r"], [b"a\r", b""], b"\n\r"),
        (b"END", [b"xE", b"N", b"DyEN", b"EN", b"D"], [b"x", b"yEN"], b""),
        (b"END", [b"ENEN", b"DEND", b"EE", b"NND"], [b"EN", b""], b"EENND"),
        (b"END", [b"E", b"N", b"D", b"E", b"N"], [b""], b"EN"),
    ],
)
def test_lines_delimiter_split_across_chunks(
    delimiter: bytes, chunks: list[bytes], expected: list[bytes], rest: bytes
) -> None:
    framing = Lines(delimiter=delimiter)
    for collect in COLLECTORS:
        out, decoder = decode(framing, chunks, collect)
        assert out == expected
        assert decoder.buffered == len(rest)
        if rest:
            with pytest.raises(IncompleteMessage) as info:
                decoder.end_of_stream()
            assert info.value.partial == rest


def test_end_of_stream_on_empty_buffer() -> None:
    Decoder(Lines()).end_of_stream()
    Decoder(Frames()).end_of_stream()
    decoder = Decoder(Lines())
    decoder.feed(b"done\n")
    assert decoder.next_message() == b"done"
    decoder.end_of_stream()


def test_decoder_accepts_any_buffer() -> None:
    decoder = Decoder(Lines())
    decoder.feed(bytearray(b"a\n"))
    decoder.feed(memoryview(b"b\nc"))
    assert decoder.messages() == [b"a", b"b"]
    assert decoder.buffered == 1


# --------------------------------------------------------------------------
# 2. LineTooLong, independent of chunking


@st.composite
def long_line_streams(
    draw: st.DrawFn,
) -> tuple[Lines, list[bytes], bytes, list[bytes]]:
    delimiter = draw(st.sampled_from(DELIMITERS))
    max_length = draw(st.integers(0, 24))
    length = max(0, max_length + draw(st.integers(-2, 2), label="delta"))
    contents = line_contents(delimiter, max_length)
    before = draw(st.lists(contents, max_size=4))
    target = draw(exact_line(delimiter, length))
    after = draw(st.lists(contents, max_size=3))
    return Lines(delimiter=delimiter, max_length=max_length), before, target, after


@given(stream=long_line_streams(), data=st.data())
def test_line_too_long_verdict_independent_of_chunking(
    stream: tuple[Lines, list[bytes], bytes, list[bytes]], data: st.DataObject
) -> None:
    framing, before, target, after = stream
    delimiter, max_length = framing.delimiter, framing.max_length
    too_long = len(target) > max_length
    # Built by hand: Lines.encode refuses a line that is too long.
    wire = b"".join(line + delimiter for line in [*before, target, *after])
    for chunks in chunkings(data, wire):
        for collect in COLLECTORS:
            decoder = Decoder(framing)
            out: list[bytes] = []
            error: LineTooLong | None = None
            for chunk in chunks:
                decoder.feed(chunk)
                # Whatever was kept from earlier feeds is a partial line that was
                # not yet provably too long.
                assert decoder.buffered <= max_length + len(delimiter) - 1 + len(chunk)
                try:
                    collect(decoder, out)
                except LineTooLong as exc:
                    error = exc
                    break
            if too_long:
                assert error is not None
                assert out == before
                assert_failed_for_good(decoder, error)
            else:
                assert error is None
                assert out == [*before, target, *after]
                assert decoder.buffered == 0


def test_lines_before_too_long_line_come_first() -> None:
    framing = Lines(max_length=5)
    wire = b"a\nbb\n" + b"x" * 6 + b"\nlater\n"

    decoder = Decoder(framing)
    decoder.feed(wire)
    assert decoder.messages() == [b"a", b"bb"]
    with pytest.raises(LineTooLong) as info:
        decoder.messages()
    assert_failed_for_good(decoder, info.value)

    decoder = Decoder(framing)
    decoder.feed(wire)
    assert decoder.next_message() == b"a"
    assert decoder.next_message() == b"bb"
    with pytest.raises(LineTooLong) as info:
        decoder.next_message()
    assert_failed_for_good(decoder, info.value)


def test_unterminated_line_too_long_after_good_lines() -> None:
    # The trailing line has no delimiter yet, but is already longer than any
    # line may be: the good line comes first, then the error.
    decoder = Decoder(Lines(max_length=3))
    decoder.feed(b"ok\n" + b"x" * 10)
    assert decoder.messages() == [b"ok"]
    with pytest.raises(LineTooLong) as info:
        decoder.messages()
    assert_failed_for_good(decoder, info.value)


@pytest.mark.parametrize("delimiter", DELIMITERS)
def test_line_too_long_without_delimiter_raised_early(delimiter: bytes) -> None:
    # Once max_length + len(delimiter) bytes hold no delimiter, no delimiter can
    # still arrive in time: the error comes then, not at the end of the line.
    max_length = 8
    decoder = Decoder(Lines(delimiter=delimiter, max_length=max_length))
    limit = max_length + len(delimiter)
    for fed in range(1, limit + 1):
        decoder.feed(b"x")
        if fed < limit:
            assert decoder.next_message() is None
        else:
            with pytest.raises(LineTooLong):
                decoder.next_message()
    assert decoder.buffered == limit


@given(
    delimiter=st.sampled_from(DELIMITERS),
    lengths=st.lists(st.integers(0, 12), min_size=1, max_size=40),
    max_length=st.integers(0, 16),
)
def test_line_length_checks_agree(
    delimiter: bytes, lengths: list[int], max_length: int
) -> None:
    # extract_lines checks many short lines under a large limit by hopping
    # between delimiters instead of measuring each line; both checks must give
    # the verdict of measuring every line.
    lines = [bytes([0x61 + i % 26]) * length for i, length in enumerate(lengths)]
    region = delimiter.join(lines)
    fits = max(lengths) <= max_length
    assert _buffer._fits_by_hops(region, delimiter, max_length) == fits
    assert _buffer._lines_fit(region, lines, delimiter, max_length) == fits


@pytest.mark.parametrize("delimiter", DELIMITERS)
@pytest.mark.parametrize("long_line", [100, 101, 250])
def test_too_long_line_among_many_short_ones(delimiter: bytes, long_line: int) -> None:
    # Enough short lines under the limit that messages() hops between
    # delimiters rather than measuring each line.
    framing = Lines(delimiter=delimiter, max_length=100)
    before = [b"ab"] * 700
    after = [b"cd"] * 10
    wire = b"".join(line + delimiter for line in [*before, b"x" * long_line, *after])
    decoder = Decoder(framing)
    decoder.feed(wire)
    if long_line <= 100:
        assert decoder.messages() == [*before, b"x" * long_line, *after]
        assert decoder.buffered == 0
    else:
        assert decoder.messages() == before
        with pytest.raises(LineTooLong) as info:
            decoder.messages()
        assert_failed_for_good(decoder, info.value)


# --------------------------------------------------------------------------
# 3. Frames


@st.composite
def frame_streams(draw: st.DrawFn) -> tuple[Frames, list[bytes], bytes]:
    header_size = draw(st.sampled_from(HEADER_SIZES))
    limit = (1 << (8 * header_size)) - 1
    max_size = draw(st.integers(0, min(limit, 300)))
    framing = Frames(max_size=max_size, header_size=header_size)
    payloads = draw(st.lists(st.binary(max_size=max_size), max_size=10))
    unfinished = framing.encode(draw(st.binary(max_size=max_size)))
    trailing = unfinished[: draw(st.integers(0, len(unfinished) - 1))]
    return framing, payloads, trailing


@given(stream=frame_streams(), data=st.data())
def test_frames_round_trip(
    stream: tuple[Frames, list[bytes], bytes], data: st.DataObject
) -> None:
    framing, payloads, trailing = stream
    wire = b"".join(framing.encode(payload) for payload in payloads) + trailing
    assert_round_trip(framing, chunkings(data, wire), payloads, trailing)


@given(
    header_size=st.sampled_from(HEADER_SIZES),
    payload_count=st.integers(0, 4),
    data=st.data(),
)
def test_frame_too_large_as_soon_as_header_complete(
    header_size: int, payload_count: int, data: st.DataObject
) -> None:
    limit = (1 << (8 * header_size)) - 1
    max_size = data.draw(st.integers(0, min(limit - 1, 200)), label="max_size")
    framing = Frames(max_size=max_size, header_size=header_size)
    payloads = data.draw(
        st.lists(
            st.binary(max_size=max_size), min_size=payload_count, max_size=payload_count
        ),
        label="payloads",
    )
    announced = data.draw(st.integers(max_size + 1, limit), label="announced")
    good = b"".join(framing.encode(payload) for payload in payloads)
    junk = data.draw(st.binary(max_size=20), label="junk")
    wire = good + announced.to_bytes(header_size, "big") + junk
    header_end = len(good) + header_size
    for chunks in chunkings(data, wire):
        for collect in COLLECTORS:
            decoder = Decoder(framing)
            out: list[bytes] = []
            fed = 0
            error: FrameTooLarge | None = None
            for chunk in chunks:
                decoder.feed(chunk)
                fed += len(chunk)
                try:
                    collect(decoder, out)
                except FrameTooLarge as exc:
                    error = exc
                    break
                assert fed < header_end, "the bad header was complete but accepted"
            assert error is not None
            assert out == payloads
            assert decoder.buffered == fed - len(good)
            assert_failed_for_good(decoder, error)


@pytest.mark.parametrize(
    ("header_size", "max_size", "announced"),
    [
        (4, 16 * 1024 * 1024, 2**31),
        (4, 1024 * 1024, 0xFFFFFFFF),
        (8, 16 * 1024 * 1024, 2**63),
        (2, 1000, 1001),
        (1, 0, 1),
    ],
)
@pytest.mark.parametrize("collect", COLLECTORS)
def test_frame_header_refused_byte_by_byte(
    header_size: int, max_size: int, announced: int, collect: Collect
) -> None:
    decoder = Decoder(Frames(max_size=max_size, header_size=header_size))
    header = announced.to_bytes(header_size, "big")
    out: list[bytes] = []
    for byte in bytewise(header[:-1]):
        decoder.feed(byte)
        collect(decoder, out)
    decoder.feed(header[-1:])
    with pytest.raises(FrameTooLarge):
        collect(decoder, out)
    assert out == []
    assert decoder.buffered == header_size


@pytest.mark.parametrize(
    ("header_size", "max_size"), [(4, 2**31), (8, 2**40)], ids=["h4", "h8"]
)
def test_announced_size_is_not_allocated(header_size: int, max_size: int) -> None:
    framing = Frames(max_size=max_size, header_size=header_size)
    announced = 1024 * 1024 * 1024
    header = announced.to_bytes(header_size, "big")
    body_start = b"x" * 100
    tracemalloc.start()
    try:
        decoder = Decoder(framing)
        buffer = ReceiveBuffer()
        decoder.feed(header)
        buffer.feed(header)
        assert decoder.next_message() is None
        assert decoder.messages() == []
        assert decoder.buffered == header_size
        assert buffer.frame_length(header_size, max_size) == announced
        assert buffer.missing_for_frame(header_size, max_size) == announced
        decoder.feed(body_start)
        buffer.feed(body_start)
        assert decoder.next_message() is None
        assert list(decoder) == []
        assert decoder.buffered == header_size + len(body_start)
        assert buffer.extract_frame(header_size, max_size) is None
        assert buffer.extract_frames(header_size, max_size) == []
        missing = buffer.missing_for_frame(header_size, max_size)
        assert missing == announced - len(body_start)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


def test_frames_config_validation() -> None:
    with pytest.raises(ValueError):
        Frames(header_size=1, max_size=1000)
    with pytest.raises(ValueError):
        Frames(header_size=3)
    with pytest.raises(ValueError):
        Frames(header_size=2, max_size=65536)
    with pytest.raises(ValueError):
        Frames(max_size=-1)
    # The largest size each header can express is accepted.
    for header_size in HEADER_SIZES:
        limit = (1 << (8 * header_size)) - 1
        assert Frames(header_size=header_size, max_size=limit).max_size == limit


@pytest.mark.parametrize("header_size", HEADER_SIZES)
def test_frames_encode_limits(header_size: int) -> None:
    framing = Frames(max_size=10, header_size=header_size)
    assert framing.encode(b"x" * 10) == (10).to_bytes(header_size, "big") + b"x" * 10
    with pytest.raises(MessageTooLarge) as info:
        framing.encode(b"x" * 11)
    assert isinstance(info.value, ValueError)
    with pytest.raises(MessageTooLarge):
        framing.header(11)
    # str counts in UTF-8 bytes: 6 characters, 12 bytes.
    with pytest.raises(MessageTooLarge):
        framing.encode("\u00e9" * 6)
    assert framing.encode("\u00e9") == framing.encode("\u00e9".encode())


@pytest.mark.parametrize("header_size", HEADER_SIZES)
def test_zero_length_frames(header_size: int) -> None:
    framing = Frames(max_size=0, header_size=header_size)
    wire = framing.encode(b"") * 3
    assert wire == bytes(3 * header_size)
    for chunks in (split_at(wire, [1, header_size + 1]), bytewise(wire), [wire]):
        for collect in COLLECTORS:
            out, decoder = decode(framing, chunks, collect)
            assert out == [b"", b"", b""]
            assert decoder.buffered == 0


def reference_frames(
    wire: bytes, header_size: int, max_size: int
) -> tuple[list[bytes], bool]:
    """The payloads of ``wire`` read one by one, and whether a bad header ends it."""
    payloads: list[bytes] = []
    pos = 0
    # Each pass moves ``pos`` forward by at least ``header_size``.
    while len(wire) - pos >= header_size:
        length = int.from_bytes(wire[pos : pos + header_size], "big")
        if length > max_size:
            return payloads, True
        end = pos + header_size + length
        if end > len(wire):
            break
        payloads.append(wire[pos + header_size : end])
        pos = end
    return payloads, False


@given(
    header_size=st.sampled_from(HEADER_SIZES),
    sizes=st.lists(st.integers(0, 40), max_size=30),
    bad_header=st.booleans(),
    data=st.data(),
)
def test_frames_across_copy_windows(
    header_size: int, sizes: list[int], bad_header: bool, data: st.DataObject
) -> None:
    # messages() slices small payloads out of a copy of a window of the buffer
    # and copies large ones straight out; shrinking both limits makes short
    # streams cross window edges and mix the two ways.
    framing = Frames(max_size=40, header_size=header_size)
    payloads = [bytes((i + j) % 256 for j in range(n)) for i, n in enumerate(sizes)]
    wire = b"".join(framing.encode(payload) for payload in payloads)
    if bad_header:
        wire += (41).to_bytes(header_size, "big") + b"junk"
    expected, too_large = reference_frames(wire, header_size, framing.max_size)
    assert expected == payloads
    assert too_large == bad_header
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_buffer, "_WINDOW", 48)
        patch.setattr(_buffer, "_SMALL_FRAME", 12)
        for chunks in [[wire], *chunkings(data, wire)]:
            decoder = Decoder(framing)
            out: list[bytes] = []
            error: FrameTooLarge | None = None
            for chunk in chunks:
                decoder.feed(chunk)
                try:
                    collect_messages(decoder, out)
                except FrameTooLarge as exc:
                    error = exc
                    break
            assert out == payloads
            assert (error is not None) == bad_header
            if not bad_header:
                assert decoder.buffered == 0


def test_frames_small_and_large_in_big_chunks() -> None:
    # The real window and size limits, with a stream much larger than a window.
    framing = Frames()
    sizes = [1024] * 300 + [4096, 4097, 0, 70000, 10, 300000, 3] + [100] * 2000
    payloads = [bytes([i % 256]) * n for i, n in enumerate(sizes)]
    wire = b"".join(framing.encode(payload) for payload in payloads)
    for chunk_size in (len(wire), 65536, 1000):
        chunks = [wire[i : i + chunk_size] for i in range(0, len(wire), chunk_size)]
        out, decoder = decode(framing, chunks, collect_messages)
        assert out == payloads
        assert decoder.buffered == 0


# --------------------------------------------------------------------------
# 4. ReceiveBuffer with mixed receive modes

MIXED_DELIMITERS = [b"\n", b"\r\n"]
MIXED_MAX_LENGTH = 1000
MIXED_MAX_SIZE = 1000

Op = tuple[str, bytes, bytes]  # (kind, parameter, expected result)


@st.composite
def mixed_ops(draw: st.DrawFn) -> Op:
    kind = draw(st.sampled_from(["line", "exactly", "frame", "some"]))
    if kind == "line":
        delimiter = draw(st.sampled_from(MIXED_DELIMITERS))
        return kind, delimiter, draw(line_contents(delimiter, 30))
    if kind == "frame":
        header_size = draw(st.sampled_from(HEADER_SIZES))
        return kind, bytes([header_size]), draw(st.binary(max_size=30))
    # Raw bytes, delimiters and all.
    raw = st.lists(st.sampled_from(b"ab\r\n\x00"), max_size=30).map(bytes)
    return kind, b"", draw(st.one_of(raw, st.binary(max_size=30)))


def op_wire(op: Op) -> bytes:
    kind, parameter, payload = op
    if kind == "line":
        return payload + parameter
    if kind == "frame":
        return len(payload).to_bytes(parameter[0], "big") + payload
    return payload


def feed_more(buffer: ReceiveBuffer, pending: Iterator[bytes]) -> None:
    chunk = next(pending, None)
    assert chunk is not None, "ran out of input before the operation completed"
    buffer.feed(chunk)


@given(ops=st.lists(mixed_ops(), max_size=15), data=st.data())
def test_receive_buffer_mixed_modes(ops: list[Op], data: st.DataObject) -> None:
    wire = b"".join(op_wire(op) for op in ops)
    for chunks in chunkings(data, wire):
        buffer = ReceiveBuffer()
        pending = iter(chunks)
        for kind, parameter, expected in ops:
            if kind == "some":
                got = b""
                while len(got) < len(expected):
                    part = buffer.extract_some(len(expected) - len(got))
                    assert len(part) <= len(expected) - len(got)
                    if not part:
                        feed_more(buffer, pending)
                    got += part
                assert got == expected
                continue
            while True:
                before = len(buffer)
                result: bytes | None
                if kind == "line":
                    result = buffer.extract_line(parameter, MIXED_MAX_LENGTH)
                elif kind == "frame":
                    header_size = parameter[0]
                    result = buffer.extract_frame(header_size, MIXED_MAX_SIZE)
                    if result is None:
                        missing = buffer.missing_for_frame(header_size, MIXED_MAX_SIZE)
                        if before < header_size:
                            assert missing == header_size - before
                        else:
                            assert missing == header_size + len(expected) - before
                else:
                    result = buffer.extract_exactly(len(expected))
                if result is not None:
                    break
                assert len(buffer) == before, "a failed extract changed the buffer"
                feed_more(buffer, pending)
            assert result == expected
        assert len(buffer) == 0
        assert next(pending, None) is None


def test_extract_some_returns_buffered_bytes_first() -> None:
    buffer = ReceiveBuffer()
    buffer.feed(b"hello\nwor")
    assert buffer.extract_line(b"\n", 100) == b"hello"
    assert buffer.extract_some(2) == b"wo"
    buffer.feed(b"ld")
    assert buffer.extract_some() == b"rld"
    assert buffer.extract_some() == b""
    assert buffer.extract_some(5) == b""


def test_extract_some_after_failed_line_search() -> None:
    # A failed search remembers how far it got; removing bytes from the front
    # must keep that position right.
    buffer = ReceiveBuffer()
    buffer.feed(b"abcdef")
    assert buffer.extract_line(b"\r\n", 100) is None
    assert buffer.extract_some(4) == b"abcd"
    assert buffer.extract_line(b"\r\n", 100) is None
    buffer.feed(b"\r")
    assert buffer.extract_line(b"\r\n", 100) is None
    assert buffer.extract_exactly(1) == b"e"
    buffer.feed(b"\n")
    assert buffer.extract_line(b"\r\n", 100) == b"f"
    # And a search for another delimiter starts from the front again.
    buffer.feed(b"x\ny")
    assert buffer.extract_line(b"\r\n", 100) is None
    assert buffer.extract_line(b"\n", 100) == b"x"
    assert buffer.extract_some() == b"y"
    assert len(buffer) == 0
    assert not buffer


# --------------------------------------------------------------------------
# 5. Linear time, counted rather than timed


def _index(value: SupportsIndex | None, default: int) -> int:
    return default if value is None else operator.index(value)


class CountingBytearray(bytearray):
    """A bytearray that adds up the bytes each find()/rfind() call may look at."""

    searched = 0

    def _count(self, start: SupportsIndex | None, end: SupportsIndex | None) -> None:
        begin = _index(start, 0)
        stop = _index(end, len(self))
        assert begin >= 0, "negative start offsets are not expected here"
        self.searched += max(0, min(stop, len(self)) - begin)

    def find(
        self,
        sub: ReadableBuffer | SupportsIndex,
        start: SupportsIndex | None = None,
        end: SupportsIndex | None = None,
        /,
    ) -> int:
        self._count(start, end)
        return super().find(sub, start, end)

    def rfind(
        self,
        sub: ReadableBuffer | SupportsIndex,
        start: SupportsIndex | None = None,
        end: SupportsIndex | None = None,
        /,
    ) -> int:
        self._count(start, end)
        return super().rfind(sub, start, end)


class CountingBuffer(ReceiveBuffer):
    """A ReceiveBuffer whose storage counts the bytes it searches."""

    __slots__ = ("counter",)

    def __init__(self) -> None:
        super().__init__()
        self.counter = CountingBytearray()
        self._data = self.counter


def test_counting_buffer_sees_the_searches() -> None:
    # The instrumentation itself: the buffer keeps (and searches) our bytearray.
    buffer = CountingBuffer()
    buffer.feed(b"abc")
    assert buffer.extract_line(b"\n", 100) is None
    assert buffer.counter.searched == 3
    buffer.feed(b"\n")
    assert Lines().extract_all(buffer) == [b"abc"]
    assert buffer.counter.searched > 3
    assert buffer._data is buffer.counter


KiB = 1024


@pytest.mark.parametrize(
    ("delimiter", "filler", "method", "size"),
    [
        (b"\n", b"x", "extract", 256 * KiB),
        (b"\n", b"x", "extract_all", 256 * KiB),
        (b"\r\n", b"\r", "extract", 256 * KiB),
        (b"\r\n", b"\r", "extract_all", 256 * KiB),
        (b"\n", b"x", "extract", 1024 * KiB),
        (b"\n", b"x", "extract_all", 1024 * KiB),
    ],
)
def test_long_line_one_byte_at_a_time_is_linear(
    delimiter: bytes, filler: bytes, method: str, size: int
) -> None:
    framing = Lines(delimiter=delimiter, max_length=size)
    buffer = CountingBuffer()
    extract = framing.extract if method == "extract" else framing.extract_all
    for _ in range(size):
        buffer.feed(filler)
        assert not extract(buffer)
    for byte in bytewise(delimiter[:-1]):
        buffer.feed(byte)
        assert not extract(buffer)
    buffer.feed(delimiter[-1:])
    result = extract(buffer)
    line = filler * size
    assert result == (line if method == "extract" else [line])
    assert len(buffer) == 0
    # Each attempt may look again at the last len(delimiter) - 1 bytes (a
    # delimiter may be split across chunks) and extract_all searches twice
    # (rfind, then find); rescanning the line would cost about size**2 / 2.
    assert buffer.counter.searched <= 2 * len(delimiter) * size + 64


@pytest.mark.parametrize("method", ["extract", "extract_all"])
def test_many_lines_one_byte_at_a_time_is_linear(method: str) -> None:
    framing = Lines(delimiter=b"\r\n")
    lines = [b"y" * (n * 37 % 1500) for n in range(400)]
    wire = b"".join(framing.encode(line) for line in lines) + b"z" * 3000
    buffer = CountingBuffer()
    out: list[bytes] = []
    for byte in bytewise(wire):
        buffer.feed(byte)
        if method == "extract":
            while (line := framing.extract(buffer)) is not None:
                out.append(line)
        else:
            out.extend(framing.extract_all(buffer))
    assert out == lines
    assert len(buffer) == 3000
    assert buffer.counter.searched <= 2 * 2 * len(wire) + 64


# --------------------------------------------------------------------------
# 6. Lines validation and encoding


def test_lines_config_validation() -> None:
    with pytest.raises(ValueError):
        Lines(delimiter=b"")
    with pytest.raises(ValueError):
        Lines(delimiter="\n")  # type: ignore[arg-type]  # str is refused at run time
    with pytest.raises(ValueError):
        Lines(max_length=-1)
    assert Lines().delimiter == b"\n"
    assert Lines().max_length == 65536


@pytest.mark.parametrize("delimiter", DELIMITERS)
def test_lines_encode(delimiter: bytes) -> None:
    framing = Lines(delimiter=delimiter, max_length=6)
    assert framing.encode(b"abc") == b"abc" + delimiter
    assert framing.encode(bytearray(b"abc")) == b"abc" + delimiter
    assert framing.encode(memoryview(b"abc")) == b"abc" + delimiter
    assert framing.encode(b"") == delimiter
    assert framing.encode("h\u00e9") == "h\u00e9".encode() + delimiter
    # Fragments of the delimiter are fine; the delimiter itself is not.
    fragment = delimiter[:-1]
    assert framing.encode(fragment) == fragment + delimiter
    with pytest.raises(ValueError) as info:
        framing.encode(b"a" + delimiter + b"b")
    assert not isinstance(info.value, MessageTooLarge)
    with pytest.raises(ValueError):
        framing.encode(delimiter)
    assert framing.encode(b"x" * 6) == b"x" * 6 + delimiter
    with pytest.raises(MessageTooLarge):
        framing.encode(b"x" * 7)
    # max_length counts bytes, not characters: 4 characters, 8 bytes.
    with pytest.raises(MessageTooLarge):
        framing.encode("\u00e9" * 4)


def test_as_bytes() -> None:
    assert as_bytes(b"ab") == b"ab"
    assert as_bytes("\u00e9") == "\u00e9".encode()
    assert type(as_bytes(bytearray(b"ab"))) is bytes
    assert type(as_bytes(memoryview(b"ab"))) is bytes
    with pytest.raises(TypeError):
        as_bytes(3)  # type: ignore[arg-type]  # wrong on purpose


# --------------------------------------------------------------------------
# Known issue: delimiters that overlap themselves


@pytest.mark.parametrize(
    ("delimiter", "wire"),
    [(b"\n\n", b"a\n\n\n"), (b"\r\n\r\n", b"x\r\n\r\n\r\n"), (b"--", b"a---")],
)
def test_lines_self_overlapping_delimiter(delimiter: bytes, wire: bytes) -> None:
    # messages() must cut where a left-to-right search cuts, even when the
    # delimiter overlaps itself.
    framing = Lines(delimiter=delimiter)
    one_by_one, first = decode(framing, [wire], collect_next)
    all_at_once, second = decode(framing, [wire], collect_messages)
    assert all_at_once == one_by_one
    assert second.buffered == first.buffered


# --------------------------------------------------------------------------
# 7. Exceptions


def test_exception_hierarchy() -> None:
    assert issubclass(ConnectionClosed, TrionetError)
    assert issubclass(IncompleteMessage, ConnectionClosed)
    assert issubclass(ProtocolError, TrionetError)
    assert issubclass(LineTooLong, ProtocolError)
    assert issubclass(FrameTooLarge, ProtocolError)
    assert issubclass(MessageTooLarge, TrionetError)
    assert issubclass(MessageTooLarge, ValueError)
    assert issubclass(ConnectError, TrionetError)
    assert issubclass(ConnectError, OSError)
    # Peer errors are not caller errors, and closing is not a protocol error.
    assert not issubclass(ProtocolError, ValueError)
    assert not issubclass(ConnectionClosed, ProtocolError)
    assert not issubclass(ConnectionClosed, OSError)


@pytest.mark.parametrize("reason", list(CloseReason))
def test_exceptions_carry_their_reason(reason: CloseReason) -> None:
    closed = ConnectionClosed(reason)
    assert closed.reason is reason
    assert reason.value in str(closed)
    assert str(ConnectionClosed(reason, "custom words")) == "custom words"

    incomplete = IncompleteMessage(reason, b"part")
    assert incomplete.reason is reason
    assert incomplete.partial == b"part"
    assert "4 bytes" in str(incomplete)

    with pytest.raises(ConnectionClosed) as info:
        raise IncompleteMessage(reason, b"")
    assert info.value.reason is reason

    connect = ConnectError(reason, "no route")
    assert connect.reason is reason
    assert str(connect) == "no route"
    with pytest.raises(OSError):
        raise connect


def test_close_reason_members() -> None:
    assert [member.name for member in CloseReason] == [
        "CLOSED_BY_HOST",
        "CLOSED_BY_PEER",
        "TIMEOUT",
        "ERROR",
        "PROTOCOL_ERROR",
        "REJECTED",
        "SHUTDOWN",
        "SLOW_CONSUMER",
    ]
    assert len({member.value for member in CloseReason}) == 8
    assert repr(CloseReason.TIMEOUT) == "CloseReason.TIMEOUT"
