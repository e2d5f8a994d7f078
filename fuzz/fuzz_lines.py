"""Fuzz target for the Lines codec, driven through :class:`trionet.Decoder`.

Run it (atheris is an optional extra: ``pip install atheris``)::

    python fuzz/fuzz_lines.py -runs=10000000 -print_final_stats=1

The input chooses a delimiter, a ``max_length``, how the rest of the input is
cut into chunks, whether lines are taken one at a time or in batches and
whether ``strip_cr`` is on; the rest is the byte stream.  The only outcomes
allowed are whole lines or :class:`trionet.LineTooLong` (a
:class:`trionet.ProtocolError`).  Checked on every input:

* the lines equal a one-shot, left-to-right reference decode of the same bytes,
  and the decoder fails exactly when the reference finds a line too long:
  chunking changes nothing;
* while the decoder waits for more bytes it holds fewer than
  ``max_length + len(delimiter)`` of them (one more with ``strip_cr``);
* every byte is accounted for: lines, their delimiters and what is still
  buffered add up to what was fed, and the end-of-stream verdict reports the
  buffered tail;
* a decoder that failed stays failed, with the same error.
"""

from __future__ import annotations

from _harness import Choices, cut, run

from trionet import Decoder, IncompleteMessage, Lines, LineTooLong, ProtocolError

DELIMITERS = (b"\n", b"\r\n", b"\x00", b"\n\n", b"\r\n\r\n", b"aba")
MAX_LENGTHS = (0, 1, 2, 3, 5, 16, 100, 65536)
MAX_CHUNKS = (1, 2, 3, 16, 256, 4096)


def reference(
    data: bytes, delimiter: bytes, max_length: int, strip_cr: bool = False
) -> tuple[list[bytes], bool, int]:
    """Every line of ``data`` cut left to right, whether one is too long, and
    how many bytes the lines and their line ends took."""
    lines: list[bytes] = []
    pos = 0
    width = len(delimiter)
    # The longest a line may be with its \r, when strip_cr removes one.
    room = max_length + 1 if strip_cr else max_length
    while True:
        end = data.find(delimiter, pos)
        if end < 0:
            # No delimiter: too long once no delimiter could still end it in time.
            return lines, len(data) - pos >= room + width, pos
        line = data[pos:end]
        if strip_cr and line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > max_length:
            return lines, True, pos
        lines.append(line)
        pos = end + width


def check(data: bytes) -> None:
    """Decode the stream described by ``data``; raise AssertionError on a defect."""
    choices = Choices(data)
    delimiter = choices.pick(DELIMITERS)
    max_length = choices.pick(MAX_LENGTHS)
    sizes = choices.chunker(choices.pick(MAX_CHUNKS))
    mode = choices.byte()
    batched, strip_cr = mode & 1, bool(mode & 2)
    stream = choices.rest()

    framing = Lines(delimiter=delimiter, max_length=max_length, strip_cr=strip_cr)
    decoder = Decoder(framing)
    got: list[bytes] = []
    failure: ProtocolError | None = None
    fed = 0
    for piece in cut(stream, sizes):
        decoder.feed(piece)
        fed += len(piece)
        try:
            if batched:
                while batch := decoder.messages():
                    got.extend(batch)
            else:
                while (line := decoder.next_message()) is not None:
                    got.append(line)
        except ProtocolError as exc:
            assert isinstance(exc, LineTooLong), repr(exc)
            failure = exc
            break
        limit = max_length + len(delimiter) + strip_cr
        assert decoder.buffered < limit, decoder.buffered

    expected, too_long, consumed = reference(stream, delimiter, max_length, strip_cr)
    assert got == expected, (got, expected)
    assert (failure is not None) == too_long, (failure, too_long)
    for line in got:
        assert len(line) <= max_length
        assert delimiter not in line

    if failure is not None:
        # A failed decoder stays failed, with the same error.
        for call in (decoder.next_message, decoder.messages, decoder.end_of_stream):
            try:
                call()
            except ProtocolError as again:
                assert again is failure
            else:
                raise AssertionError("a failed decoder decoded again")
        return

    if not strip_cr:
        assert consumed == sum(len(line) + len(delimiter) for line in got)
    assert consumed + decoder.buffered == fed == len(stream)
    try:
        decoder.end_of_stream()
    except IncompleteMessage as exc:
        assert exc.partial == stream[consumed:] != b""
    else:
        assert consumed == len(stream)


def main() -> None:
    """Run under atheris (command-line options go to libFuzzer)."""
    run(check)


if __name__ == "__main__":
    main()
