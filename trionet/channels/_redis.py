"""A Redis pub/sub backplane: broadcasts that reach every process and host.

How this works
--------------
A :class:`RedisBackplane` is handed to one server (``backplane=`` on
:func:`trionet.serve_tcp` or :func:`trionet.channels.serve_channels`).  The
server runs :meth:`RedisBackplane.serve` beside its accept loop.  That runs
two tasks over two Redis connections, both made by coredis (the optional
``redis`` extra):

* the *subscriber* subscribes to one Redis channel, ``<prefix>:broadcast``,
  and hands every message published there by *another* backplane to the
  server, which delivers it to its own clients.  When the connection is lost
  it logs that, waits (exponential backoff with jitter) and subscribes again,
  for as long as the server runs;
* the *sender* takes messages from a bounded queue and PUBLISHes them in
  order, several per round trip (a pipeline without a transaction).

:meth:`RedisBackplane.publish` never waits.  It checks the size, stamps the
message with this backplane's random *origin* id and the next sequence
number, and queues it for the sender -- or, while the subscriber is not
connected (or the queue is full), counts it as not delivered remotely.  The
server delivers every message to its own clients itself, directly, and the
subscriber drops messages carrying its own origin when Redis echoes them
back.  So each client gets each message exactly once, and one publisher's
messages arrive everywhere in the order it published them: one queue, one
sender, one Redis connection, and Redis keeps the order of one connection's
PUBLISHes for every subscriber.

Across processes delivery is at most once.  Nothing is retried (a retried
PUBLISH whose reply was lost would be delivered twice) and nothing is stored
while Redis is away.  Loss is never silent: the publisher counts what it
could not hand to Redis (``not_delivered``) and each receiver counts the
holes in every other origin's sequence numbers (``missed``).

The envelope on the Redis channel is ``version (1 byte, 1) | origin (16
bytes) | sequence number (8 bytes, big-endian) | message``.  Anything else on
the channel is counted as ``malformed`` and dropped.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, final
from urllib.parse import urlsplit, urlunsplit

import attrs
import trio

from .._exceptions import MessageTooLarge

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:
    import coredis

__all__ = ["BackplaneStats", "RedisBackplane"]

logger = logging.getLogger("trionet")

#: Default largest message a backplane carries (Redis disconnects pub/sub
#: clients that fall 8 MiB behind; keep messages well under that).
DEFAULT_MAX_PAYLOAD = 1024 * 1024
#: Default number of messages waiting to be sent to Redis.
DEFAULT_QUEUE_SIZE = 10_000
#: Messages sent to Redis in one round trip, at most.
_BATCH = 256
#: Origins whose last sequence number a backplane remembers.
_ORIGINS_KEPT = 4096
_VERSION = 1
_ORIGIN_SIZE = 16
_HEADER_SIZE = 1 + _ORIGIN_SIZE + 8


@final
@attrs.frozen(kw_only=True)
class BackplaneStats:
    """A snapshot of a backplane's counters.

    .. versionadded:: 0.1
    """

    #: Subscribed to Redis now.
    connected: bool
    #: Messages published through this backplane (past the size check).
    published: int
    #: Of those, messages Redis accepted for every other process.
    sent: int
    #: Of those, messages that never reached Redis -- published while it was
    #: unreachable, refused by a full queue, lost with a failed command or
    #: still queued at shutdown.  Their local clients got them; other
    #: processes did not.
    not_delivered: int
    #: Messages from other processes delivered to this server's clients.
    received: int
    #: Messages other processes published that never arrived here (holes in
    #: their sequence numbers, as seen when their next message arrives).
    missed: int
    #: Messages on the Redis channel that were not a valid envelope, were over
    #: ``max_payload`` or could not be delivered; they were dropped.
    malformed: int
    #: Times the connection to Redis was lost or could not be made.
    connection_failures: int


@final
class RedisBackplane:
    """Carry :meth:`trionet.Server.broadcast` and
    :meth:`~trionet.channels.ChannelServer.publish` to every process attached
    to the same Redis, over Redis pub/sub.

    Pass it as ``backplane=`` to :func:`~trionet.channels.serve_channels`,
    :func:`~trionet.channels.open_channel_server`, :func:`trionet.serve_tcp`
    or :func:`trionet.open_tcp_server`; the server runs it.  One backplane
    serves one server at a time; make one per server (per process)::

        backplane = trionet.channels.RedisBackplane("redis://10.0.0.5:6379")
        async with trionet.channels.open_channel_server(
            handler, 7000, host="0.0.0.0", backplane=backplane
        ) as server:
            await server.publish("news", "reaches every process")

    Each client, on any process, gets each message exactly once, and the
    messages of one publisher in the order it published them.  Across
    processes delivery is *at most once*: while Redis is unreachable local
    delivery goes on, messages are counted in
    :attr:`BackplaneStats.not_delivered` (and, on the receiving side,
    :attr:`BackplaneStats.missed`) and the backplane reconnects with
    exponential backoff.  Every server on one Redis channel must use the same
    framing.  See :doc:`/scaling`.

    Needs coredis: ``pip install 'trionet[redis]'``.

    Args:
        url: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://``
            for TLS or ``unix://path``, as coredis reads it.
        channel_prefix: the Redis channel is ``<channel_prefix>:broadcast``;
            servers with the same prefix on the same Redis share broadcasts.
            Give unrelated services different prefixes.
        max_payload: the largest message, in bytes; a larger one is refused
            by ``broadcast`` / ``publish`` with :class:`~trionet.MessageTooLarge`
            before anyone gets it.
        queue_size: messages waiting for Redis; when full, more are counted
            as not delivered remotely.
        connect_timeout: seconds allowed to connect and subscribe, and for a
            batch of PUBLISH commands.
        retry_delay: seconds before the first reconnection attempt; doubles
            after each failure, with jitter, up to ``max_retry_delay``.
        max_retry_delay: the longest wait between reconnection attempts.

    Raises:
        ModuleNotFoundError: coredis is not installed.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        url: str,
        *,
        channel_prefix: str = "trionet",
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        connect_timeout: float = 5.0,
        retry_delay: float = 0.1,
        max_retry_delay: float = 10.0,
    ) -> None:
        _coredis()  # fail now, not when the server starts
        if not isinstance(url, str) or not url:
            raise TypeError("url must be a non-empty str")
        if not isinstance(channel_prefix, str) or not channel_prefix:
            raise ValueError("channel_prefix must be a non-empty str")
        for name, value in (("max_payload", max_payload), ("queue_size", queue_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, not {value!r}")
        for name, seconds in (
            ("connect_timeout", connect_timeout),
            ("retry_delay", retry_delay),
            ("max_retry_delay", max_retry_delay),
        ):
            if not (isinstance(seconds, int | float) and 0 < seconds < math.inf):
                raise ValueError(f"{name} must be a positive number, not {seconds!r}")
        self._url = url
        self.channel: str = f"{channel_prefix}:broadcast"
        """The Redis channel every message goes through."""
        self.max_payload: int = max_payload
        """The largest message carried, in bytes."""
        self._queue_size = queue_size
        self._connect_timeout = float(connect_timeout)
        self._retry_delay = float(retry_delay)
        self._max_retry_delay = max(float(max_retry_delay), self._retry_delay)
        self._origin = os.urandom(_ORIGIN_SIZE)
        self._prefix = bytes([_VERSION]) + self._origin
        self._seq = 0
        self._serving = False
        self._stopping = False
        self._interruptible: trio.CancelScope | None = None
        self._connected = False
        self._up = trio.Event()
        self._down = trio.Event()
        self._down.set()
        self._queue_send, self._queue_receive = trio.open_memory_channel[bytes](0)
        self._queue_send.close()  # serve() opens the real queue
        self._body = trio.CancelScope()
        self._pending = 0  # queued or being sent
        self._idle = trio.Event()
        self._idle.set()
        self._last_seq: OrderedDict[bytes, int] = OrderedDict()
        self._deliver: Callable[[bytes], None] = lambda message: None
        self._published = 0
        self._sent = 0
        self._not_delivered = 0
        self._received = 0
        self._missed = 0
        self._malformed = 0
        self._failures = 0
        self._outage_losses = 0

    def __repr__(self) -> str:
        state = "connected" if self._connected else "disconnected"
        return (
            f"<trionet.channels.RedisBackplane {_redacted(self._url)} "
            f"channel={self.channel!r} {state}>"
        )

    @property
    def url(self) -> str:
        """The Redis URL, with any password replaced by ``***``."""
        return _redacted(self._url)

    @property
    def origin(self) -> str:
        """This backplane's random id (hex), carried by every message it sends."""
        return self._origin.hex()

    @property
    def connected(self) -> bool:
        """Whether the backplane is subscribed to Redis now."""
        return self._connected

    @property
    def stats(self) -> BackplaneStats:
        """A snapshot of the counters."""
        return BackplaneStats(
            connected=self._connected,
            published=self._published,
            sent=self._sent,
            not_delivered=self._not_delivered,
            received=self._received,
            missed=self._missed,
            malformed=self._malformed,
            connection_failures=self._failures,
        )

    async def wait_connected(self) -> None:
        """Return once the backplane is subscribed to Redis."""
        while not self._connected:
            await self._up.wait()
        await trio.lowlevel.checkpoint()

    async def wait_disconnected(self) -> None:
        """Return once the backplane has lost (or not yet made) its connection."""
        while self._connected:
            await self._down.wait()
        await trio.lowlevel.checkpoint()

    # ------------------------------------------------------- the server's side

    def publish(self, message: bytes) -> None:
        """Queue ``message`` for every other process; never waits.

        Called by the server's ``broadcast`` before it delivers the message to
        its own clients; you do not call it yourself.

        Raises:
            MessageTooLarge: ``message`` is longer than :attr:`max_payload`.
        """
        if len(message) > self.max_payload:
            raise MessageTooLarge(
                f"message of {len(message)} bytes is over the backplane's "
                f"max_payload of {self.max_payload} bytes"
            )
        self._seq += 1
        self._published += 1
        if not (self._serving and self._connected):
            self._lost(1)
            return
        envelope = b"".join((self._prefix, self._seq.to_bytes(8, "big"), message))
        try:
            self._queue_send.send_nowait(envelope)
        except trio.ClosedResourceError:  # stopping
            self._lost(1)
            return
        except trio.WouldBlock:
            self._lost(1)
            if self._outage_losses == 1:
                logger.warning(
                    "Redis backplane %s: send queue full (%d messages); "
                    "messages are delivered locally only until it drains",
                    self.url,
                    self._queue_size,
                )
            return
        self._outage_losses = 0
        if self._pending == 0:
            self._idle = trio.Event()
        self._pending += 1

    async def flush(self, max_wait: float) -> None:
        """Wait up to ``max_wait`` seconds for queued messages to reach Redis."""
        with trio.move_on_after(max_wait):
            await self._idle.wait()
        await trio.lowlevel.checkpoint()

    async def serve(
        self,
        deliver: Callable[[bytes], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run the backplane for one server until cancelled.

        ``deliver(message)`` is called for every message another process
        published.  Reports started once subscribed, or once the first
        attempt failed (the server then starts anyway and the backplane keeps
        trying in the background).  The server calls this itself.

        Raises:
            RuntimeError: the backplane already serves a server.
        """
        if self._serving:
            raise RuntimeError("a RedisBackplane serves one server at a time")
        module = _coredis()
        from coredis.retry import NoRetryPolicy

        client: coredis.Redis[bytes] = module.Redis.from_url(
            self._url,
            retry_policy=NoRetryPolicy(),
            connect_timeout=self._connect_timeout,
            stream_timeout=self._connect_timeout,
        )
        self._queue_send, self._queue_receive = trio.open_memory_channel[bytes](
            self._queue_size
        )
        self._serving = True
        self._stopping = False
        self._deliver = deliver
        # coredis's pub/sub must be left through its own exit, not by
        # cancellation.  So the work runs shielded; when the server cancels
        # us, _stop_when_cancelled asks it to wind down, and the shield's
        # deadline bounds how long that may take.
        try:
            async with trio.open_nursery() as guard:
                guard.start_soon(self._stop_when_cancelled)
                with trio.CancelScope(shield=True) as self._body:
                    try:
                        async with client, trio.open_nursery() as nursery:
                            nursery.start_soon(self._send_loop, client)
                            await nursery.start(self._subscribe_loop, client)
                            task_status.started()
                    except Exception as exc:
                        if not self._stopping:
                            raise
                        logger.debug(
                            "Redis backplane %s: %s while stopping",
                            self.url,
                            _describe(exc),
                        )
                guard.cancel_scope.cancel()
        finally:
            self._serving = False
            self._set_connected(False)
            self._deliver = lambda message: None
            self._drop_queued()

    async def _stop_when_cancelled(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self._stopping = True
            self._queue_send.close()
            if self._interruptible is not None:
                self._interruptible.cancel()
            self._body.deadline = trio.current_time() + self._connect_timeout + 1

    def _stop_requested(self) -> bool:
        # A method, so type checkers do not keep the flag narrowed across awaits.
        return self._stopping

    def _interrupt_scope(self) -> trio.CancelScope:
        # A scope _stop_when_cancelled cancels: reading and waiting, where
        # stopping needs no cooperation from coredis.
        scope = trio.CancelScope()
        if self._stopping:
            scope.cancel()
        self._interruptible = scope
        return scope

    # ---------------------------------------------------------------- tasks

    async def _subscribe_loop(
        self,
        client: coredis.Redis[bytes],
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        from coredis.retry import NoRetryPolicy

        delay = self._retry_delay
        started = False
        lost_at: float | None = None
        while not self._stop_requested():
            failure: BaseException | None = None
            try:
                # coredis bounds connecting (connect_timeout) and the
                # subscription's acknowledgement (subscription_timeout).
                async with client.pubsub(
                    channels=[self.channel],
                    ignore_subscribe_messages=True,
                    retry_policy=NoRetryPolicy(),
                    subscription_timeout=self._connect_timeout,
                ) as pubsub:
                    self._set_connected(True)
                    if lost_at is not None:
                        logger.warning(
                            "Redis backplane %s reconnected after %.1f s; "
                            "%d messages published meanwhile were delivered "
                            "locally only",
                            self.url,
                            trio.current_time() - lost_at,
                            self._outage_losses,
                        )
                    self._outage_losses = 0
                    lost_at = None
                    delay = self._retry_delay
                    if not started:
                        started = True
                        task_status.started()
                    with self._interrupt_scope():
                        async for message in pubsub:
                            if message["type"] == "message":
                                self._on_message(message["data"])
                        raise ConnectionError("the subscription ended")
            except Exception as exc:
                failure = exc
            finally:
                self._set_connected(False)
            if self._stop_requested():
                return
            self._failures += 1
            if lost_at is None:
                lost_at = trio.current_time()
                logger.warning(
                    "Redis backplane %s unavailable (%s); delivering locally "
                    "only and reconnecting",
                    self.url,
                    _describe(failure),
                )
            else:
                logger.debug(
                    "Redis backplane %s: attempt failed (%s)",
                    self.url,
                    _describe(failure),
                )
            if not started:
                started = True
                task_status.started()
            with self._interrupt_scope():
                await trio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self._max_retry_delay)

    async def _send_loop(self, client: coredis.Redis[bytes]) -> None:
        async for first in self._queue_receive:
            batch = [first]
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue_receive.receive_nowait())
                except trio.WouldBlock:
                    break
            try:
                if self._stopping:
                    self._lost(len(batch))
                    continue
                with trio.fail_after(self._connect_timeout):
                    async with client.pipeline(transaction=False) as pipe:
                        for envelope in batch:
                            pipe.publish(self.channel, envelope)
            except Exception as exc:
                self._lost(len(batch))
                logger.warning(
                    "Redis backplane %s: %d messages not delivered remotely (%s)",
                    self.url,
                    len(batch),
                    _describe(exc),
                )
            else:
                self._sent += len(batch)
            finally:
                self._pending -= len(batch)
                if self._pending == 0:
                    self._idle.set()

    # -------------------------------------------------------------- helpers

    def _on_message(self, data: Any) -> None:
        if (
            not isinstance(data, bytes)
            or len(data) < _HEADER_SIZE
            or data[0] != _VERSION
            or len(data) - _HEADER_SIZE > self.max_payload
        ):
            self._malformed += 1
            return
        origin = data[1 : 1 + _ORIGIN_SIZE]
        if origin == self._origin:
            return
        seq = int.from_bytes(data[1 + _ORIGIN_SIZE : _HEADER_SIZE], "big")
        last = self._last_seq.pop(origin, None)
        if last is not None and seq <= last:
            # Not from a live publisher: a replay or a forgery.  Drop it.
            self._last_seq[origin] = last
            self._malformed += 1
            return
        if last is not None:
            self._missed += seq - last - 1
        self._last_seq[origin] = seq
        if len(self._last_seq) > _ORIGINS_KEPT:
            self._last_seq.popitem(last=False)
        try:
            self._deliver(data[_HEADER_SIZE:])
        except Exception:
            self._malformed += 1
            logger.exception(
                "Redis backplane %s: could not deliver a message", self.url
            )
            return
        self._received += 1

    def _lost(self, count: int) -> None:
        self._not_delivered += count
        self._outage_losses += count

    def _drop_queued(self) -> None:
        while True:
            try:
                self._queue_receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            self._lost(1)
            self._pending -= 1
        if self._pending <= 0:
            self._pending = 0
            self._idle.set()

    def _set_connected(self, connected: bool) -> None:
        if connected == self._connected:
            return
        self._connected = connected
        if connected:
            self._up.set()
            self._down = trio.Event()
        else:
            self._down.set()
            self._up = trio.Event()


def _coredis() -> Any:
    try:
        import coredis
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "RedisBackplane needs coredis: pip install 'trionet[redis]'",
            name="coredis",
        ) from exc
    return coredis


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _describe(exc: BaseException | None) -> str:
    # coredis reports a lost connection inside (nested) exception groups.
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}" if exc is not None else "unknown"
