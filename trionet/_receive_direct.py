"""Receiving the body of a large message outside the shared receive buffer.

How this works
--------------
A frame (or ``receive_exactly``) of which ``DIRECT_RECEIVE_MIN`` bytes have
arrived and at least as many are still missing is received with ``recv_into``
straight into pieces of its own that double in size, each no larger than what
has arrived so far, and joined once at the end: one copy fewer, and as few
``recv`` calls as the kernel allows.  Waiting for bytes to arrive first keeps
the rule that memory follows what arrived, never what a header announced.
What arrived goes back to the receive buffer if the receive is cancelled or
fails, so nothing is lost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from ._codec import Frames

if TYPE_CHECKING:
    from ._connection import Connection

__all__ = ["DIRECT_RECEIVE_MIN", "large_body", "receive_direct"]

#: A message of which this many bytes have arrived and at least as many are
#: missing receives the rest straight into buffers of its own.
DIRECT_RECEIVE_MIN = 256 * 1024


def large_body(
    conn: Connection, frames: Frames | None, exactly: int
) -> tuple[int, int] | None:
    """``(header size, body size)`` of the message to receive directly, or
    None if it is not large enough (or not known yet)."""
    buffer = conn._receive_buffer
    buffered = len(buffer)
    if buffered < DIRECT_RECEIVE_MIN:
        return None
    if frames is None:
        header, size = 0, exactly
    else:
        header = frames.header_size
        size = buffer.frame_length(header, frames.max_size) or 0
    if header + size - buffered < DIRECT_RECEIVE_MIN:
        return None
    return header, size


async def receive_direct(conn: Connection, header_size: int, size: int) -> bytes:
    """Receive the rest of a large message's body outside the receive buffer."""
    buffer = conn._receive_buffer
    header = buffer.extract_exactly(header_size) or b""
    pieces: list[bytes | bytearray] = [buffer.extract_some(size)]
    got = len(pieces[0])
    if conn.message_timeout is not None and conn._message_started is None:
        conn._message_started = trio.current_time()
    try:
        while got < size:
            piece = bytearray(min(size - got, got))
            pieces.append(piece)
            filled = 0
            while filled < len(piece):
                count = await conn._fill(memoryview(piece)[filled:])
                if count == 0:
                    break
                filled += count
                got += count
            if filled < len(piece):
                break  # end of stream
    except BaseException:
        buffer.unread(header + b"".join(pieces)[:got])
        raise
    if got < size:
        buffer.unread(header + b"".join(pieces)[:got])
        raise conn._end_of_stream_error()
    conn._message_started = None
    return b"".join(pieces)
