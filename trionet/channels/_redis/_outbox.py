"""What a publishing backplane holds on to.  Sans-IO: the caller gives the time.

How this works
--------------
Every published message is appended to one deque, in sequence-number order,
and stays there until it is no longer needed.  The deque has three parts,
left to right::

    [ acknowledged | in flight | not sent yet ]
      the tail       sent on the   waiting for the
      (kept for a    current       connection
      new Redis)     connection

* *Not sent yet*: :meth:`Outbox.next_batch` hands the oldest of these to the
  connection, which makes them *in flight*.
* *In flight*: :meth:`Outbox.acknowledge` moves them to the tail once Redis
  replied; :meth:`Outbox.rewind` puts them back in the queue when the
  connection failed without a reply (they may or may not have reached Redis:
  they are sent again, and receivers drop a copy by its sequence number).
* *The tail*: messages Redis acknowledged are kept ``resend_window`` seconds
  (counted only while connected) in case Redis turns out to be a new instance
  that never kept them -- a restart without persistence.
  :meth:`Outbox.new_instance` makes the whole deque "not sent yet" again.

Bounds.  The deque holds at most ``max_bytes`` (each message counts its
length plus :data:`ENTRY_OVERHEAD`), and nothing older than ``max_age``
seconds (from publication).  Over the size bound the tail goes first, then the
oldest message not yet sent; in-flight messages stay until their fate is known
(so the bound may be exceeded by one batch).  A message given up before Redis
ever acknowledged it is *dropped*; one given up after a connection failed
while it was in flight is *unconfirmed* (it may have reached Redis).  Both
are returned to the caller to count and log; the tail goes silently.
"""

from __future__ import annotations

from collections import deque
from typing import final

import attrs

__all__ = ["ENTRY_OVERHEAD", "Held", "Losses", "Outbox"]

#: Bytes each held message is counted for beyond its own length (the object,
#: its deque slot and its numbers).
ENTRY_OVERHEAD = 120


@final
@attrs.define(slots=True)
class Held:
    """One message held by the outbox."""

    seq: int
    message: bytes
    published: float
    #: When Redis acknowledged it on the current instance, or None.
    acknowledged: float | None = None
    #: Some Redis instance acknowledged it once (it is in the tail, or was).
    delivered_once: bool = False
    #: Sent on a connection that failed before Redis replied.
    unconfirmed: bool = False


@final
@attrs.frozen
class Losses:
    """Messages given up: never acknowledged by any Redis instance."""

    #: Never reached Redis.
    dropped: int = 0
    #: Sent on a connection that failed before the reply: may have arrived.
    unconfirmed: int = 0

    def __bool__(self) -> bool:
        return bool(self.dropped or self.unconfirmed)

    def __add__(self, other: Losses) -> Losses:
        return Losses(
            self.dropped + other.dropped, self.unconfirmed + other.unconfirmed
        )


_NO_LOSS = Losses()


