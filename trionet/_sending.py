"""The send paths of a Connection: a queue and a writer task, or a FIFO lock.

How this works
--------------
A connection sends in one of two ways, chosen once when it is made.

:class:`QueuedSendPath` -- connections a server hands to its handlers, which
have a nursery for background tasks.  A send that finds no queue writes
straight to the socket without waiting; whatever the kernel does not take
goes into a :class:`SendQueue`, drained by a writer task that joins
everything queued into as few socket writes as it can.  While the queue
exists every send appends to it, so sends and broadcasts share one order.
The queue exists only while there is something to write: the writer drops it
when it finds it empty, with no ``await`` in between, so an idle connection
holds no queue and no task.

The queue is bounded twice, in messages (``send_queue_size``) and in bytes
(``send_queue_bytes``, counting what the writer is writing right now):

* ``send*`` appends while the queue is under both bounds -- so one send
  (one message, or the whole batch of a ``send_many``, which counts as its
  messages) may take it over them -- and otherwise waits, in FIFO order with
  the other waiting senders (backpressure on that connection's senders
  only).  The writer moves waiting sends into the queue, oldest first, as
  room frees up, the way a trio memory channel hands over values, so a
  sender that was woken has had its messages accepted and a cancelled one
  has not (a batch is accepted whole or not at all).  A wait longer than
  ``idle_timeout`` closes the connection with TIMEOUT.
* A broadcast never waits.  It may use ``broadcast_headroom`` bytes (and as
  many messages again) beyond the bounds where ``send*`` waits, so a client
  that keeps up with a streaming handler is never evicted for one notice.
  A broadcast that would go beyond the headroom, or that finds the queue has
  not moved for ``stall_timeout`` seconds, closes the connection with
  SLOW_CONSUMER instead.

So a connection's queue holds at most ``send_queue_bytes`` + one send +
``broadcast_headroom`` bytes.  Over TLS the transport may also hold the
encrypted records of one write (64 KiB of data) that the kernel has not
taken yet; the writer sends them before the queue.

The writer runs in a cancel scope of its own: closing the connection
forcefully (a flush that timed out, a protocol error, an eviction) cancels
it, even when it is stuck in a send to a peer that stopped reading -- which
is also what frees a TLS stream's internal send lock for the close.

:class:`LockedSendPath` -- clients, which have no nursery (so that exceptions
raised in the caller's block are never wrapped in an ExceptionGroup).  Sends
write under a FIFO lock and return once the kernel took the bytes; a send
that waits longer than ``idle_timeout`` for the peer to read closes the
connection with TIMEOUT.

Both paths can ``pause`` and ``resume`` around a change of transport
(:meth:`Connection.start_tls`).  A writer task, or a send under the lock,
holds on to the transport it started with, so the old transport must be
idle before the new one takes over: ``pause`` waits (bounded) until what
was accepted is written -- the queue drained, or the lock free -- and then
holds new sends: in a queue that no writer drains, or by keeping the lock.
``resume`` lets them go, over whatever transport the connection has then.
A pause is only cancelled before it holds anything.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict, deque
from typing import TYPE_CHECKING

import attrs
import outcome
import trio

from ._exceptions import CloseReason, ConnectionClosed

if TYPE_CHECKING:
    from ._connection import Connection

__all__ = [
    "DEFAULT_BROADCAST_HEADROOM",
    "DEFAULT_FLUSH_TIMEOUT",
    "DEFAULT_SEND_QUEUE_BYTES",
    "DEFAULT_SEND_QUEUE_SIZE",
    "DEFAULT_STALL_TIMEOUT",
    "MAX_BATCH_BYTES",
    "LockedSendPath",
    "QueuedSendPath",
    "SendLimits",
    "SendQueue",
]

#: Messages a connection's outgoing queue holds before ``send*`` waits.
DEFAULT_SEND_QUEUE_SIZE = 256
#: Bytes a connection's outgoing queue holds before ``send*`` waits.
DEFAULT_SEND_QUEUE_BYTES = 1024 * 1024
#: Bytes beyond ``send_queue_bytes`` that only broadcasts may use.
DEFAULT_BROADCAST_HEADROOM = 1024 * 1024
#: Seconds a queue may go without any byte written before a broadcast
#: treats its connection as a slow consumer.
DEFAULT_STALL_TIMEOUT = 10.0
#: Seconds that closing waits for queued bytes to reach the kernel (and for a
#: TLS close to be sent).
DEFAULT_FLUSH_TIMEOUT = 5.0
#: The most bytes one write of the writer task joins together.
MAX_BATCH_BYTES = 256 * 1024

_TRANSPORT_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)

logger = logging.getLogger("trionet")


@attrs.frozen
class SendLimits:
    """The bounds of a connection's send path (one object shared by every
    connection of a server)."""

    queue_size: int = DEFAULT_SEND_QUEUE_SIZE
    queue_bytes: int = DEFAULT_SEND_QUEUE_BYTES
    broadcast_headroom: int = DEFAULT_BROADCAST_HEADROOM
    stall_timeout: float = DEFAULT_STALL_TIMEOUT
    flush_timeout: float = DEFAULT_FLUSH_TIMEOUT


DEFAULT_LIMITS = SendLimits()


class SendQueue:
    """Bytes accepted for sending and not yet written, with their bounds'
    bookkeeping.  Exists only while its writer task runs."""

    __slots__ = (
        "closed",
        "counts",
        "drained",
        "items",
        "last_progress",
        "messages",
        "nbytes",
        "scope",
        "waiting",
    )

    def __init__(self) -> None:
        self.items: deque[bytes | memoryview] = deque()
        #: How many messages each item completes (a joined batch: several;
        #: the first part of a message cut in two: none).
        self.counts: deque[int] = deque()
        #: Bytes queued plus bytes the writer is writing now.
        self.nbytes = 0
        #: Messages queued plus messages the writer is writing now.
        self.messages = 0
        #: Senders waiting for room, oldest first, with their bytes and the
        #: number of messages they hold.
        self.waiting: OrderedDict[trio.lowlevel.Task, tuple[bytes, int]] = OrderedDict()
        #: Set once the queue is gone: everything written, or closed.
        self.drained = trio.Event()
        #: The writer's cancel scope (None until the writer first runs).
        self.scope: trio.CancelScope | None = None
        #: When the writer last finished a write (or the queue was made).
        self.last_progress = trio.current_time()
        self.closed = False

    def append(self, data: bytes | memoryview, count: int = 1) -> None:
        """Queue ``data``, which holds ``count`` messages."""
        self.items.append(data)
        self.counts.append(count)
        self.nbytes += len(data)
        self.messages += count

    def has_room(self, limits: SendLimits) -> bool:
        return self.nbytes < limits.queue_bytes and self.messages < limits.queue_size

    def admit_waiting(self, limits: SendLimits) -> None:
        """Move waiting senders' messages into the queue, oldest first, while
        there is room, and wake those senders."""
        waiting = self.waiting
        while waiting and self.has_room(limits):
            task, (data, count) = waiting.popitem(last=False)
            self.append(data, count)
            trio.lowlevel.reschedule(task)

    def close(self, error: ConnectionClosed) -> None:
        """Stop the writer and fail every waiting sender with ``error``."""
        if self.closed:
            return
        self.closed = True
        if self.scope is not None:
            self.scope.cancel()
        waiting = self.waiting
        while waiting:
            task, _ = waiting.popitem(last=False)
            trio.lowlevel.reschedule(task, outcome.Error(error))
        self.drained.set()

    def stalled(self, limits: SendLimits) -> bool:
        return trio.current_time() - self.last_progress > limits.stall_timeout


class QueuedSendPath:
    """Sends through a :class:`SendQueue` drained by a writer task in
    ``nursery`` (shared by every connection of a server)."""

    __slots__ = ("limits", "nursery")

    def __init__(self, nursery: trio.Nursery, limits: SendLimits) -> None:
        self.nursery = nursery
        self.limits = limits

    def try_push(self, conn: Connection, data: bytes) -> bool:
        """Hand ``data`` on without waiting: cork, queue, or straight to the
        kernel.  False when the caller must wait for room in the queue.

        Raises:
            ConnectionClosed: sending is over, or the transport failed.
        """
        if conn._send_closed:
            raise conn._closed_error()
        cork = conn._cork
        if cork is not None:
            cork.append(data)
            conn._cork_bytes += len(data)
            if conn._cork_bytes >= MAX_BATCH_BYTES:
                conn._uncork()
            return True
        queue = conn._queue
        if queue is not None:
            if queue.waiting or not queue.has_room(self.limits):
                return False
            queue.append(data)
            return True
        if conn._ready or conn._receive_buffer:
            # More input is already here, so the handler is about to send
            # again: hold this back and send the whole batch at once, before
            # the next wait for input or as soon as this task yields.
            conn._cork = [data]
            conn._cork_bytes = len(data)
            trio.lowlevel.current_trio_token().run_sync_soon(conn._uncork_soon)
            return True
        self.write_or_queue(conn, data)
        return True

    def try_push_many(self, conn: Connection, data: bytes, count: int) -> bool:
        """:meth:`try_push` for ``count`` messages joined into ``data``,
        accepted whole or not at all; never corked (they are a batch
        already).  False when the caller must wait for room."""
        if conn._send_closed:
            raise conn._closed_error()
        if conn._cork is not None:
            conn._uncork()  # (what was corked goes first)
        queue = conn._queue
        if queue is not None:
            if queue.waiting or not queue.has_room(self.limits):
                return False
            queue.append(data, count)
            return True
        self.write_or_queue(conn, data, count)
        return True

    def try_push_parts(self, conn: Connection, header: bytes, payload: bytes) -> bool:
        """:meth:`try_push` for one message in two parts (a frame's header
        and a large payload), written with one scatter-gather ``sendmsg``
        when it can go straight to the kernel: the payload is not copied.
        Corked or queued, it is joined as any message."""
        if (
            conn._cork is not None
            or conn._queue is not None
            or conn._ready
            or conn._receive_buffer
        ):
            return self.try_push(conn, header + payload)
        if conn._send_closed:
            raise conn._closed_error()
        transport = conn._transport
        try:
            sent = transport.send_parts_nowait(header, payload)
        except _TRANSPORT_ERRORS as exc:
            raise conn._broken(exc) from exc
        conn._bytes_sent += sent
        size = len(header) + len(payload)
        if sent < size or (transport.can_hold_backlog and transport.has_backlog):
            queue = conn._queue = SendQueue()
            if sent < size:
                queue.append(_unsent(header, payload, sent))
            self.nursery.start_soon(self._writer, conn, queue)
        return True

    async def send_slow(
        self,
        conn: Connection,
        data: bytes,
        count: int = 1,
        payload: bytes | None = None,
    ) -> None:
        """Wait for room in the queue (backpressure), at most ``idle_timeout``.
        (With ``payload``, ``data`` is the header of a two-part message.)"""
        if payload is not None:
            data += payload
        queue = conn._queue
        assert queue is not None
        deadline = math.inf
        if conn.idle_timeout is not None:
            deadline = trio.current_time() + conn.idle_timeout
        await self.wait_for_room(conn, queue, data, deadline, count)

    def write_or_queue(self, conn: Connection, data: bytes, count: int = 1) -> None:
        """Write now what the kernel takes; queue the rest (of ``count``
        messages) for a writer task."""
        queue = conn._queue
        if queue is not None:  # (already accepted: not subject to the bounds)
            queue.append(data, count)
            return
        transport = conn._transport
        try:
            sent = transport.send_nowait(data)
        except _TRANSPORT_ERRORS as exc:
            raise conn._broken(exc) from exc
        conn._bytes_sent += sent
        if sent < len(data) or (transport.can_hold_backlog and transport.has_backlog):
            # (The backlog: TLS records the kernel did not take, at most one
            # write's worth.  The writer sends it before the queue.)
            queue = conn._queue = SendQueue()
            if sent < len(data):
                queue.append(memoryview(data)[sent:] if sent else data, count)
            self.nursery.start_soon(self._writer, conn, queue)

    def offer(self, conn: Connection, data: bytes) -> bool:
        """Queue ``data`` for a broadcast, never waiting; evict instead."""
        if conn._send_closed:
            return False
        queue = conn._queue
        if queue is None:
            try:
                return self.try_push(conn, data)
            except ConnectionClosed:
                return False
        limits = self.limits
        if queue.nbytes + len(data) > limits.queue_bytes + limits.broadcast_headroom:
            why = "over its broadcast headroom"
        elif queue.messages >= 2 * limits.queue_size:
            why = "over twice send_queue_size messages"
        elif queue.stalled(limits):
            why = f"no byte written for {limits.stall_timeout} s"
        else:
            queue.append(data)
            return True
        logger.info(
            "%r: outgoing queue %s (%d bytes queued); closing as slow consumer",
            conn,
            why,
            queue.nbytes,
        )
        conn._close_now(CloseReason.SLOW_CONSUMER)
        return False

    async def _writer(self, conn: Connection, queue: SendQueue) -> None:
        limits = self.limits
        transport = conn._transport
        items = queue.items
        counts = queue.counts
        try:
            with trio.CancelScope() as scope:
                queue.scope = scope
                if queue.closed:
                    return
                while items or transport.has_backlog:
                    batch: list[bytes | memoryview] = []
                    size = 0
                    messages = 0
                    while items and size < MAX_BATCH_BYTES:
                        item = items.popleft()
                        count = counts.popleft()
                        if size + len(item) > MAX_BATCH_BYTES and len(item) > (
                            MAX_BATCH_BYTES
                        ):
                            # Write a large message in parts, so that progress
                            # (last_progress) is seen at least every part.
                            # Its messages count as written with the last part.
                            view = memoryview(item)
                            cut = MAX_BATCH_BYTES - size
                            items.appendleft(view[cut:])
                            counts.appendleft(count)
                            item, count = view[:cut], 0
                        batch.append(item)
                        size += len(item)
                        messages += count
                    data = batch[0] if len(batch) == 1 else b"".join(batch)
                    # (No batch: only the transport's backlog to write.)
                    try:
                        await transport.send_all(data)
                    except _TRANSPORT_ERRORS as exc:
                        conn._broken(exc)
                        return
                    conn._bytes_sent += size
                    queue.messages -= messages
                    queue.nbytes -= size
                    queue.last_progress = trio.current_time()
                    queue.admit_waiting(limits)
        finally:
            # No await between finding the queue empty and dropping it: the
            # next send sees no queue and writes directly, in order.
            if conn._queue is queue:
                conn._queue = None
            if not items:
                queue.drained.set()
            elif not queue.closed:
                # Cancelled from outside (the server's nursery is ending):
                # what is left cannot be sent.
                conn._close_now(CloseReason.SHUTDOWN)

    async def pause(self, conn: Connection, deadline: float) -> None:
        """Write everything accepted so far, then hold new sends (and
        broadcasts) in a queue that nothing drains until :meth:`resume`: the
        transport underneath is about to be replaced.  Closes the connection
        with TIMEOUT if the writing is not done by ``deadline``.

        Raises:
            ConnectionClosed: the connection is closed, or the deadline passed.
        """
        conn._uncork()
        with trio.move_on_at(deadline) as scope:
            # (A send may start a new queue while an old one drains.)
            while (queue := conn._queue) is not None:
                await queue.drained.wait()
        if scope.cancelled_caught:
            conn._close_now(CloseReason.TIMEOUT)
        if conn._transport_closed:
            raise conn._closed_error()
        conn._queue = SendQueue()  # (no writer: held)

    def resume(self, conn: Connection) -> None:
        """Let what was held since :meth:`pause` go out, over the transport
        the connection has now."""
        queue = conn._queue
        if queue is None or queue.closed:
            return
        if queue.items:
            self.nursery.start_soon(self._writer, conn, queue)
        else:
            conn._queue = None
            queue.drained.set()

    async def wait_for_room(
        self,
        conn: Connection,
        queue: SendQueue,
        data: bytes,
        deadline: float,
        count: int = 1,
    ) -> None:
        """Wait until the writer has moved ``data`` (``count`` messages) into
        ``queue`` (FIFO with other waiting senders); close with TIMEOUT at
        ``deadline``."""
        task = trio.lowlevel.current_task()
        queue.waiting[task] = (data, count)

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            queue.waiting.pop(task, None)
            return trio.lowlevel.Abort.SUCCEEDED

        with trio.move_on_at(deadline) as scope:
            await trio.lowlevel.wait_task_rescheduled(abort)
        if scope.cancelled_caught:
            conn._close_now(CloseReason.TIMEOUT)
            raise conn._closed_error()


class LockedSendPath:
    """Sends under a FIFO lock (connections with no nursery: clients)."""

    __slots__ = ("limits",)

    def __init__(self, limits: SendLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits

    def try_push(self, conn: Connection, data: bytes) -> bool:
        if conn._send_closed:
            raise conn._closed_error()
        return False

    def try_push_many(self, conn: Connection, data: bytes, count: int) -> bool:
        return self.try_push(conn, data)

    def try_push_parts(self, conn: Connection, header: bytes, payload: bytes) -> bool:
        return self.try_push(conn, header)

    async def send_slow(
        self,
        conn: Connection,
        data: bytes,
        count: int = 1,
        payload: bytes | None = None,
    ) -> None:
        """Send under the lock; return once the kernel took every byte.
        (With ``payload``, ``data`` is the header of a two-part message,
        written with one scatter-gather ``sendmsg``.)"""
        lock = conn._lock()
        if lock.locked():
            await lock.acquire()
        else:
            lock.acquire_nowait()
        try:
            if conn._send_closed:
                raise conn._closed_error()
            transport = conn._transport
            size = len(data)
            try:
                if payload is None:
                    sent = transport.send_nowait(data)
                else:
                    sent = transport.send_parts_nowait(data, payload)
                    size += len(payload)
                if sent < size or (
                    transport.can_hold_backlog and transport.has_backlog
                ):
                    await self._send_rest(conn, _unsent(data, payload, sent))
            except _TRANSPORT_ERRORS as exc:
                raise conn._broken(exc) from exc
            conn._bytes_sent += size
        finally:
            lock.release()

    async def pause(self, conn: Connection, deadline: float) -> None:
        """Wait for the send under way (if any) to finish, then hold new sends
        until :meth:`resume`: the transport underneath is about to be
        replaced.  Closes the connection with TIMEOUT if the send under way
        has not finished by ``deadline``.

        Raises:
            ConnectionClosed: the connection is closed, or the deadline passed.
        """
        lock = conn._lock()
        with trio.move_on_at(deadline) as scope:
            await lock.acquire()
        if scope.cancelled_caught:
            conn._close_now(CloseReason.TIMEOUT)
            raise conn._closed_error()
        if conn._transport_closed:
            lock.release()
            raise conn._closed_error()

    def resume(self, conn: Connection) -> None:
        """Let the senders held since :meth:`pause` go on."""
        conn._lock().release()

    async def _send_rest(self, conn: Connection, data: bytes | memoryview) -> None:
        deadline = math.inf
        if conn.idle_timeout is not None:
            deadline = trio.current_time() + conn.idle_timeout
        try:
            with trio.move_on_at(deadline) as scope:
                await conn._transport.send_all(data)
        except trio.Cancelled:
            # Part of a message may be on the wire: the stream can no longer
            # be trusted, so end it rather than let the peer decode garbage.
            conn._close_now(CloseReason.ERROR)
            raise
        if scope.cancelled_caught:
            # The peer read nothing for idle_timeout.
            conn._close_now(CloseReason.TIMEOUT)
            raise conn._closed_error()


def _unsent(data: bytes, payload: bytes | None, sent: int) -> bytes | memoryview:
    """What is left of ``data`` (and ``payload`` after it) once ``sent``
    bytes went out, copying only when not even ``data`` went whole."""
    if payload is None:
        return memoryview(data)[sent:] if sent else data
    if sent < len(data):
        return data[sent:] + payload
    return memoryview(payload)[sent - len(data) :]


LOCKED = LockedSendPath()
