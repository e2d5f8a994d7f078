"""Fuzz target for the Frames codec, driven through :class:`trionet.Decoder`.

Run it (atheris is an optional extra: ``pip install atheris``)::

    python fuzz/fuzz_frames.py -runs=10000000 -print_final_stats=1

The input chooses a header size (1, 2, 4 or 8 bytes), a ``max_size``, how
the rest of the input is cut into chunks and whether frames are taken one at
a time or in batches; the rest is the byte stream (so headers announcing
anything up to 2**64 - 1 bytes turn up).  The only outcomes allowed are whole
frames or :class:`trionet.FrameTooLarge` (a :class:`trionet.ProtocolError`).
Checked on every input:

* the payloads equal a one-shot reference decode, and the decoder fails
  exactly when the reference meets a header announcing more than
  ``max_size``: chunking changes nothing;
* while the decoder waits for more bytes it holds less than one header plus
  ``max_size`` -- never anything sized from an announced length;
* every byte is accounted for, and the end-of-stream verdict reports the
  buffered tail;
* a decoder that failed stays failed, with the same error.
"""

from __future__ import annotations

from _harness import Choices, cut, run

from trionet import Decoder, Frames, FrameTooLarge, IncompleteMessage, ProtocolError

HEADER_SIZES = (1, 2, 4, 8)
MAX_SIZES = (0, 1, 2, 7, 200, 255, 256, 1000, 65535, 1 << 20)
MAX_CHUNKS = (1, 2, 3, 16, 256, 4096)


def reference(data: bytes, header_size: int, max_size: int) -> tuple[list[bytes], bool]:
    """Every complete frame of ``data``, and whether a header is over the limit."""
    frames: list[bytes] = []
    pos = 0
    while len(data) - pos >= header_size:
        length = int.from_bytes(data[pos : pos + header_size], "big")
        if length > max_size:
            return frames, True
        end = pos + header_size + length
        if end > len(data):
            break
        frames.append(data[pos + header_size : end])
        pos = end
    return frames, False


def check(data: bytes) -> None:
    """Decode the stream described by ``data``; raise AssertionError on a defect."""
    choices = Choices(data)
    header_size = choices.pick(HEADER_SIZES)
    max_size = min(choices.pick(MAX_SIZES), (1 << (8 * header_size)) - 1)
    sizes = choices.chunker(choices.pick(MAX_CHUNKS))
    batched = choices.byte() & 1
    stream = choices.rest()

    decoder = Decoder(Frames(max_size=max_size, header_size=header_size))
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
                while (frame := decoder.next_message()) is not None:
                    got.append(frame)
        except ProtocolError as exc:
            assert isinstance(exc, FrameTooLarge), repr(exc)
            failure = exc
            break
        assert decoder.buffered < header_size + max_size, decoder.buffered

    expected, too_large = reference(stream, header_size, max_size)
    assert got == expected, (got, expected)
    assert (failure is not None) == too_large, (failure, too_large)
    assert all(len(frame) <= max_size for frame in got)

    if failure is not None:
        for call in (decoder.next_message, decoder.messages, decoder.end_of_stream):
            try:
                call()
            except ProtocolError as again:
                assert again is failure
            else:
                raise AssertionError("a failed decoder decoded again")
        return

    consumed = sum(header_size + len(frame) for frame in got)
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
