"""A Redis Streams backplane: broadcasts that reach every process and host,
and survive Redis going away.

How this works
--------------
A :class:`RedisBackplane` is handed to one server (``backplane=`` on
:func:`trionet.serve_tcp` or :func:`trionet.channels.serve_channels`), which
runs :meth:`RedisBackplane.serve` beside its accept loop.  That keeps two
connections to Redis (see ``_link.py``) and runs one task on each:

* the *sender* XADDs published messages to the stream
  ``<channel_prefix>:broadcast`` in order, a batch per MULTI/EXEC (so a batch
  is applied whole or not at all), trimming it to about ``stream_maxlen``
  entries as it goes.  :meth:`RedisBackplane.publish` never waits: it stamps
  the message with the next sequence number and holds it in the
  :class:`~._outbox.Outbox` until Redis has acknowledged it -- and for
  ``resend_window`` seconds after, in case Redis turns out to have restarted
  empty (its ``run_id`` changed): then everything held is sent again.
* the *receiver* reads the stream with ``XREAD BLOCK`` from the last entry id
  it saw, so after any reconnection -- its own, Redis dropping it as too
  slow, Redis hanging -- it carries on exactly where it stopped.  Each entry
  from another publisher is delivered to the server's clients unless its
  sequence number was delivered before; a hole in the numbers is counted and
  logged as missed (see ``_entries.py``).

Both connections are health-checked: the receiver's ``XREAD BLOCK`` lasts
``health_check_interval`` and must be answered within
``health_check_timeout`` after that; the sender PINGs when idle for the
interval, and every command must be answered within the timeout.  A
connection that fails is closed (never reused) and opened again with
exponential backoff and jitter; the log names the cause.  When the receiver
loses its connection, the sender checks its own at once.

What is lost -- messages given up by the sender's bounds, holes seen by the
receiver -- is counted in :class:`BackplaneStatistics` and logged at WARNING
with exact numbers, at most once per ``log_interval`` per kind
(``_losslog.py``).  What is merely late is not: a batch whose reply was lost
is sent again and a copy is dropped by sequence number.

Cancellation.  Every await is on one of the two connections or on a timer,
and a cancelled command leaves its connection closed and nothing else; the
outbox and the receiver's position change only between awaits.  When the
server stops (cancels :meth:`serve`), messages Redis has not acknowledged are
given up, counted and logged.
"""

from __future__ import annotations

import logging
import math
import os
import random
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Final, NoReturn, final

import attrs
import trio

from ..._exceptions import CloseReason, ConnectError, MessageTooLarge
from ..._options import non_negative, positive, positive_int
from ._entries import (
    FIELD_MESSAGE,
    MalformedEntry,
    Sequences,
    decode_entry,
    encode_entry,
)
from ._link import (
    LinkError,
    RedisLink,
    RedisRefused,
    expect_array,
    is_refusal,
    open_link,
)
from ._losslog import LossLog
from ._outbox import Losses, Outbox
from ._resp import ReplyError
from ._url import parse_redis_url

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["BackplaneStatistics", "RedisBackplane"]

logger = logging.getLogger("trionet")

#: Default largest message a backplane carries, in bytes.
DEFAULT_MAX_PAYLOAD = 1024 * 1024
#: Default bytes a publisher holds for Redis (messages not yet acknowledged
#: plus the tail kept for a restarted Redis).
DEFAULT_MAX_BUFFER = 16 * 1024 * 1024
#: Default seconds a message may wait for Redis before it is given up.
DEFAULT_MAX_BUFFER_AGE = 30.0
#: Default seconds an acknowledged message is kept for a restarted Redis.
DEFAULT_RESEND_WINDOW = 10.0
#: Default length the stream is trimmed to (approximately), in entries.
DEFAULT_STREAM_MAXLEN = 100_000
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_HEALTH_CHECK_INTERVAL = 5.0
DEFAULT_HEALTH_CHECK_TIMEOUT = 3.0
DEFAULT_RETRY_DELAY = 0.1
DEFAULT_MAX_RETRY_DELAY = 10.0
DEFAULT_LOG_INTERVAL = 10.0
#: Messages sent to Redis in one MULTI/EXEC, at most.
_BATCH = 512
#: Bytes of messages in one MULTI/EXEC, at most (a larger message goes alone).
_BATCH_BYTES = 1024 * 1024
#: Entries asked for per XREAD: at most a ceiling that halves when a read
#: fails (Redis may have dropped us for a reply over its output buffer limit)
#: and doubles, up to _MAX_READ, each time the receiver has caught up.  The
#: count itself doubles after each full read, up to the ceiling.
_FIRST_READ = 128
_MAX_READ = 1024
#: Field names and values read of one entry, at most; more make it malformed.
_MAX_FIELDS = 64
#: Origins whose last sequence number a receiver remembers.
_ORIGINS_KEPT = 4096
_ORIGIN_SIZE = 16  # random bytes, sent as 32 hex digits
_NO_ENTRY: Final = b"0-0"
#: Bulk strings up to this size are read even when max_payload is smaller
#: (INFO's reply); messages over max_payload are dropped after reading.
_MIN_BULK = 64 * 1024
_FINITE = attrs.validators.lt(math.inf)
_POSITIVE_FINITE = attrs.validators.and_(positive, _FINITE)
_NON_NEGATIVE_FINITE = attrs.validators.and_(non_negative, _FINITE)