@final
class Outbox:
    """A publisher's messages, from publication until no longer needed."""

    __slots__ = (
        "_acked",
        "_bytes",
        "_held",
        "_sent",
        "max_age",
        "max_bytes",
        "resend_window",
    )

    def __init__(self, *, max_bytes: int, max_age: float, resend_window: float) -> None:
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.resend_window = resend_window
        self._held: deque[Held] = deque()
        self._acked = 0  # the tail: the first _acked messages
        self._sent = 0  # the tail and the messages in flight
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._held)

    @property
    def size(self) -> int:
        """Bytes held, as counted against ``max_bytes``."""
        return self._bytes

    @property
    def pending(self) -> int:
        """Messages not acknowledged by the current Redis instance."""
        return len(self._held) - self._acked

    @property
    def waiting(self) -> int:
        """Messages no Redis instance has acknowledged yet."""
        held = self._held
        return sum(
            1 for i in range(self._acked, len(held)) if not held[i].delivered_once
        )

    @property
    def in_flight(self) -> int:
        """Messages sent on the current connection, waiting for the reply."""
        return self._sent - self._acked

    @property
    def resendable(self) -> int:
        """Messages a new Redis instance would get again (the tail)."""
        return sum(1 for held in self._held if held.delivered_once)

    def append(self, seq: int, message: bytes, now: float) -> Losses:
        """Hold a newly published message; make room for it if need be."""
        self._held.append(Held(seq, message, now))
        self._bytes += len(message) + ENTRY_OVERHEAD
        losses = _NO_LOSS
        while self._bytes > self.max_bytes:
            lost = self._evict_oldest()
            if lost is None:
                break  # only messages in flight are left to give up
            losses += lost
        return losses

    def expire(self, now: float, *, connected: bool) -> Losses:
        """Give up messages older than ``max_age``; while ``connected`` to the
        Redis instance that acknowledged them, also the tail older than
        ``resend_window`` (since its acknowledgement)."""
        held = self._held
        too_old = now - self.max_age
        while self._acked and (
            held[0].published < too_old
            or (
                connected
                and (acked := held[0].acknowledged) is not None
                and acked < now - self.resend_window
            )
        ):
            self._pop(0)
        losses = _NO_LOSS
        while self._sent < len(held) and held[self._sent].published < too_old:
            losses += self._pop(self._sent)
        return losses

    def next_batch(self, max_count: int, max_bytes: int) -> list[Held]:
        """The oldest messages not sent yet (at least one if there is one),
        now in flight."""
        held = self._held
        batch: list[Held] = []
        size = 0
        while self._sent < len(held) and len(batch) < max_count:
            item = held[self._sent]
            size += len(item.message)
            if batch and size > max_bytes:
                break
            batch.append(item)
            self._sent += 1
        return batch

    def acknowledge(self, count: int, now: float) -> tuple[int, int]:
        """Redis acknowledged the first ``count`` messages in flight.

        Returns:
            How many of them it acknowledged for the first time, and how many
            were sent again (to a new instance).
        """
        assert count <= self.in_flight
        first = again = 0
        for index in range(self._acked, self._acked + count):
            item = self._held[index]
            item.acknowledged = now
            item.unconfirmed = False
            if item.delivered_once:
                again += 1
            else:
                item.delivered_once = True
                first += 1
        self._acked += count
        return first, again

    def rewind(self) -> None:
        """The connection failed: messages in flight are to be sent again."""
        for index in range(self._acked, self._sent):
            self._held[index].unconfirmed = True
        self._sent = self._acked

    def new_instance(self) -> int:
        """Redis is a new instance: send everything held again, in order.

        Returns:
            How many held messages an earlier instance had acknowledged.
        """
        self.rewind()
        for item in self._held:
            item.acknowledged = None
        self._acked = self._sent = 0
        return self.resendable

    def give_up(self) -> Losses:
        """Give up every message not acknowledged (the backplane stops)."""
        self.rewind()
        losses = _NO_LOSS
        while len(self._held) > self._acked:
            losses += self._pop(len(self._held) - 1)
        return losses

    # ------------------------------------------------------------- internals

    def _evict_oldest(self) -> Losses | None:
        if self._acked:
            return self._pop(0)
        if self._sent < len(self._held):
            return self._pop(self._sent)
        return None

    def _pop(self, index: int) -> Losses:
        held = self._held
        item = held[index]
        if index == 0:
            held.popleft()
        elif index == len(held) - 1:
            held.pop()
        else:
            del held[index]
        self._bytes -= len(item.message) + ENTRY_OVERHEAD
        if index < self._acked:
            self._acked -= 1
        if index < self._sent:
            self._sent -= 1
        if item.delivered_once:
            return _NO_LOSS
        if item.unconfirmed:
            return Losses(unconfirmed=1)
        return Losses(dropped=1)
