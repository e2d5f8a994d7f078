"""Lines(strip_cr=True): lines ended by ``\\n`` or ``\\r\\n``, one ``\\r`` removed.

Decoded whole, one byte at a time and in random splits (hypothesis), one
line at a time and in batches, with trailing bytes; the length verdict must
not depend on the chunking, and the removed ``\\r`` does not count toward
``max_length``.
"""

from __future__ import annotations

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from trionet import Decoder, Lines, LineTooLong, ProtocolError
from trionet._codec import ReceiveBuffer
from trionet.testing import ChunkedStream, connection_pair

from .test_codec import COLLECTORS, assert_round_trip, chunkings

DELIMITERS = [b"\n", b"\r\n", b"END"]


def content(delimiter: bytes, max_length: int) -> st.SearchStrategy[bytes]:
    """0..max_length bytes, rich in ``\\r`` and delimiter bytes, no delimiter."""
    byte = st.sampled_from(sorted({*b"\r\nab", *delimiter}))
    return (
        st.lists(byte, max_size=max_length)
        .map(bytes)
        .filter(lambda data: delimiter not in data + delimiter[:-1])
    )


def ending(line: bytes, delimiter: bytes, crlf: bool) -> bytes:
    """How ``line`` may end on the wire: with ``\\r`` + delimiter, or (when
    it does not end in ``\\r`` itself) the delimiter alone."""
    return b"\r" + delimiter if crlf or line.endswith(b"\r") else delimiter


@st.composite
def cr_streams(draw: st.DrawFn) -> tuple[Lines, list[bytes], bytes, bytes]:
    delimiter = draw(st.sampled_from(DELIMITERS))
    max_length = draw(st.integers(0, 12))
    lines = draw(st.lists(content(delimiter, max_length), max_size=10))
    crlf = draw(st.lists(st.booleans(), min_size=len(lines), max_size=len(lines)))
    wire = b"".join(
        line + ending(line, delimiter, cr) for line, cr in zip(lines, crlf, strict=True)
    )
    # Trailing bytes that do not complete a line.
    trailing = draw(content(delimiter, max_length))
    if (trailing + b"\r" + delimiter).find(delimiter) < len(trailing):
        trailing = b""
    framing = Lines(delimiter=delimiter, max_length=max_length, strip_cr=True)
    return framing, lines, wire, trailing


@given(stream=cr_streams(), data=st.data())
def test_strip_cr_round_trip(
    stream: tuple[Lines, list[bytes], bytes, bytes], data: st.DataObject
) -> None:
    framing, lines, wire, trailing = stream
    assert_round_trip(
        framing, [[wire + trailing], *chunkings(data, wire + trailing)], lines, trailing
    )


@settings(deadline=None)
@given(
    delimiter=st.sampled_from(DELIMITERS),
    max_length=st.integers(0, 10),
    delta=st.integers(-2, 2),
    crlf=st.booleans(),
    before=st.integers(0, 3),
    data=st.data(),
)
def test_length_verdict_ignores_the_cr_and_the_chunking(
    delimiter: bytes,
    max_length: int,
    delta: int,
    crlf: bool,
    before: int,
    data: st.DataObject,
) -> None:
    framing = Lines(delimiter=delimiter, max_length=max_length, strip_cr=True)
    target = b"x" * max(0, max_length + delta)
    good = [b"ok"[:max_length]] * before
    wire = b"".join(line + b"\r" + delimiter for line in good)
    wire += target + (b"\r" + delimiter if crlf else delimiter) + b"\r" + delimiter
    too_long = len(target) > max_length
    for chunks in [[wire], *chunkings(data, wire)]:
        for collect in COLLECTORS:
            decoder = Decoder(framing)
            out: list[bytes] = []
            error: ProtocolError | None = None
            for chunk in chunks:
                decoder.feed(chunk)
                try:
                    collect(decoder, out)
                except ProtocolError as exc:
                    error = exc
                    break
                # Waiting for more, it holds no more than a line may need.
                assert decoder.buffered <= max_length + 1 + len(delimiter) - 1 + len(
                    chunk
                )
            if too_long:
                assert isinstance(error, LineTooLong)
                assert f"max_length={max_length}" in str(error)
                assert out == good
            else:
                assert error is None
                assert out == [*good, target, b""]


def test_both_line_ends_and_only_one_cr() -> None:
    decoder = Decoder(Lines(strip_cr=True))
    decoder.feed(b"unix\ndos\r\ntwo cr\r\r\n\r\n\n")
    assert decoder.messages() == [b"unix", b"dos", b"two cr\r", b"", b""]


def test_default_keeps_the_cr() -> None:
    decoder = Decoder(Lines())
    decoder.feed(b"dos\r\n")
    assert decoder.messages() == [b"dos\r"]


def test_max_length_counts_the_content_only() -> None:
    framing = Lines(max_length=3, strip_cr=True)
    decoder = Decoder(framing)
    decoder.feed(b"abc\r\nabc\n")
    assert decoder.messages() == [b"abc", b"abc"]
    decoder.feed(b"abcd\n")
    with pytest.raises(LineTooLong, match="4 bytes is longer than max_length=3"):
        decoder.messages()
    # With no line end yet: refused once no line end could come in time.
    decoder = Decoder(framing)
    decoder.feed(b"abcd")
    assert decoder.next_message() is None  # "abc" + "\r" + "\n" may still come
    decoder.feed(b"e")
    with pytest.raises(LineTooLong, match="max_length=3"):
        decoder.next_message()


def test_batch_stops_before_a_too_long_line() -> None:
    # Lines before a too-long one come first; the next call raises, and the
    # bytes after the good lines were given back as they arrived.
    buffer = ReceiveBuffer()
    buffer.feed(b"a\r\nb\nTOOLONG\nlater\r\n")
    framing = Lines(max_length=2, strip_cr=True)
    assert framing.extract_all(buffer) == [b"a", b"b"]
    assert buffer.peek() == b"TOOLONG\nlater\r\n"
    with pytest.raises(LineTooLong):
        framing.extract_all(buffer)


def test_encode_is_unchanged() -> None:
    assert Lines(strip_cr=True).encode(b"x") == b"x\n"
    assert Lines(b"\r\n", strip_cr=True).encode(b"x") == b"x\r\n"
    with pytest.raises(TypeError):
        Lines(strip_cr=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
async def test_connection_reads_both_line_ends(chunk_size: int) -> None:
    framing = Lines(strip_cr=True)
    async with connection_pair(
        framing, wrap=lambda s: ChunkedStream(s, chunk_size=chunk_size)
    ) as (client, server):
        await client.send_all(b"one\r\ntwo\nthree\r\nRAW\r\n")
        with trio.fail_after(5):
            assert await server.receive() == b"one"
            assert await server.receive_line() == b"two"
            async for line in server:
                assert line == b"three"
                break
            # Switching to raw bytes after receive(): exactly what was sent.
            assert await server.receive_exactly(5) == b"RAW\r\n"


async def test_connection_gives_back_exactly_what_arrived() -> None:
    # Whole lines in one chunk, then a switch to raw bytes: the \r of lines
    # not yet taken is still there.
    async with connection_pair(Lines(strip_cr=True)) as (client, server):
        await client.send_all(b"a\r\nb\r\nc\n")
        assert await server.receive() == b"a"
        with trio.fail_after(5):
            assert await server.receive_exactly(5) == b"b\r\nc\n"