@final
@attrs.frozen(kw_only=True)
class BackplaneStatistics:
    """A snapshot of a :class:`RedisBackplane`'s counters.

    Sending side: ``published`` = ``sent`` + ``pending`` + ``dropped`` +
    ``unconfirmed``.  Receiving side: every message of another trionet
    publisher that this backplane saw the sequence number of is either
    ``received``, a ``duplicate`` or ``missed``.

    .. versionadded:: 0.1
    """

    #: Both connections to Redis (receiving and publishing) are up now.
    connected: bool
    #: Messages published through this backplane (past the size check).
    published: int
    #: Of those, messages Redis acknowledged.
    sent: int
    #: Of those, messages waiting for Redis now (not acknowledged yet).
    pending: int
    #: Of those, messages given up without ever being sent to Redis: older
    #: than ``max_buffer_age``, pushed out of ``max_buffer``, or still waiting
    #: when the backplane stopped.  This server's clients got them; the
    #: clients of other servers did not.
    dropped: int
    #: Of those, messages given up after they were sent on a connection that
    #: failed before Redis replied: other servers may or may not have them.
    unconfirmed: int
    #: Acknowledged messages sent again because Redis was a new instance
    #: (restarted without its data); receivers drop the copies they have.
    resent: int
    #: Bytes the publishing side holds now (pending messages and the tail kept
    #: for a restarted Redis), as counted against ``max_buffer``.
    buffered_bytes: int
    #: Messages from other publishers delivered to this server's clients.
    received: int
    #: Messages from other publishers dropped because their sequence number
    #: was delivered already (copies sent again after a failure or restart).
    duplicates: int
    #: Messages of other publishers that never arrived here: the sizes of the
    #: holes in their sequence numbers, known when the next one arrives.
    missed: int
    #: How many such holes there were.
    gaps: int
    #: Stream entries that were not backplane messages (see the wire format),
    #: were over ``max_payload``, or could not be delivered; dropped.
    malformed: int
    #: Times a connection to Redis was lost or could not be made.
    connection_failures: int
    #: Times the publishing side found Redis to be a new instance (a new
    #: ``run_id``, or one Redis would not tell).
    new_instances: int


@attrs.frozen(kw_only=True)
class _Settings:
    """The backplane's options, checked once (see :class:`RedisBackplane`)."""

    channel_prefix: str = attrs.field(
        default="trionet",
        validator=[attrs.validators.instance_of(str), attrs.validators.min_len(1)],
    )
    max_payload: int = attrs.field(default=DEFAULT_MAX_PAYLOAD, validator=positive_int)
    max_buffer: int = attrs.field(default=DEFAULT_MAX_BUFFER, validator=positive_int)
    max_buffer_age: float = attrs.field(
        default=DEFAULT_MAX_BUFFER_AGE, validator=_POSITIVE_FINITE
    )
    resend_window: float = attrs.field(
        default=DEFAULT_RESEND_WINDOW, validator=_NON_NEGATIVE_FINITE
    )
    stream_maxlen: int = attrs.field(
        default=DEFAULT_STREAM_MAXLEN, validator=positive_int
    )
    connect_timeout: float = attrs.field(
        default=DEFAULT_CONNECT_TIMEOUT, validator=_POSITIVE_FINITE
    )
    health_check_interval: float = attrs.field(
        default=DEFAULT_HEALTH_CHECK_INTERVAL, validator=_POSITIVE_FINITE
    )
    health_check_timeout: float = attrs.field(
        default=DEFAULT_HEALTH_CHECK_TIMEOUT, validator=_POSITIVE_FINITE
    )
    retry_delay: float = attrs.field(
        default=DEFAULT_RETRY_DELAY, validator=_POSITIVE_FINITE
    )
    max_retry_delay: float = attrs.field(
        default=DEFAULT_MAX_RETRY_DELAY, validator=_POSITIVE_FINITE
    )
    log_interval: float = attrs.field(
        default=DEFAULT_LOG_INTERVAL, validator=_NON_NEGATIVE_FINITE
    )
    ssl_context: ssl.SSLContext | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(
            attrs.validators.instance_of(ssl.SSLContext)
        ),
    )
    on_missed: Callable[[str, int], object] | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(attrs.validators.is_callable()),
    )

    def __attrs_post_init__(self) -> None:
        if self.max_buffer < self.max_payload:
            raise ValueError(
                f"max_buffer ({self.max_buffer}) must hold at least one message "
                f"of max_payload ({self.max_payload}) bytes"
            )


