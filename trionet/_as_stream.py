"""A Connection seen as a trio stream, for code written against trio's stream
interfaces (trio-websocket, h11 glue, trio's own stream checkers)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import trio

from ._exceptions import CloseReason, ConnectionClosed

if TYPE_CHECKING:
    from ._connection import Connection

__all__ = ["ConnectionStream"]


@contextmanager
def _as_trio_errors(conn: Connection) -> Iterator[None]:
    # trio's stream contract: ClosedResourceError for a stream this side
    # closed, BrokenResourceError for one that failed.
    try:
        yield
    except ConnectionClosed as exc:
        if exc.reason is CloseReason.CLOSED_BY_HOST or conn.close_reason in (
            None,  # (sending after send_eof)
            CloseReason.CLOSED_BY_HOST,
        ):
            raise trio.ClosedResourceError(str(exc)) from exc
        raise trio.BrokenResourceError(str(exc)) from exc


class ConnectionStream(trio.abc.HalfCloseableStream):
    """A :class:`~trionet.Connection` as a :class:`trio.abc.HalfCloseableStream`.

    Get one from :meth:`Connection.as_stream`.  It moves raw bytes, ignoring
    the connection's framing, through the connection's own receive buffer
    and send path, so it can be used between framed receives and sends on
    the same connection.  Errors follow trio's stream contract:
    :class:`trio.ClosedResourceError` once this side closed (or sent its end
    of stream), :class:`trio.BrokenResourceError` when the connection failed
    or the peer reset it, ``b""`` from :meth:`receive_some` at the peer's end
    of stream, and :class:`trio.BusyResourceError` for two tasks sending (or
    receiving) at once.  Closing the stream closes the connection.

    .. versionadded:: 0.1
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._sending = False
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream was closed")

    @property
    def connection(self) -> Connection:
        """The connection underneath."""
        return self._conn

    @contextmanager
    def _one_sender(self) -> Iterator[None]:
        self._check_open()
        if self._sending:
            raise trio.BusyResourceError("another task is already sending")
        self._sending = True
        try:
            yield
        finally:
            self._sending = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._one_sender(), _as_trio_errors(self._conn):
            await self._conn.send_all(data)
        # (The connection skips the scheduler when the kernel took the bytes
        # at once; a trio stream's every call is a full checkpoint.)
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        conn = self._conn
        with self._one_sender(), _as_trio_errors(conn):
            if conn._send_closed:
                raise conn._closed_error()
            queue = conn._queue
            if queue is not None:
                await queue.drained.wait()
            try:
                await conn._transport.wait_send_all_might_not_block()
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise conn._broken(exc) from exc

    async def send_eof(self) -> None:
        with self._one_sender(), _as_trio_errors(self._conn):
            await self._conn.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self._check_open()
        with _as_trio_errors(self._conn):
            data = await self._conn.receive_some(max_bytes)
        await trio.lowlevel.cancel_shielded_checkpoint()
        return data

    async def aclose(self) -> None:
        self._closed = True
        await self._conn.aclose()
