"""Fuzz target for mixed receive modes on one :class:`ReceiveBuffer`.

Run it (atheris is an optional extra: ``pip install atheris``)::

    python fuzz/fuzz_mixed.py -runs=10000000 -print_final_stats=1

A :class:`trionet.Connection` reads every receive mode from one buffer: a
header line, then exactly N bytes, then a frame, with batched receives whose
messages are given back (re-encoded) when another mode is used.  The input
here is a script of such operations -- feed a chunk, extract a line, all
lines, exactly n bytes, a frame, all frames, some bytes, or cut a batch and
give it back -- run against the real buffer and against a plain ``bytes``
model of what it should hold.  The only outcomes allowed are what the model
predicts, or :class:`trionet.ProtocolError` exactly when the model says the
peer broke a limit.  Checked after every operation:

* the result and the buffered bytes equal the model's;
* an extraction that needs more data leaves fewer bytes buffered than its
  limit: ``max_length + len(delimiter)`` for lines, one header plus
  ``max_size`` for frames, ``n`` for exactly-n;
* giving a batch back leaves the buffer exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from _harness import Choices, run

from trionet import Frames, FrameTooLarge, Lines, LineTooLong, ProtocolError
from trionet._codec import ReceiveBuffer

DELIMITERS = (b"\n", b"\r\n", b"\n\n", b"aba")
MAX_LENGTHS = (0, 1, 3, 8, 64)
HEADER_SIZES = (1, 2, 4, 8)
MAX_SIZES = (0, 1, 5, 64, 255)
#: Operations in a script; one more than the last index means "stop".
FEED, LINE, LINES, EXACTLY, FRAME, FRAMES, SOME, GIVE_BACK = range(8)


class Model:
    """What the buffer should hold, and what each extraction should return."""

    def __init__(self, lines: Lines, frames: Frames) -> None:
        self.data = b""
        self.lines = lines
        self.frames = frames

    def line(self) -> bytes | None:
        """The next line (consumed), None, or LineTooLong."""
        delimiter, max_length = self.lines.delimiter, self.lines.max_length
        end = self.data.find(delimiter)
        if end < 0:
            if len(self.data) >= max_length + len(delimiter):
                raise LineTooLong("model")
            return None
        if end > max_length:
            raise LineTooLong("model")
        line = self.data[:end]
        self.data = self.data[end + len(delimiter) :]
        return line

    def frame(self) -> bytes | None:
        """The next frame's payload (consumed), None, or FrameTooLarge."""
        size = self.frames.header_size
        if len(self.data) < size:
            return None
        length = int.from_bytes(self.data[:size], "big")
        if length > self.frames.max_size:
            raise FrameTooLarge("model")
        if len(self.data) < size + length:
            return None
        payload = self.data[size : size + length]
        self.data = self.data[size + length :]
        return payload

    def all(self, one: str) -> list[bytes]:
        """Every message before the first bad one; raise only if there is none."""
        extract = self.line if one == "line" else self.frame
        out: list[bytes] = []
        while True:
            saved = self.data
            try:
                message = extract()
            except ProtocolError:
                if not out:
                    raise
                self.data = saved
                return out
            if message is None:
                return out
            out.append(message)


def _outcome(call: Callable[[], object]) -> tuple[str, object]:
    try:
        return "ok", call()
    except ProtocolError as exc:
        return "refused", type(exc)


def check(data: bytes) -> None:
    """Run the operation script in ``data``; raise AssertionError on a defect."""
    choices = Choices(data)
    lines = Lines(
        delimiter=choices.pick(DELIMITERS), max_length=choices.pick(MAX_LENGTHS)
    )
    header_size = choices.pick(HEADER_SIZES)
    frames = Frames(max_size=choices.pick(MAX_SIZES), header_size=header_size)
    buffer = ReceiveBuffer()
    model = Model(lines, frames)

    for _step in range(len(data)):
        op = choices.byte() % 9
        if op > GIVE_BACK:
            break
        if op == FEED:
            chunk = choices.take(1 + choices.byte() % 32)
            if not chunk:
                break
            buffer.feed(chunk)
            model.data += chunk
            continue
        argument = choices.byte()
        n = argument % 40
        limit: int | None = None  # what an unfinished extraction may leave buffered
        if op == LINE:
            expected = _outcome(model.line)
            result = _outcome(lambda: lines.extract(buffer))
            limit = lines.max_length + len(lines.delimiter)
        elif op == LINES:
            expected = _outcome(lambda: model.all("line"))
            result = _outcome(lambda: lines.extract_all(buffer))
        elif op == EXACTLY:
            expected = ("ok", model.data[:n] if len(model.data) >= n else None)
            if expected[1] is not None:
                model.data = model.data[n:]
            result = _outcome(partial(buffer.extract_exactly, n))
            limit = n
        elif op == FRAME:
            expected = _outcome(model.frame)
            result = _outcome(lambda: frames.extract(buffer))
            limit = header_size + frames.max_size
        elif op == FRAMES:
            expected = _outcome(lambda: model.all("frame"))
            result = _outcome(lambda: frames.extract_all(buffer))
        elif op == SOME:
            size = n or None
            expected = ("ok", model.data[:size])
            model.data = model.data[size:] if size is not None else b""
            result = _outcome(partial(buffer.extract_some, size))
        else:
            # A batched receive, then another mode: the batch goes back.
            framing: Lines | Frames = lines if argument & 1 else frames
            before = model.data
            expected = _outcome(
                partial(model.all, "line" if framing is lines else "frame")
            )
            model.data = before

            def cut_and_give_back(framing: Lines | Frames = framing) -> list[bytes]:
                batch = framing.extract_all(buffer)
                buffer.unread(b"".join(map(framing.encode, batch)))
                return batch

            result = _outcome(cut_and_give_back)
        assert result == expected, (op, result, expected)
        if result[0] == "refused":
            return  # the connection would close here (PROTOCOL_ERROR)
        assert buffer.peek() == model.data, (op, buffer.peek(), model.data)
        if result[1] is None and limit is not None:
            assert len(buffer) < limit, (op, len(buffer), limit)


def main() -> None:
    """Run under atheris (command-line options go to libFuzzer)."""
    run(check)


if __name__ == "__main__":
    main()