@final
class RedisBackplane:
    """Carry :meth:`trionet.Server.broadcast` and
    :meth:`~trionet.channels.ChannelServer.publish` to every process attached
    to the same Redis, through a Redis stream, without losing messages when
    Redis or a connection to it goes away.

    Pass it as ``backplane=`` to :func:`~trionet.channels.serve_channels`,
    :func:`~trionet.channels.open_channel_server`, :func:`trionet.serve_tcp`
    or :func:`trionet.open_tcp_server`; the server runs it.  One backplane
    serves one server at a time; make one per server (per process)::

        backplane = trionet.channels.RedisBackplane("redis://10.0.0.5:6379")
        async with trionet.channels.open_channel_server(
            handler, 7000, host="0.0.0.0", backplane=backplane
        ) as server:
            await server.publish("news", "reaches every process")

    Each client, on any process, gets each message once, and the messages of
    one publisher in the order it published them.  While Redis is away, local
    delivery goes on, published messages wait (up to ``max_buffer`` bytes and
    ``max_buffer_age`` seconds) and go out in order when it is back, and
    receivers carry on from the last entry they read.  What is lost anyway is
    counted (:meth:`statistics`) and logged at WARNING on the ``"trionet"``
    logger, at both ends, with exact numbers.  Every server on one stream
    must use the same framing.  See :doc:`/scaling` for the guarantees, the
    defaults and the wire format.

    Needs Redis 5.0 or later (streams); the client is built in.

    Args:
        url: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://``
            for TLS or ``unix://[[user]:password@]/path[?db=N]``.
        channel_prefix: the stream is ``<channel_prefix>:broadcast``;
            servers with the same prefix on the same Redis share broadcasts.
            Give unrelated services different prefixes.
        max_payload: the largest message, in bytes; a larger one is refused
            by ``broadcast`` / ``publish`` with :class:`~trionet.MessageTooLarge`
            before anyone gets it.
        max_buffer: bytes of messages the publishing side holds -- those
            Redis has not acknowledged, and the tail kept for a restarted
            Redis -- each counted as its length plus 120 bytes.  When full,
            the tail goes first, then the oldest message not sent yet.
        max_buffer_age: seconds a message may wait for Redis before it is
            given up.
        resend_window: seconds (of being connected) a message acknowledged
            by Redis is kept, to be sent again if Redis turns out to have
            restarted without its data.  0 keeps none.
        stream_maxlen: the stream is trimmed to about this many entries
            (``XADD ... MAXLEN ~``); a receiver further behind than that
            misses messages (counted).
        connect_timeout: seconds allowed to connect and log in.
        health_check_interval: seconds a connection may be idle before it is
            checked (the receiver's ``XREAD BLOCK`` time; the sender's PING).
        health_check_timeout: seconds Redis has to answer any command (past
            the ``BLOCK`` time); a connection that misses it is replaced.
        retry_delay: seconds before the first reconnection attempt; doubles
            after each failure, with jitter, up to ``max_retry_delay``.
        max_retry_delay: the longest wait between reconnection attempts.
        log_interval: seconds between two WARNING lines about losses of one
            kind (the counts in between are summed, never skipped).
        ssl_context: for ``rediss://``: the TLS context (default: the
            system's trusted certificates, host name checked).
        on_missed: called as ``on_missed(origin, count)`` when messages of
            another publisher (``origin``, the hex id it sends) are found
            missing, before the next one is delivered: a server can tell its
            clients to resynchronise.  Must not block; exceptions are logged.

    Raises:
        ValueError: ``url`` is not a redis://, rediss:// or unix:// URL (the
            message shows it with its password masked), or an option is out
            of range.
        TypeError: an option has the wrong type.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        url: str,
        *,
        channel_prefix: str = "trionet",
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        max_buffer_age: float = DEFAULT_MAX_BUFFER_AGE,
        resend_window: float = DEFAULT_RESEND_WINDOW,
        stream_maxlen: int = DEFAULT_STREAM_MAXLEN,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        health_check_interval: float = DEFAULT_HEALTH_CHECK_INTERVAL,
        health_check_timeout: float = DEFAULT_HEALTH_CHECK_TIMEOUT,
        retry_delay: float = DEFAULT_RETRY_DELAY,
        max_retry_delay: float = DEFAULT_MAX_RETRY_DELAY,
        log_interval: float = DEFAULT_LOG_INTERVAL,
        ssl_context: ssl.SSLContext | None = None,
        on_missed: Callable[[str, int], object] | None = None,
    ) -> None:
        self._address = parse_redis_url(url)
        self._settings = _Settings(
            channel_prefix=channel_prefix,
            max_payload=max_payload,
            max_buffer=max_buffer,
            max_buffer_age=max_buffer_age,
            resend_window=resend_window,
            stream_maxlen=stream_maxlen,
            connect_timeout=connect_timeout,
            health_check_interval=health_check_interval,
            health_check_timeout=health_check_timeout,
            retry_delay=retry_delay,
            max_retry_delay=max_retry_delay,
            log_interval=log_interval,
            ssl_context=ssl_context,
            on_missed=on_missed,
        )
        self.stream: str = f"{channel_prefix}:broadcast"
        """The Redis stream (key) every message goes through."""
        self.max_payload: int = max_payload
        """The largest message carried, in bytes."""
        self._origin = os.urandom(_ORIGIN_SIZE).hex().encode("ascii")
        self._seq = 0
        self._outbox = Outbox(
            max_bytes=max_buffer,
            max_age=max_buffer_age,
            resend_window=resend_window,
        )
        self._sequences = Sequences(_ORIGINS_KEPT)
        self._deliver: Callable[[bytes], None] = _nowhere
        self._serving = False
        self._stopped = False
        self._receiving = False
        self._publishing = False
        self._up = trio.Event()
        self._down = trio.Event()
        self._down.set()
        self._wakeup = trio.Event()  # the sender has something to do
        self._check_now = False  # ... namely, to check its connection
        self._idle = trio.Event()  # nothing waits for Redis
        self._idle.set()
        # The receiver's place in the stream, and where it started.
        self._last_id: bytes | None = None
        self._start_id = _NO_ENTRY
        self._read_count = _FIRST_READ
        self._read_ceiling = _MAX_READ
        self._receiver_run_id: str | None = None
        self._sender_run_id: str | None = None
        self._sender_connected_before = False
        self._losses = LossLog(logger, f"Redis backplane {self.url}", log_interval)
        self._losses.define(
            "dropped",
            "messages published here were given up before Redis acknowledged "
            "them; this server's clients got them, other servers' clients "
            "did not",
        )
        self._losses.define(
            "missed",
            "messages from other publishers never arrived here "
            "(holes in their sequence numbers)",
        )
        self._losses.define(
            "malformed", "stream entries were not backplane messages and were dropped"
        )
        self._published = 0
        self._sent = 0
        self._dropped = 0
        self._unconfirmed = 0
        self._resent = 0
        self._received = 0
        self._duplicates = 0
        self._missed = 0
        self._gaps = 0
        self._malformed = 0
        self._failures = 0
        self._new_instances = 0

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return (
            f"<trionet.channels.RedisBackplane {self.url} "
            f"stream={self.stream!r} {state}>"
        )

    @property
    def url(self) -> str:
        """The Redis URL, with any password replaced by ``***``."""
        return self._address.display

    @property
    def origin(self) -> str:
        """This backplane's random id (32 hex digits), carried by every
        message it sends."""
        return self._origin.decode("ascii")

    @property
    def connected(self) -> bool:
        """Whether both connections to Redis (receiving, publishing) are up."""
        return self._receiving and self._publishing

    def statistics(self) -> BackplaneStatistics:
        """A snapshot of the counters."""
        return BackplaneStatistics(
            connected=self.connected,
            published=self._published,
            sent=self._sent,
            pending=self._outbox.waiting,
            dropped=self._dropped,
            unconfirmed=self._unconfirmed,
            resent=self._resent,
            buffered_bytes=self._outbox.size,
            received=self._received,
            duplicates=self._duplicates,
            missed=self._missed,
            gaps=self._gaps,
            malformed=self._malformed,
            connection_failures=self._failures,
            new_instances=self._new_instances,
        )

    async def wait_connected(self) -> None:
        """Return once both connections to Redis are up."""
        while not self.connected:
            await self._up.wait()
        await trio.lowlevel.checkpoint()

    async def wait_disconnected(self) -> None:
        """Return once a connection to Redis is down (or not yet made)."""
        while self.connected:
            await self._down.wait()
        await trio.lowlevel.checkpoint()

    # ------------------------------------------------------- the server's side

    def publish(self, message: bytes) -> None:
        """Hold ``message`` for every other process; never waits.

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
        if self._stopped:
            self._dropped += 1
            self._losses.add("dropped", 1, "published after the backplane stopped")
            return
        now = trio.current_time()
        self._count(self._outbox.append(self._seq, message, now), self._full_reason)
        self._count(
            self._outbox.expire(now, connected=self._publishing), self._age_reason
        )
        self._update_idle()
        self._wakeup.set()

    async def flush(self, max_wait: float) -> None:
        """Wait up to ``max_wait`` seconds for Redis to acknowledge every
        message published so far."""
        with trio.move_on_after(max_wait):
            while not self._idle.is_set():
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
        published.  Reports started once both connections are up, or once the
        first attempt failed for a reason that may pass (the server then
        starts anyway and the backplane keeps trying in the background).  The
        server calls this itself.

        Raises:
            ConnectError: Redis refused the backplane at start: a wrong or
                missing password, an ACL that does not allow the stream
                commands, a database that does not exist, a key of another
                type, a TLS certificate that does not verify.  The message
                names Redis's reason.
            RuntimeError: the backplane already serves a server.
        """
        if self._serving:
            raise RuntimeError("a RedisBackplane serves one server at a time")
        self._serving = True
        self._stopped = False
        self._deliver = deliver
        self._last_id = None
        self._start_id = b"%d-0" % int(time.time() * 1000)
        receiver: RedisLink | None = None
        sender: RedisLink | None = None
        try:
            try:
                receiver = await self._open_receiver(first_attempt=True)
                sender = await self._open_sender()
            except RedisRefused as exc:
                raise ConnectError(
                    CloseReason.ERROR,
                    f"Redis at {self.url} refused the backplane: {exc}",
                ) from None
            except LinkError as exc:
                self._failures += 1
                logger.warning(
                    "Redis backplane %s unavailable at start (%s); delivering to "
                    "this server's clients only and retrying",
                    self.url,
                    exc,
                )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive_loop, receiver)
                receiver = None  # the task closes it
                nursery.start_soon(self._send_loop, sender)
                sender = None
                nursery.start_soon(self._losses.run)
                task_status.started()
        finally:
            for link in (receiver, sender):
                if link is not None:
                    await link.aclose()
            self._serving = False
            self._stopped = True
            self._deliver = _nowhere
            self._set_state(receiving=False, publishing=False)
            self._count(
                self._outbox.give_up(), "still waiting when the backplane stopped"
            )
            self._update_idle()
            self._losses.flush()

    # ------------------------------------------------------------ receiving

    async def _open_receiver(self, *, first_attempt: bool = False) -> RedisLink:
        link = await self._open_link()
        try:
            with self._command_deadline("the stream position"):
                if self._last_id is None:
                    if first_attempt:
                        self._last_id = await self._last_entry_id(link)
                    else:
                        # Redis was away when we started: read what was
                        # added since then (by this host's clock).
                        self._last_id = self._start_id
                elif self._is_new_instance(self._receiver_run_id, link.run_id):
                    await self._check_position(link)
            self._receiver_run_id = link.run_id
        except BaseException:
            await link.aclose()
            raise
        self._set_state(receiving=True)
        return link

    async def _last_entry_id(self, link: RedisLink) -> bytes:
        await link.send(("XREVRANGE", self.stream, "+", "-", "COUNT", 1))
        reply = await link.next_reply()
        if isinstance(reply, ReplyError):
            raise _refusal_or_failure("XREVRANGE", reply)
        if reply == []:
            return _NO_ENTRY
        if (
            isinstance(reply, list)
            and isinstance(reply[0], list)
            and isinstance(entry_id := reply[0][0], bytes)
        ):
            return entry_id
        raise LinkError(f"XREVRANGE returned {reply!r:.80}")

    async def _check_position(self, link: RedisLink) -> None:
        # A new Redis instance numbers its entries by its own clock.  If that
        # is behind the last id we read, read the whole stream: what is in
        # it is new (copies are dropped by their sequence numbers).
        reply = await link.call("TIME")
        assert self._last_id is not None
        last_ms = _id_ms(self._last_id)
        seconds = reply[0] if isinstance(reply, list) and reply else None
        if not (isinstance(seconds, bytes) and seconds.isdigit()):
            raise LinkError(f"TIME returned {reply!r:.80}")
        if int(seconds) * 1000 + 999 < last_ms:
            self._last_id = _NO_ENTRY
        logger.debug(
            "Redis backplane %s: reading a new Redis instance from entry %s",
            self.url,
            self._last_id.decode(),
        )

    async def _receive_loop(self, link: RedisLink | None) -> None:
        try:
            while True:
                if link is None:
                    link = await self._reconnect(self._open_receiver, "receiving")
                try:
                    await self._read(link)
                except (LinkError, RedisRefused) as exc:
                    failure: Exception = exc
                await link.aclose()
                link = None
                self._set_state(receiving=False)
                self._read_ceiling = self._read_count = max(1, self._read_count // 2)
                self._lost("receiving", failure)
                # The other connection may be just as dead: check it now.
                self._check_now = True
                self._wakeup.set()
        finally:
            if link is not None:
                await link.aclose()

    async def _read(self, link: RedisLink) -> NoReturn:
        settings = self._settings
        block_ms = max(1, round(settings.health_check_interval * 1000))
        patience = settings.health_check_interval + settings.health_check_timeout
        while True:
            assert self._last_id is not None
            count = self._read_count
            await link.send(
                (
                    "XREAD",
                    "COUNT",
                    count,
                    "BLOCK",
                    block_ms,
                    "STREAMS",
                    self.stream,
                    self._last_id,
                )
            )
            with trio.move_on_after(patience) as waiting:
                entries = await self._read_entries(link, count, waiting)
            if waiting.cancelled_caught:
                raise LinkError(
                    f"no reply from Redis within {patience:g} s "
                    f"(health check: XREAD BLOCK {settings.health_check_interval:g} s "
                    f"+ health_check_timeout {settings.health_check_timeout:g} s)"
                )
            if entries == count:
                self._read_count = min(count * 2, self._read_ceiling)
            else:
                self._read_ceiling = min(self._read_ceiling * 2, _MAX_READ)

    async def _read_entries(
        self, link: RedisLink, count: int, waiting: trio.CancelScope
    ) -> int:
        """Read one XREAD reply, delivering each entry as it completes."""
        streams = await expect_array(link)
        if streams is None:
            return 0  # BLOCK ran out: nothing new
        if streams != 1 or await expect_array(link) != 2:
            raise LinkError("XREAD's reply is not one stream")
        if not isinstance(await link.next_event(), bytes):  # the stream's name
            raise LinkError("XREAD's reply does not name the stream")
        entries = await expect_array(link)
        if entries is None or entries > count:
            raise LinkError(f"XREAD returned {entries} entries for COUNT {count}")
        timeout = self._settings.health_check_timeout
        for _ in range(entries):
            if await expect_array(link) != 2:
                raise LinkError("an XREAD entry is not [id, fields]")
            entry_id = await link.next_event()
            if not isinstance(entry_id, bytes):
                raise LinkError(f"an XREAD entry id is {entry_id!r:.80}")
            fields: list[object] = []
            size = await expect_array(link) or 0
            for _ in range(size):
                value = await link.next_event()
                if size <= _MAX_FIELDS:
                    fields.append(value)
            # Between awaits: the entry counts as read exactly when it is
            # handled, so a failure before here reads it again.
            self._last_id = entry_id
            if size > _MAX_FIELDS:
                self._malformed_entry(f"over {_MAX_FIELDS} field names and values")
            else:
                self._handle(fields)
            waiting.deadline = trio.current_time() + timeout
        return entries

    def _handle(self, fields: list[object]) -> None:
        try:
            entry = decode_entry(fields)
        except MalformedEntry as exc:
            self._malformed_entry(str(exc))
            return
        if len(entry.message) > self.max_payload:
            self._malformed_entry("over max_payload")
            return
        if entry.origin == self._origin:
            return  # our own: the server delivered it itself
        if entry.origin is not None:
            assert entry.seq is not None
            skipped = self._sequences.check(entry.origin, entry.seq)
            if skipped is None:
                self._duplicates += 1
                return
            if skipped:
                self._missing(entry.origin, entry.seq, skipped)
        try:
            self._deliver(entry.message)
        except Exception:
            self._malformed += 1
            logger.exception(
                "Redis backplane %s: could not deliver a message", self.url
            )
            return
        self._received += 1

    def _missing(self, origin: bytes, seq: int, count: int) -> None:
        self._missed += count
        self._gaps += 1
        name = origin.decode("ascii", "replace")
        self._losses.add(
            "missed",
            count,
            f"from publisher {name[:12]} (numbers {seq - count}-{seq - 1})"
            if count > 1
            else f"from publisher {name[:12]} (number {seq - 1})",
        )
        on_missed = self._settings.on_missed
        if on_missed is not None:
            try:
                on_missed(name, count)
            except Exception:
                logger.exception("Redis backplane %s: on_missed failed", self.url)

    def _malformed_entry(self, why: str) -> None:
        self._malformed += 1
        self._losses.add("malformed", 1, why)

    # -------------------------------------------------------------- sending

    async def _open_sender(self) -> RedisLink:
        link = await self._open_link()
        try:
            with self._command_deadline("XTRIM"):
                # A write the stream needs anyway: it proves we may write.
                await link.call(
                    "XTRIM", self.stream, "MAXLEN", "~", self._settings.stream_maxlen
                )
            if self._sender_connected_before and self._is_new_instance(
                self._sender_run_id, link.run_id
            ):
                self._new_instance(link.run_id)
            self._sender_run_id = link.run_id
            self._sender_connected_before = True
        except BaseException:
            await link.aclose()
            raise
        self._set_state(publishing=True)
        return link

    def _new_instance(self, run_id: str | None) -> None:
        self._new_instances += 1
        again = self._outbox.new_instance()
        if run_id is None:
            why = "Redis does not say whether it restarted (INFO is not allowed)"
        else:
            why = f"Redis is a new instance (run_id {run_id[:12]})"
        if again:
            logger.warning(
                "Redis backplane %s: %s; sending the last %d acknowledged "
                "messages again (receivers drop the ones they have)",
                self.url,
                why,
                again,
            )
        else:
            logger.info("Redis backplane %s: %s", self.url, why)

    async def _send_loop(self, link: RedisLink | None) -> None:
        try:
            while True:
                if link is None:
                    link = await self._reconnect(self._open_sender, "publishing")
                try:
                    await self._pump(link)
                except (LinkError, RedisRefused) as exc:
                    failure: Exception = exc
                await link.aclose()
                link = None
                self._outbox.rewind()
                self._set_state(publishing=False)
                self._lost("publishing", failure)
        finally:
            if link is not None:
                await link.aclose()

    async def _pump(self, link: RedisLink) -> None:
        settings = self._settings
        outbox = self._outbox
        while True:
            if self._wakeup.is_set():
                self._wakeup = trio.Event()
            self._count(
                outbox.expire(trio.current_time(), connected=True), self._age_reason
            )
            self._update_idle()
            batch = outbox.next_batch(_BATCH, _BATCH_BYTES)
            if batch:
                await self._xadd(link, [(held.seq, held.message) for held in batch])
                continue
            if not self._check_now:
                with trio.move_on_after(settings.health_check_interval):
                    await self._wakeup.wait()
                if self._wakeup.is_set() and not self._check_now:
                    continue
            self._check_now = False
            with self._command_deadline("PING (health check)"):
                await link.call("PING")

    async def _xadd(self, link: RedisLink, batch: list[tuple[int, bytes]]) -> None:
        maxlen = self._settings.stream_maxlen
        commands: list[tuple[bytes | str | int, ...]] = [("MULTI",)]
        for seq, message in batch:
            commands.append(
                (
                    "XADD",
                    self.stream,
                    "MAXLEN",
                    "~",
                    maxlen,
                    "*",
                    *encode_entry(self._origin, seq),
                    FIELD_MESSAGE,
                    message,
                )
            )
        commands.append(("EXEC",))
        with self._command_deadline(f"{len(batch)} XADD"):
            await link.send(*commands)
            replies = [await link.next_reply() for _ in commands]
        result = replies[-1]
        if isinstance(result, list):
            replies += result  # errors of commands that ran
        refused = next((r for r in replies if isinstance(r, ReplyError)), None)
        if refused is not None:
            # Nothing is acknowledged; what did go in is sent again and
            # receivers drop the copies.
            raise _refusal_or_failure("XADD", refused)
        if not isinstance(result, list) or len(result) != len(batch):
            raise LinkError(f"EXEC returned {result!r:.80}")
        first, again = self._outbox.acknowledge(len(batch), trio.current_time())
        self._sent += first
        self._resent += again
        self._update_idle()

    # ------------------------------------------------------- both directions

    async def _open_link(self) -> RedisLink:
        timeout = self._settings.connect_timeout
        with trio.move_on_after(timeout) as scope:
            return await open_link(
                self._address,
                ssl_context=self._settings.ssl_context,
                connect_timeout=timeout,
                max_bulk=max(self.max_payload, _MIN_BULK),
            )
        assert scope.cancelled_caught
        raise LinkError(f"connecting and logging in took over {timeout:g} s")

    def _command_deadline(self, what: str) -> AbstractContextManager[None]:
        return _deadline(self._settings.health_check_timeout, what)

    async def _reconnect(
        self, opener: Callable[[], Awaitable[RedisLink]], side: str
    ) -> RedisLink:
        settings = self._settings
        delay = settings.retry_delay
        began = trio.current_time()
        last_cause = ""
        while True:
            await trio.sleep(delay * random.uniform(0.5, 1.0))
            if side == "publishing":
                now = trio.current_time()
                self._count(self._outbox.expire(now, connected=False), self._age_reason)
                self._update_idle()
            try:
                link = await opener()
            except (LinkError, RedisRefused) as exc:
                self._failures += 1
                cause = str(exc)
                if cause != last_cause:  # say it when the cause changes
                    last_cause = cause
                    logger.log(
                        logging.ERROR
                        if isinstance(exc, RedisRefused)
                        else logging.DEBUG,
                        "Redis backplane %s: connecting for %s failed (%s); retrying",
                        self.url,
                        side,
                        cause,
                    )
                delay = min(delay * 2, max(settings.max_retry_delay, delay))
                continue
            logger.warning(
                "Redis backplane %s: %s again after %.1f s%s",
                self.url,
                side,
                trio.current_time() - began,
                self._resume_note(side),
            )
            return link

    def _resume_note(self, side: str) -> str:
        if side == "receiving":
            assert self._last_id is not None
            return f", from entry {self._last_id.decode()}"
        waiting = self._outbox.pending
        return f", {waiting} messages to send" if waiting else ""

    def _lost(self, side: str, failure: Exception) -> None:
        self._failures += 1
        logger.log(
            logging.ERROR if isinstance(failure, RedisRefused) else logging.WARNING,
            "Redis backplane %s: connection for %s lost (%s); reconnecting%s",
            self.url,
            side,
            _describe(failure),
            "" if side == "receiving" else "; messages published meanwhile wait",
        )

    def _is_new_instance(self, known: str | None, now: str | None) -> bool:
        return known is None or now is None or known != now

    def _set_state(
        self, *, receiving: bool | None = None, publishing: bool | None = None
    ) -> None:
        before = self.connected
        if receiving is not None:
            self._receiving = receiving
        if publishing is not None:
            self._publishing = publishing
        if self.connected != before:
            if self.connected:
                self._up.set()
                self._down = trio.Event()
            else:
                self._down.set()
                self._up = trio.Event()

    def _update_idle(self) -> None:
        if self._outbox.pending == 0:
            self._idle.set()
        elif self._idle.is_set():
            self._idle = trio.Event()

    @property
    def _full_reason(self) -> str:
        return f"pushed out of max_buffer={_size(self._settings.max_buffer)}"

    @property
    def _age_reason(self) -> str:
        return f"older than max_buffer_age={self._settings.max_buffer_age:g} s"

    def _count(self, losses: Losses, reason: str) -> None:
        if not losses:
            return
        self._dropped += losses.dropped
        self._unconfirmed += losses.unconfirmed
        self._losses.add("dropped", losses.dropped, reason)
        self._losses.add(
            "dropped",
            losses.unconfirmed,
            f"{reason}, sent before a connection failure (Redis may have them)",
        )


@contextmanager
def _deadline(seconds: float, what: str) -> Iterator[None]:
    """A LinkError naming ``what`` if the block takes over ``seconds``."""
    with trio.move_on_after(seconds) as scope:
        yield
    if scope.cancelled_caught:
        raise LinkError(
            f"no reply to {what} within {seconds:g} s (health_check_timeout)"
        )


def _refusal_or_failure(command: str, reply: ReplyError) -> Exception:
    if is_refusal(reply):
        return RedisRefused(f"{command} refused: {reply.message}")
    return LinkError(f"{command} failed: {reply.message}")


def _id_ms(entry_id: bytes) -> int:
    # The milliseconds part of a stream entry id ("1700000000000-3").
    head = entry_id.partition(b"-")[0]
    return int(head) if head.isdigit() else 0


def _nowhere(message: bytes) -> None:
    pass


def _size(n: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} bytes"


def _describe(exc: BaseException) -> str:
    # Name the cause, never the group around it.
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return str(exc) or type(exc).__name__
