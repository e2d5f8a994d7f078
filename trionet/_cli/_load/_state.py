"""What every connection of one load run shares, and how one connection fails.

One :class:`LoadState` per run holds the message budget or deadline, the rate
schedule, the latency histogram and the error counts.  One
:class:`LoadWorker` per connection (or UDP endpoint) runs its sender and
receiver; the first failure of either is counted once and ends both.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Awaitable, Callable

import trio

import trionet

from .._histogram import LogLinearHistogram
from ._spec import LoadSpec

__all__ = [
    "CONNECTION_ERRORS",
    "Failed",
    "LoadState",
    "LoadWorker",
    "RateLimiter",
    "message_maker",
]

_PATTERN = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def message_maker(size: int) -> Callable[[int], bytes]:
    """A function making message ``n``: ``n`` in hex, then a fixed filler.

    The result never contains ``b"\\n"``.
    """
    width = min(size, 16)
    modulus = 16**width
    filler = (_PATTERN * (size // len(_PATTERN) + 1))[width:size]

    def make(seq: int) -> bytes:
        return b"%0*x" % (width, seq % modulus) + filler

    return make


class RateLimiter:
    """A schedule of send times ``1 / rate`` apart, shared by every sender."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._next: float | None = None

    async def wait(self) -> None:
        now = trio.current_time()
        # A sender that fell behind does not earn a burst to catch up with.
        if self._next is None or self._next < now - 0.1:
            self._next = now
        when = self._next
        self._next += self._interval
        if when > now:
            await trio.sleep_until(when)


class LoadState:
    """State shared by every connection of one run."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.make = message_maker(spec.size)
        self.latency = LogLinearHistogram()
        self.errors: Counter[str] = Counter()
        self.completed = 0
        self.budget = spec.messages
        self.deadline = math.inf
        self.started: float | None = None
        self.finished: float | None = None
        #: Whether the run was stopped early on request (Ctrl-C).
        self.interrupted = False
        #: Connections whose worker ended (normally or by a counted failure).
        self.ended = 0
        self.limiter = RateLimiter(spec.rate) if spec.rate else None

    def may_send(self) -> bool:
        """Take one message from the budget; False once the run is over."""
        if trio.current_time() >= self.deadline:
            return False
        if self.budget is not None:
            if self.budget <= 0:
                return False
            self.budget -= 1
        return True

    def done(self, sent_at: float) -> None:
        """Count one intact echo of a message sent at ``sent_at``."""
        now = trio.current_time()
        self.latency.record(max(0, round((now - sent_at) * 1e6)))
        self.completed += 1

    def count_error(self, error: BaseException | str) -> None:
        """Count one error under its name, close reason or exception type."""
        if isinstance(error, str):
            name = error
        elif isinstance(error, trionet.ConnectionClosed):
            name = error.reason.name
        else:
            name = type(error).__name__
        self.errors[name] += 1


class Failed(Exception):
    """Ends one connection; the error was already counted."""


#: What ends a connection: counted under its close reason or type.
CONNECTION_ERRORS = (trionet.ConnectionClosed, trionet.ProtocolError, OSError)


class LoadWorker:
    """Runs a connection's sender and receiver; the first failure ends both."""

    def __init__(self, run: LoadState) -> None:
        self.run = run
        self.failed = False

    def fail(self, error: BaseException | str) -> Failed:
        """Count ``error`` (only the first of this connection) and stop."""
        if not self.failed:
            self.failed = True
            self.run.count_error(error)
        return Failed()

    async def guard(
        self, scope: trio.CancelScope, task: Callable[[], Awaitable[None]]
    ) -> None:
        """Run ``task``; a failure is counted and cancels ``scope``."""
        try:
            await task()
        except Failed:
            scope.cancel()
        except CONNECTION_ERRORS as exc:
            self.fail(exc)
            scope.cancel()

    async def run_pair(
        self,
        receive: Callable[[], Awaitable[None]],
        send: Callable[[], Awaitable[None]],
    ) -> None:
        """Run a receiver and a sender together; the first failure ends both."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.guard, nursery.cancel_scope, receive)
            nursery.start_soon(self.guard, nursery.cancel_scope, send)
