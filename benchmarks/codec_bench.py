"""Socket-free codec benchmark: trionet.Decoder against the hand-written parser.

A stream of 64-byte lines, or of 1 KiB payloads in 4-byte length-prefixed
frames, is cut into 64 KiB chunks up front (as ``recv`` would hand them
over); the timed loop feeds every chunk and takes out every whole message:

* ``trionet``: ``decoder.feed(chunk)`` then ``decoder.messages()``;
* ``bare``: the parser of the bare trio echo server
  (``servers/_common.py``): ``parser.feed(chunk)`` then ``parser.next()``
  until it returns None.

One run per process (``run.py`` starts a fresh interpreter each time and
interleaves them); prints one JSON object.  Run by hand::

    python benchmarks/codec_bench.py lines trionet --size-mib 64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent / "servers"))

import _common

import trionet

LINE = b"x" * 63 + b"\n"
FRAME_PAYLOAD = bytes(range(256)) * 4


def make_stream(kind: str, size: int) -> tuple[bytes, int, bytes]:
    """About ``size`` bytes of whole messages, the message count, the last message."""
    if kind == "lines":
        count = size // len(LINE)
        return LINE * count, count, LINE[:-1]
    frame = _common.encode("frames", FRAME_PAYLOAD)
    count = size // len(frame)
    return frame * count, count, FRAME_PAYLOAD


def run(kind: str, impl: str, size: int, chunk: int) -> dict[str, Any]:
    stream, expected, last_expected = make_stream(kind, size)
    chunks = [stream[i : i + chunk] for i in range(0, len(stream), chunk)]
    del stream
    count = 0
    last: bytes | None = None
    if impl == "trionet":
        framing: trionet.Framing = (
            trionet.Lines() if kind == "lines" else trionet.Frames()
        )
        decoder = trionet.Decoder(framing)
        t0 = time.perf_counter()
        c0 = time.process_time()
        for piece in chunks:
            decoder.feed(piece)
            messages = decoder.messages()
            if messages:
                count += len(messages)
                last = messages[-1]
    else:
        parser = _common.parser_for(kind)()
        t0 = time.perf_counter()
        c0 = time.process_time()
        for piece in chunks:
            parser.feed(piece)
            while (message := parser.next()) is not None:
                count += 1
                last = message
    cpu = time.process_time() - c0
    seconds = time.perf_counter() - t0
    if count != expected or last != last_expected:
        raise AssertionError(f"{impl} decoded {count} messages, expected {expected}")
    total = sum(map(len, chunks))
    return {"messages": count, "bytes": total, "seconds": seconds, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("lines", "frames"))
    parser.add_argument("impl", choices=("trionet", "bare"))
    parser.add_argument("--size-mib", type=float, default=64.0)
    parser.add_argument("--chunk", type=int, default=65536)
    args = parser.parse_args()
    result = run(args.kind, args.impl, int(args.size_mib * 1024 * 1024), args.chunk)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
