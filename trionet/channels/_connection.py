"""ChannelConnection: named channels multiplexed over one framed Connection.

How this works
--------------
One *reader task* receives frames, decodes them (:mod:`._wire`) and hands
each message to the channel it names.  Every message is delivered exactly
once, to the first consumer that takes it: ``receive(channel)`` or
``drain(channel)`` for its own channel, or ``async for`` for any channel.

State, per channel (:class:`_Channel`): a bounded deque of unread payloads,
the most recent payload (for :meth:`~ChannelConnection.latest`), counters.
Across channels: ``_order``, a deque of channel *names*, one per buffered
message, in arrival order; ``async for`` pops it to find the oldest message.

Why a name and not the message?  Each consumer always takes the *oldest*
unread message of a channel (``async for`` takes the oldest of all, which is
the oldest of its own channel too), so a channel's deque is only ever
consumed from the front.  When ``receive``/``drain`` (or a drop under the
"latest" policy) takes ``k`` messages from a channel's front, the ``k``
oldest entries of that channel still in ``_order`` are stale: the channel's
``skip`` counter records how many.  ``async for`` pops names from ``_order``;
for a name whose channel has ``skip > 0`` it decrements and moves on,
otherwise it pops that channel's deque front.  Stale names are removed in one
pass when they outnumber the live ones (plus a constant), so ``_order`` stays
bounded by about twice the buffered messages and each message costs O(1)
amortised.

Waiting.  A consumer that finds nothing buffered parks on a
:class:`trio.lowlevel.ParkingLot` of its own, queued per channel (or in the
"any channel" queue for ``async for``) with a sequence number.  An arriving
message goes straight to the longest-waiting eligible consumer: the first of
its channel's queue or of the "any" queue, whichever asked first.  A task
woken by ``unpark`` is guaranteed to return from ``park`` normally, so a
handed-over message cannot be lost to a cancellation; a task cancelled before
that is no longer in its lot, ``unpark`` reports nobody woken, and the
message goes to the next consumer or into the buffer.  While a consumer
waits, its channel (or, for ``async for``, every channel) is empty, so a
buffered message never sits beside an eligible waiter.

Full buffers.  Two bounds hold a message back: ``channel_buffer`` unread
messages per channel, and ``max_buffered_bytes`` unread payload bytes across
every channel (``_buffered_bytes``; a message arriving when nothing is
buffered is always admitted, so one message larger than the bound cannot
deadlock the connection).  Under "block" the reader keeps the message it
holds and parks on ``_space`` (the kernel buffers fill and TCP slows the
sender); ``_blocked_on`` says what it waits for: a channel's name (a slot in
that channel) or ``_ANY_CHANNEL`` (bytes, freed by a take on any channel, or
a consumer that starts waiting for the message it holds).  Every take wakes
the reader when it frees what the reader waits for; the reader checks again.
Under "latest" the channel's oldest message makes room for a full channel,
and the oldest messages of the whole connection (the ones ``async for``
would take next) make room for bytes; each drop is counted.  Under "close"
the connection is closed with SLOW_CONSUMER.

Ending.  The first failure (end of stream, protocol error, close) is kept.
Messages already buffered are still delivered; after them every receive
raises a fresh copy of that failure, and waiting consumers are woken with it.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Literal, TypeAlias

import attrs
import trio

from .._codec import Frames
from .._connection import Connection
from .._exceptions import (
    CloseReason,
    ConnectionClosed,
    IncompleteMessage,
    ProtocolError,
    TrionetError,
)
from .._options import positive_int
from .._util import unwrap_single_exception
from ._wire import FRAME_HEADER_SIZE, PREFIX_SIZE, channel_header, decode, encode_frame

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "DEFAULT_CHANNEL_BUFFER",
    "DEFAULT_MAX_BUFFERED_BYTES",
    "DEFAULT_MAX_CHANNELS",
    "DEFAULT_MAX_SIZE",
    "ChannelConnection",
    "ChannelStatistics",
    "Policy",
]

#: The largest frame payload accepted or sent (64 MiB).
DEFAULT_MAX_SIZE = 64 * 1024 * 1024
#: Unread messages each channel buffers.
DEFAULT_CHANNEL_BUFFER = 1024
#: Unread payload bytes one connection buffers across all its channels (16 MiB).
DEFAULT_MAX_BUFFERED_BYTES = 16 * 1024 * 1024
#: Distinct channels a peer may send on.
DEFAULT_MAX_CHANNELS = 1024
#: What a full buffer (of a channel, or of the connection) does with the next message.
Policy: TypeAlias = Literal["block", "latest", "close"]

_POLICIES = ("block", "latest", "close")
#: Messages a consumer takes from buffers before it passes through the scheduler.
_TAKES_PER_YIELD = 64
#: Stale entries of ``_order`` tolerated beyond the number of live ones.
_STALE_SLACK = 64
#: ``_blocked_on`` while the reader waits for bytes to be freed on any channel
#: (never a channel name: names are at least one byte long).
_ANY_CHANNEL = ""


@attrs.frozen(kw_only=True)
class _Settings:
    """The options shared by every way of making a ChannelConnection."""

    max_size: int = attrs.field(
        default=DEFAULT_MAX_SIZE,
        validator=[
            attrs.validators.instance_of(int),
            attrs.validators.ge(PREFIX_SIZE + 1),
            attrs.validators.lt(1 << (8 * FRAME_HEADER_SIZE)),
        ],
    )
    channel_buffer: int = attrs.field(
        default=DEFAULT_CHANNEL_BUFFER, validator=positive_int
    )
    max_buffered_bytes: int = attrs.field(
        default=DEFAULT_MAX_BUFFERED_BYTES, validator=positive_int
    )
    policy: Policy = attrs.field(
        default="block", validator=attrs.validators.in_(_POLICIES)
    )
    max_channels: int = attrs.field(
        default=DEFAULT_MAX_CHANNELS, validator=positive_int
    )

    @property
    def framing(self) -> Frames:
        return Frames(max_size=self.max_size, header_size=FRAME_HEADER_SIZE)


@attrs.frozen
class ChannelStatistics:
    """A snapshot of the counters of one channel, or of every channel together,
    on a :class:`ChannelConnection` (see :meth:`ChannelConnection.statistics`).

    .. versionadded:: 0.1
    """

    #: Messages accepted (delivered or buffered), ever.
    received: int
    #: Messages buffered now, not yet taken by any consumer.
    buffered: int
    #: Payload bytes of those buffered messages.  Across every channel this
    #: stays within ``max_buffered_bytes``, or is one message larger than
    #: that bound when that message alone is buffered.
    buffered_bytes: int
    #: Messages dropped to make room (policy ``"latest"``), ever.
    dropped: int


class _Channel:
    __slots__ = ("dropped", "latest", "name", "queue", "received", "size", "skip")

    def __init__(self, name: str) -> None:
        self.name = name
        self.queue: deque[bytes] = deque()
        # Payload bytes in ``queue``.
        self.size = 0
        # How many of this channel's oldest entries in ``_order`` are stale:
        # their message was taken by receive/drain, or dropped.
        self.skip = 0
        self.latest: bytes | None = None
        self.received = 0
        self.dropped = 0


class _Waiter:
    __slots__ = ("channel", "closed", "data", "lot", "queued", "seq")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.lot = trio.lowlevel.ParkingLot()
        self.queued = True
        self.closed = False
        self.channel = ""
        self.data = b""


class ChannelConnection:
    """Named channels over one :class:`~trionet.Connection`.

    Each message carries a channel name; this side keeps the most recent
    payload of every channel, buffers unread ones per channel, and lets you
    take them by channel or all together in arrival order::

        async with trionet.channels.connect_channels("127.0.0.1", port) as cc:
            await cc.publish("test", "client is connected!")
            image = await cc.receive("image")
            status = cc.latest("status")        # None until one arrived
            for item in cc.drain("log"):        # everything since last drain
                ...

    A server hands one to its handler (see :func:`serve_channels`).  To speak
    channels over a connection you already have, use it as an async context
    manager, which runs its reader task and closes the connection at the
    end::

        async with trionet.channels.ChannelConnection(conn) as cc:
            ...

    **Delivery.**  Every received message is delivered once: to
    :meth:`receive` or :meth:`drain` of its channel, or to ``async for``,
    whichever takes it first (waiting consumers in the order they began to
    wait).  Per channel, messages are delivered in the order they were sent.
    :meth:`latest` only peeks and never takes a message.

    **Full buffers.**  Two bounds limit what the peer can make this side
    hold: each channel buffers at most ``channel_buffer`` unread messages,
    and the connection at most ``max_buffered_bytes`` unread payload bytes
    across all its channels.  When a message arrives that no consumer is
    waiting for and that would break a bound, ``policy`` decides:

    * ``"block"`` (default): stop reading the connection until consumers
      take enough (a message from that channel, or enough bytes from any
      channel).  Nothing is lost; TCP slows the sender down, and only this
      connection's.  Messages on *other* channels wait too, so keep every
      channel the peer sends on drained (or use another policy).
    * ``"latest"``: drop the oldest unread messages and count them
      (:attr:`dropped`): the channel's oldest when the channel is full, the
      connection's oldest (in arrival order, whatever their channel) until
      the message fits when bytes are short.  :meth:`latest` still sees
      every message.
    * ``"close"``: close the connection with
      :attr:`~trionet.CloseReason.SLOW_CONSUMER`.

    A message that arrives while nothing is buffered is always accepted,
    even one larger than ``max_buffered_bytes`` (up to ``max_size``), so
    such a message never blocks the connection for ever: the buffered bytes
    stay within ``max_buffered_bytes``, or are that one message.

    **Ending.**  Messages that arrived before the connection ended are still
    delivered.  After them :meth:`receive` raises
    :class:`~trionet.ConnectionClosed` (``.reason`` says why) or, if the peer
    sent a malformed frame, :class:`~trionet.ProtocolError` saying what was
    wrong (the connection is then closed with
    :attr:`~trionet.CloseReason.PROTOCOL_ERROR`).  ``async for`` ends quietly
    when the peer closes cleanly and raises otherwise, as
    :class:`~trionet.Connection` does.  :meth:`drain` and :meth:`latest`
    never raise for a closed connection; check :attr:`close_reason`.

    The connection's :attr:`~trionet.Connection.framing` is set to
    ``Frames(max_size=max_size)``; do not receive on it directly.

    Args:
        conn: the connection to speak channels over.
        max_size: the largest frame (channel header plus data) sent or
            accepted, in bytes.  Both sides should agree; a larger incoming
            frame is a protocol error.
        channel_buffer: unread messages buffered per channel.
        max_buffered_bytes: unread payload bytes buffered across every
            channel (default 16 MiB).
        policy: ``"block"``, ``"latest"`` or ``"close"``: what a full
            buffer does (see above).
        max_channels: distinct channels the peer may send on; one more is a
            protocol error.  Bounds the memory a peer can make this side hold.

    .. versionadded:: 0.1
    """

    __slots__ = (
        "_any_waiters",
        "_blocked_on",
        "_buffered",
        "_buffered_bytes",
        "_channels",
        "_conn",
        "_dropped",
        "_failure",
        "_order",
        "_seq",
        "_session",
        "_settings",
        "_space",
        "_started",
        "_takes",
        "_waiters",
    )

    def __init__(
        self,
        conn: Connection,
        *,
        max_size: int = DEFAULT_MAX_SIZE,
        channel_buffer: int = DEFAULT_CHANNEL_BUFFER,
        max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
        policy: Policy = "block",
        max_channels: int = DEFAULT_MAX_CHANNELS,
    ) -> None:
        settings = _Settings(
            max_size=max_size,
            channel_buffer=channel_buffer,
            max_buffered_bytes=max_buffered_bytes,
            policy=policy,
            max_channels=max_channels,
        )
        self._setup(conn, settings)

    @classmethod
    def _create(cls, conn: Connection, settings: _Settings) -> ChannelConnection:
        self = cls.__new__(cls)
        self._setup(conn, settings)
        return self

    def _setup(self, conn: Connection, settings: _Settings) -> None:
        if not isinstance(conn, Connection):
            raise TypeError(f"expected a trionet.Connection, not {conn!r}")
        conn.framing = settings.framing
        self._conn = conn
        self._settings = settings
        self._channels: dict[str, _Channel] = {}
        self._order: deque[str] = deque()
        self._buffered = 0
        self._buffered_bytes = 0
        self._dropped = 0
        self._waiters: dict[str, deque[_Waiter]] = {}
        self._any_waiters: deque[_Waiter] = deque()
        self._seq = itertools.count()
        self._failure: TrionetError | None = None
        self._space = trio.lowlevel.ParkingLot()
        self._blocked_on: str | None = None
        self._started = False
        self._takes = 0
        self._session: AbstractAsyncContextManager[ChannelConnection] | None = None

    # ------------------------------------------------------------------ state

    @property
    def connection(self) -> Connection:
        """The underlying :class:`~trionet.Connection` (for its addresses,
        counters and timeouts)."""
        return self._conn

    @property
    def close_reason(self) -> CloseReason | None:
        """Why the connection ended, or None while it is open (see
        :attr:`trionet.Connection.close_reason`)."""
        return self._conn.close_reason

    @property
    def max_size(self) -> int:
        """The largest frame sent or accepted, in bytes."""
        return self._settings.max_size

    @property
    def max_buffered_bytes(self) -> int:
        """The unread payload bytes buffered across every channel, at most."""
        return self._settings.max_buffered_bytes

    @property
    def policy(self) -> Policy:
        """What a full buffer does: ``"block"``, ``"latest"`` or ``"close"``."""
        return self._settings.policy

    @property
    def channels(self) -> list[str]:
        """Every channel the peer has sent on, in order of first arrival."""
        return list(self._channels)

    @property
    def dropped(self) -> int:
        """Messages dropped on every channel because a buffer was full
        (policy ``"latest"``)."""
        return self._dropped

    def statistics(self, channel: str | None = None) -> ChannelStatistics:
        """A snapshot of ``channel``'s counters (zeros for a channel never
        seen), or with no argument of every channel together: the whole
        connection's buffered messages and bytes, for instance."""
        if channel is None:
            return ChannelStatistics(
                received=sum(ch.received for ch in self._channels.values()),
                buffered=self._buffered,
                buffered_bytes=self._buffered_bytes,
                dropped=self._dropped,
            )
        channel_header(channel)
        ch = self._channels.get(channel)
        if ch is None:
            return ChannelStatistics(
                received=0, buffered=0, buffered_bytes=0, dropped=0
            )
        return ChannelStatistics(
            received=ch.received,
            buffered=len(ch.queue),
            buffered_bytes=ch.size,
            dropped=ch.dropped,
        )

    def __repr__(self) -> str:
        state = "open" if self.close_reason is None else self.close_reason.name
        return (
            f"<trionet.channels.ChannelConnection {self._conn.remote_address} "
            f"{state} channels={len(self._channels)} buffered={self._buffered} "
            f"buffered_bytes={self._buffered_bytes}>"
        )

    # ---------------------------------------------------------------- sending

    async def publish(
        self, channel: str, data: bytes | bytearray | memoryview | str
    ) -> None:
        """Send ``data`` on ``channel``.

        ``data`` is bytes-like, or a str, sent as UTF-8.  The receiver always
        gets bytes.  Publishing does not need the reader task and works after
        the peer has closed its sending side.

        Raises:
            TypeError: ``channel`` is not a str or ``data`` not bytes or str.
            ValueError: ``channel`` is empty, not encodable as UTF-8 or longer
                than 255 bytes of UTF-8; nothing was sent.
            MessageTooLarge: the message does not fit ``max_size``; nothing
                was sent.
            ConnectionClosed: the connection is closed.
        """
        await self._conn.send_all(encode_frame(channel, data, self._settings.max_size))

    # -------------------------------------------------------------- receiving

    def latest(self, channel: str) -> bytes | None:
        """The most recent payload received on ``channel``, or None.

        Never waits and never takes a message: whatever consumed the message
        (or dropped it), ``latest`` still returns it until a newer one arrives.
        """
        channel_header(channel)
        ch = self._channels.get(channel)
        return None if ch is None else ch.latest

    def drain(self, channel: str) -> list[bytes]:
        """Take every payload buffered on ``channel``, oldest first.

        Never waits; returns ``[]`` when nothing is buffered, also after the
        connection has ended (see :attr:`close_reason`).
        """
        channel_header(channel)
        ch = self._channels.get(channel)
        if ch is None or not ch.queue:
            return []
        items = list(ch.queue)
        ch.queue.clear()
        self._taken_from_front(ch, len(items), ch.size)
        return items

    async def receive(self, channel: str) -> bytes:
        """Take the next payload on ``channel``, waiting for one if need be.

        Raises:
            ConnectionClosed: the connection ended and nothing is buffered on
                ``channel``; ``.reason`` says why.
            ProtocolError: the peer sent a malformed frame (the connection is
                closed with :attr:`~trionet.CloseReason.PROTOCOL_ERROR`).
            ValueError: ``channel`` is not a valid channel name.
            RuntimeError: no reader task runs (the ChannelConnection was
                not entered with ``async with``).
        """
        channel_header(channel)
        await trio.lowlevel.checkpoint_if_cancelled()
        ch = self._channels.get(channel)
        if ch is not None and ch.queue:
            data = ch.queue.popleft()
            self._taken_from_front(ch, 1, len(data))
            await self._after_take()
            return data
        if self._failure is None:
            waiter = await self._wait(channel)
            if not waiter.closed:
                return waiter.data
        raise self._error()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> tuple[str, bytes]:
        """The oldest unread message on any channel: ``(channel, data)``.

        Iteration stops when the peer closed cleanly and nothing is left.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._buffered:
            ch, data = self._take_oldest()
            await self._after_take()
            return ch.name, data
        if self._failure is None:
            waiter = await self._wait(None)
            if not waiter.closed:
                return waiter.channel, waiter.data
        failure = self._failure
        if (
            type(failure) is ConnectionClosed
            and failure.reason is CloseReason.CLOSED_BY_PEER
        ):
            raise StopAsyncIteration
        raise self._error()

    async def _wait(self, channel: str | None) -> _Waiter:
        """Park until a message of ``channel`` (None: any) is handed over,
        or until the connection ends (then ``closed`` is set)."""
        if not self._started:
            raise RuntimeError(
                "this ChannelConnection has no reader task: use it as "
                "'async with ChannelConnection(conn) as cc:'"
            )
        if channel is None:
            waiters = self._any_waiters
        else:
            waiters = self._waiters.setdefault(channel, deque())
        waiter = _Waiter(next(self._seq))
        waiters.append(waiter)
        if self._blocked_on is not None:
            # The reader may hold the very message this consumer wants,
            # waiting for bytes: let it try to hand that message over.
            self._space.unpark_all()
        try:
            await waiter.lot.park()
        finally:
            if waiter.queued:
                # Cancelled while waiting: leave no trace behind.
                waiters.remove(waiter)
                if channel is not None and not waiters:
                    del self._waiters[channel]
        return waiter

    async def _after_take(self) -> None:
        self._takes += 1
        if self._takes >= _TAKES_PER_YIELD:
            self._takes = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    def _take_oldest(self) -> tuple[_Channel, bytes]:
        """Take the oldest buffered message of any channel (one must be buffered)."""
        order = self._order
        channels = self._channels
        while True:
            ch = channels[order.popleft()]
            if ch.skip:
                ch.skip -= 1
                continue
            data = ch.queue.popleft()
            self._removed(ch, 1, len(data))
            return ch, data

    def _taken_from_front(self, ch: _Channel, count: int, size: int) -> None:
        """``count`` messages of ``size`` bytes in all left ``ch``'s front
        other than through ``_order``."""
        ch.skip += count
        self._removed(ch, count, size)
        if len(self._order) > 2 * self._buffered + _STALE_SLACK:
            self._compact()

    def _removed(self, ch: _Channel, count: int, size: int) -> None:
        """Account for messages that left ``ch``'s buffer; wake the reader
        if it waits for what they freed."""
        ch.size -= size
        self._buffered -= count
        self._buffered_bytes -= size
        blocked = self._blocked_on
        if blocked is not None and (blocked == ch.name or blocked == _ANY_CHANNEL):
            self._space.unpark_all()

    def _compact(self) -> None:
        # Remove every stale name: for each channel, its ``skip`` oldest.
        kept: deque[str] = deque()
        channels = self._channels
        for name in self._order:
            ch = channels[name]
            if ch.skip:
                ch.skip -= 1
            else:
                kept.append(name)
        self._order = kept

    def _error(self) -> TrionetError:
        """A fresh copy of the failure, to raise in one more task."""
        failure = self._failure
        assert failure is not None
        error: TrionetError
        if isinstance(failure, IncompleteMessage):
            error = IncompleteMessage(failure.reason, failure.partial)
        elif isinstance(failure, ConnectionClosed):
            error = ConnectionClosed(failure.reason, str(failure))
        else:
            error = type(failure)(*failure.args)
        error.__cause__ = failure.__cause__
        return error

    # ----------------------------------------------------------------- reader

    async def _read_loop(self) -> None:
        conn = self._conn
        try:
            while not self._ended():
                payload = await conn.receive()
                channel, data = decode(payload)
                while not self._deliver(channel, data):
                    # Policy "block": wait for consumers to free room (what
                    # room, _deliver wrote in _blocked_on), then try again.
                    # A cancellation here ends the connection anyway.
                    try:
                        await self._space.park()
                    finally:
                        self._blocked_on = None
                    if self._ended():
                        return
        except ProtocolError as exc:
            conn._close_now(CloseReason.PROTOCOL_ERROR)
            self._fail(exc)
        except ConnectionClosed as exc:
            self._fail(exc)
        finally:
            if self._failure is None:
                self._fail(
                    ConnectionClosed(conn.close_reason or CloseReason.CLOSED_BY_HOST)
                )

    def _ended(self) -> bool:
        return self._failure is not None

    def _deliver(self, name: str, data: bytes) -> bool:
        """Hand one message on; False if it must wait for buffer space (then
        ``_blocked_on`` says for what).

        Raises:
            ProtocolError: the peer exceeded ``max_channels``.
        """
        ch = self._channels.get(name)
        if ch is None:
            limit = self._settings.max_channels
            if len(self._channels) >= limit:
                raise ProtocolError(
                    f"peer sent on more than max_channels={limit} channels "
                    f"(the first one over was {name!r})"
                )
            ch = self._channels[name] = _Channel(name)
        if not self._hand_over(name, data):
            settings = self._settings
            queue = ch.queue
            size = len(data)
            full: str | None = None
            if len(queue) >= settings.channel_buffer:
                full = name
            elif (
                self._buffered_bytes
                and self._buffered_bytes + size > settings.max_buffered_bytes
            ):
                full = _ANY_CHANNEL
            if full is not None:
                policy = settings.policy
                if policy == "block":
                    self._blocked_on = full
                    return False
                if policy == "close":
                    self._close_slow(ch, size, full)
                    return True
                self._make_room(ch, size)
            queue.append(data)
            ch.size += size
            self._order.append(name)
            self._buffered += 1
            self._buffered_bytes += size
        ch.latest = data
        ch.received += 1
        return True

    def _make_room(self, ch: _Channel, size: int) -> None:
        """Policy "latest": drop the oldest messages until ``size`` more bytes
        fit ``ch`` and the connection (or nothing is buffered any more)."""
        settings = self._settings
        if len(ch.queue) >= settings.channel_buffer:
            self._taken_from_front(ch, 1, len(ch.queue.popleft()))
            self._count_drop(ch)
        limit = settings.max_buffered_bytes
        while self._buffered_bytes and self._buffered_bytes + size > limit:
            self._count_drop(self._take_oldest()[0])

    def _count_drop(self, ch: _Channel) -> None:
        ch.dropped += 1
        self._dropped += 1

    def _close_slow(self, ch: _Channel, size: int, full: str) -> None:
        """Policy "close": close as SLOW_CONSUMER, saying which bound was hit."""
        settings = self._settings
        if full:
            what = (
                f"channel {ch.name!r} has {len(ch.queue)} unread messages "
                f"(channel_buffer={settings.channel_buffer})"
            )
        else:
            channels = sum(1 for other in self._channels.values() if other.queue)
            what = (
                f"{self._buffered_bytes} bytes are unread on {channels} "
                f"channel(s) and {size} more arrived on {ch.name!r} "
                f"(max_buffered_bytes={settings.max_buffered_bytes})"
            )
        self._conn._close_now(CloseReason.SLOW_CONSUMER)
        self._fail(
            ConnectionClosed(
                CloseReason.SLOW_CONSUMER, f"{what}; closed as slow consumer"
            )
        )

    def _hand_over(self, name: str, data: bytes) -> bool:
        """Give the message to the longest-waiting eligible consumer, if any."""
        mine = self._waiters.get(name)
        anyone = self._any_waiters
        while mine or anyone:
            if mine and (not anyone or mine[0].seq < anyone[0].seq):
                waiter = mine.popleft()
                if not mine:
                    del self._waiters[name]
                    mine = None
            else:
                waiter = anyone.popleft()
            waiter.queued = False
            waiter.channel = name
            waiter.data = data
            if waiter.lot.unpark():
                return True
            # That consumer was cancelled before we got to it: try the next.
        return False

    def _fail(self, failure: TrionetError) -> None:
        """Keep the first failure and wake every waiting task with it."""
        if self._failure is not None:
            return
        self._failure = failure
        queues = [*self._waiters.values(), self._any_waiters]
        self._waiters = {}
        for queue in queues:
            for waiter in queue:
                waiter.queued = False
                waiter.closed = True
                waiter.lot.unpark()
            queue.clear()
        self._any_waiters = deque()
        self._space.unpark_all()

    # ---------------------------------------------------------------- closing

    async def aclose(self) -> None:
        """Close the connection (:attr:`~trionet.CloseReason.CLOSED_BY_HOST`
        unless it already has a reason), after flushing what was published.

        Waiting consumers are woken with :class:`~trionet.ConnectionClosed`.
        """
        try:
            await self._conn.aclose()
        finally:
            self._fail(
                ConnectionClosed(self._conn.close_reason or CloseReason.CLOSED_BY_HOST)
            )

    @asynccontextmanager
    async def _running(self, *, close: bool) -> AsyncIterator[ChannelConnection]:
        """Run the reader task for the duration of the block."""
        if self._started:
            raise RuntimeError("this ChannelConnection is already running")
        self._started = True
        with unwrap_single_exception():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_loop)
                try:
                    yield self
                finally:
                    try:
                        if close:
                            await self.aclose()
                    finally:
                        nursery.cancel_scope.cancel()

    async def __aenter__(self) -> Self:
        session = self._running(close=True)
        await session.__aenter__()
        self._session = session
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        session = self._session
        assert session is not None, "__aexit__ without __aenter__"
        self._session = None
        return await session.__aexit__(exc_type, exc_value, traceback)
