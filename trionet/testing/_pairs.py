"""connection_pair: two connected Connections over in-memory streams.

How this works
--------------

trio's :func:`trio.testing.memory_stream_pair` (or, with ``lockstep=True``,
:func:`trio.testing.lockstep_stream_pair`) gives two connected, half-closeable
streams that never touch a socket.  Each side becomes a
:class:`~trionet.Connection`; the optional ``wrap`` callable is applied to the
second side's stream first, so a fault-injection wrapper from
:mod:`trionet.testing` decides what that side receives and how its sends go.

With ``queued=True`` the second side is built the way a server builds the
connections it hands to handlers: with a bounded send queue whose writer task
runs in a nursery of our own.  That nursery is hidden inside the ``async
with``, so exceptions raised by the caller's block are unwrapped from the
one-exception group trio puts them in.

On exit the first side is closed before the second: a queued side still
flushing into a lockstep stream then fails fast instead of waiting for a
reader that will never come.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio
import trio.testing

from .._codec import Framing
from .._connection import Connection
from .._sending import QueuedSendPath, SendLimits
from .._transport import StreamTransport
from .._util import unwrap_single_exception

__all__ = ["connection_pair"]


@asynccontextmanager
async def connection_pair(
    framing: Framing | None = None,
    *,
    queued: bool = False,
    lockstep: bool = False,
    wrap: Callable[[trio.abc.Stream], trio.abc.Stream] | None = None,
) -> AsyncIterator[tuple[Connection, Connection]]:
    """Two connected :class:`~trionet.Connection` objects, no sockets involved.

    For unit-testing protocol code: whatever one side sends, the other
    receives.  Both sides are closed when the block exits (a side already
    closed stays as it was)::

        async with trionet.testing.connection_pair(trionet.Lines()) as (a, b):
            await a.send("hello")
            assert await b.receive() == b"hello"

    A handler written for :func:`trionet.serve_tcp` can be run on the second
    side directly (``nursery.start_soon(handler, b)``) and driven from the
    first.  Closing one side with :meth:`~trionet.Connection.aclose` gives it
    :attr:`~trionet.CloseReason.CLOSED_BY_HOST`; the other side sees end of
    stream and :attr:`~trionet.CloseReason.CLOSED_BY_PEER`.

    Args:
        framing: the framing of both sides (:class:`~trionet.Lines`,
            :class:`~trionet.Frames`, or None for raw bytes).
        queued: give the second side a bounded send queue drained by a writer
            task, as the connections a server hands to its handlers have
            (sends return before the bytes are written).  Exceptions raised
            in the block still reach the caller as themselves.
        lockstep: use :func:`trio.testing.lockstep_stream_pair`: no buffering
            at all, every send waits until the other side receives it.  The
            default, :func:`trio.testing.memory_stream_pair`, buffers without
            limit so sends never wait.
        wrap: called with the second side's stream; the stream it returns is
            used instead.  Use it to inject faults::

                wrap=lambda s: trionet.testing.ChunkedStream(s, chunk_size=1)

    Yields:
        ``(first, second)``: the two connected sides.

    .. versionadded:: 0.1
    """
    first_stream: trio.abc.HalfCloseableStream
    second_stream: trio.abc.HalfCloseableStream
    if lockstep:
        first_stream, second_stream = trio.testing.lockstep_stream_pair()
    else:
        first_stream, second_stream = trio.testing.memory_stream_pair()
    stream: trio.abc.Stream = second_stream
    if wrap is not None:
        stream = wrap(second_stream)
        if not isinstance(stream, trio.abc.Stream):
            raise TypeError(
                f"wrap must return a trio.abc.Stream, not {type(stream).__name__}"
            )
    first = Connection(first_stream, framing=framing)
    if not queued:
        second = Connection(stream, framing=framing)
        try:
            yield first, second
        finally:
            await _close_both(first, second)
        return
    with unwrap_single_exception():
        async with trio.open_nursery() as nursery:
            second = Connection._over(
                StreamTransport(stream), framing, QueuedSendPath(nursery, SendLimits())
            )
            try:
                yield first, second
            finally:
                await _close_both(first, second)


async def _close_both(first: Connection, second: Connection) -> None:
    try:
        await first.aclose()
    finally:
        await second.aclose()
