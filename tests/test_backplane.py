"""RedisBackplane: its sans-IO parts on their own, then against a real
redis-server -- fan-out across processes, order, exactly-once delivery, and
the fault table: Redis killed and restarted empty, a subscriber dropped as too
slow, a frozen connection, bad URLs and credentials, Redis hung, outages
longer than the buffers.

Each test that needs Redis starts its own redis-server on a free loopback
port (no persistence) and stops it by PID.  Without a redis-server binary the
tests are skipped -- unless TRIONET_REQUIRE_REDIS is set (CI), when they fail
instead.  TRIONET_REDIS_SERVER names the binary (default: the one on PATH);
redis-cli is looked for next to it.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

import trionet
from trionet.channels import (
    BackplaneStatistics,
    ChannelConnection,
    ChannelServer,
    RedisBackplane,
    connect_channels,
    open_channel_server,
)
from trionet.channels._redis._entries import (
    MalformedEntry,
    Sequences,
    decode_entry,
    encode_entry,
)
from trionet.channels._redis._losslog import LossLog
from trionet.channels._redis._outbox import ENTRY_OVERHEAD, Losses, Outbox
from trionet.channels._redis._resp import (
    NEED_DATA,
    ArrayHeader,
    Reply,
    ReplyError,
    RespReader,
    Skipped,
    encode_command,
)
from trionet.channels._redis._url import parse_redis_url

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = bool(os.environ.get("TRIONET_REQUIRE_REDIS"))
STEP = 10.0  # seconds any one step may take before the test fails


# ===================================================== sans-IO: Redis URLs


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1", ("redis", "127.0.0.1", 6379, None, None, None, 0)),
        ("redis://u:p%40ss@h:7000/3", ("redis", "h", 7000, None, "u", "p@ss", 3)),
        (
            "rediss://:secret@[::1]:6380",
            ("rediss", "::1", 6380, None, None, "secret", 0),
        ),
        (
            "unix:///run/redis.sock?db=2",
            ("unix", None, 6379, "/run/redis.sock", None, None, 2),
        ),
        ("REDIS://host/", ("redis", "host", 6379, None, None, None, 0)),
    ],
)
def test_redis_urls_are_taken_apart(url: str, expected: tuple[object, ...]) -> None:
    address = parse_redis_url(url)
    assert (
        address.scheme,
        address.host,
        address.port,
        address.path,
        address.username,
        address.password,
        address.db,
    ) == expected
    assert "secret" not in repr(address) and "p@ss" not in repr(address)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("not a url", "no scheme"),
        ("http://127.0.0.1:6379", "scheme 'http'"),
        ("redis:/127.0.0.1", "must start with redis://"),
        ("redis://", "no host"),
        ("redis://:s3cret@h:99999", "port out of range"),
        ("redis://h:abc", "port"),
        ("redis://h/zero", "database 'zero' is not a number"),
        ("redis://h?db=1", "give the database as the path"),
        ("redis://h?timeout=1", "unknown query parameter 'timeout'"),
        ("redis://h#x", "fragment"),
        ("unix://", "no socket path"),
        ("unix://host:1/tmp/x", "a path, not a host"),
        ("", "no scheme"),
    ],
)
def test_a_bad_url_is_refused_when_the_backplane_is_made(url: str, why: str) -> None:
    with pytest.raises(ValueError, match="is not a valid Redis URL") as info:
        RedisBackplane(url)
    message = str(info.value)
    assert why in message
    assert "redis://" in message  # it says what a Redis URL looks like
    assert "s3cret" not in message


def test_a_url_that_is_not_a_str_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        RedisBackplane(b"redis://h")  # type: ignore[arg-type]


def test_the_url_is_shown_without_its_password() -> None:
    bp = RedisBackplane("redis://user:s3cret@127.0.0.1:6399/0")
    assert "s3cret" not in bp.url and "s3cret" not in repr(bp)
    assert bp.url == "redis://user:***@127.0.0.1:6399/0"
    assert bp.stream == "trionet:broadcast"
    other = RedisBackplane("redis://127.0.0.1:6399", channel_prefix="chat")
    assert other.stream == "chat:broadcast"
    assert other.origin != bp.origin and len(bp.origin) == 32


@pytest.mark.parametrize(
    "options",
    [
        {"max_payload": 0},
        {"max_buffer": 0},
        {"max_buffer": 1000, "max_payload": 2000},
        {"max_buffer_age": 0},
        {"max_buffer_age": float("inf")},
        {"resend_window": -1},
        {"stream_maxlen": 0},
        {"retry_delay": 0},
        {"health_check_interval": float("nan")},
        {"health_check_timeout": 0},
        {"channel_prefix": ""},
    ],
)
def test_options_are_checked(options: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RedisBackplane("redis://127.0.0.1:6399", **options)  # type: ignore[arg-type]


def test_option_types_are_checked() -> None:
    with pytest.raises(TypeError):
        RedisBackplane("redis://h", max_buffer=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        RedisBackplane("redis://h", on_missed=42)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        RedisBackplane("redis://h", ssl_context="yes")  # type: ignore[arg-type]


# ========================================================== sans-IO: RESP


def encode_reply(reply: Reply) -> bytes:
    """The test's own RESP2 encoder for replies (the library has none)."""
    if reply is None:
        return b"$-1\r\n"
    if isinstance(reply, bytes):
        return b"$%d\r\n%s\r\n" % (len(reply), reply)
    if isinstance(reply, str):
        return b"+%s\r\n" % reply.encode()
    if isinstance(reply, int):
        return b":%d\r\n" % reply
    if isinstance(reply, ReplyError):
        return b"-%s\r\n" % reply.message.encode()
    assert isinstance(reply, list)
    return b"*%d\r\n" % len(reply) + b"".join(encode_reply(r) for r in reply)


simple_text = st.text(
    st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)),
    max_size=20,
)
replies = st.recursive(
    st.none()
    | st.binary(max_size=40)
    | simple_text
    | st.integers(-(2**63), 2**63 - 1)
    | simple_text.map(lambda text: ReplyError("ERR " + text)),
    lambda inner: st.lists(inner, max_size=5),
    max_leaves=20,
)


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=200, deadline=None)
@given(st.lists(replies, min_size=1, max_size=4), st.lists(st.integers(0, 400)))
def test_replies_come_out_whole_however_the_bytes_are_cut(
    sent: list[Reply], cuts: list[int]
) -> None:
    reader = RespReader(max_bulk=1000, max_reply=100_000)
    got: list[Reply] = []
    for chunk in chunks(b"".join(encode_reply(r) for r in sent), cuts):
        reader.feed(chunk)
        while (reply := reader.next_reply()) is not NEED_DATA:
            got.append(reply)  # type: ignore[arg-type]
    assert got == sent
    assert reader.next_reply() is NEED_DATA and reader.buffered == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(replies, min_size=1, max_size=4), st.lists(st.integers(0, 400)))
def test_events_spell_out_the_same_replies(sent: list[Reply], cuts: list[int]) -> None:
    reader = RespReader(max_bulk=1000, max_reply=100_000)
    events: list[object] = []
    for chunk in chunks(b"".join(encode_reply(r) for r in sent), cuts):
        reader.feed(chunk)
        while (event := reader.next_event()) is not NEED_DATA:
            events.append(event)

    def flatten(reply: Reply) -> list[object]:
        if isinstance(reply, list):
            if not reply:
                return [ArrayHeader(0)]
            return [ArrayHeader(len(reply))] + [e for r in reply for e in flatten(r)]
        return [reply]

    assert events == [e for r in sent for e in flatten(r)]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(0, 200)))
def test_garbage_raises_only_protocol_error_and_the_reader_stays_failed(
    data: bytes, cuts: list[int]
) -> None:
    reader = RespReader(max_bulk=16, max_reply=64)
    try:
        for chunk in chunks(data, cuts):
            reader.feed(chunk)
            while reader.next_reply() is not NEED_DATA:
                pass
    except trionet.ProtocolError:
        with pytest.raises(trionet.ProtocolError):
            reader.next_event()


def test_an_oversized_bulk_string_is_skipped_without_being_buffered() -> None:
    reader = RespReader(max_bulk=10, max_reply=1 << 20)
    reader.feed(b"*3\r\n$5\r\nsmall\r\n$100000\r\n")
    assert reader.next_reply() is NEED_DATA
    for _ in range(100):
        reader.feed(b"x" * 1000)
        assert reader.buffered <= 1000  # discarded as it arrives
        assert reader.next_reply() is NEED_DATA
    reader.feed(b"\r\n:7\r\n")
    assert reader.next_reply() == [b"small", Skipped(100_000), 7]


@pytest.mark.parametrize(
    ("data", "complaint"),
    [
        (b"?what\r\n", "unknown type"),
        (b":12a\r\n", "invalid integer"),
        (b":\r\n", "invalid integer"),
        (b"$-2\r\n", "invalid bulk string length"),
        (b"* 1\r\n", "invalid array length"),
        (b"$3\r\nabcde", "not followed by CRLF"),
        (b"+" + b"x" * 70_000, "line of more than"),
        (b"*1\r\n" * 9, "nested arrays"),
        (b"*5\r\n" + (b"$30\r\n" + b"y" * 30 + b"\r\n") * 3, "reply of more than"),
    ],
)
def test_bad_replies_are_named(data: bytes, complaint: str) -> None:
    reader = RespReader(max_bulk=1000, max_reply=64)
    reader.feed(data)
    with pytest.raises(trionet.ProtocolError, match=complaint):
        while reader.next_reply() is not NEED_DATA:
            pass


def test_commands_are_arrays_of_bulk_strings() -> None:
    assert encode_command("XADD", b"k\r\n", 12) == (
        b"*3\r\n$4\r\nXADD\r\n$3\r\nk\r\n\r\n$2\r\n12\r\n"
    )
    assert ReplyError("WRONGPASS invalid password").code == "WRONGPASS"


# ================================================ sans-IO: stream entries


@given(
    st.binary(min_size=1, max_size=64),
    st.integers(1, 2**63 - 1),
    st.binary(max_size=100),
    st.lists(st.binary(max_size=10), max_size=4).map(lambda x: x[: len(x) // 2 * 2]),
)
def test_entries_round_trip_and_ignore_unknown_fields(
    origin: bytes, seq: int, message: bytes, extra: list[bytes]
) -> None:
    fields: list[object] = [b"x-" + f for f in extra[::2] for _ in (0,)]
    fields = [v for pair in zip(fields, extra[1::2], strict=False) for v in pair]
    fields += [*encode_entry(origin, seq), b"message", message]
    entry = decode_entry(fields)
    assert (entry.origin, entry.seq, entry.message) == (origin, seq, message)


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ([b"data", b"x"], "no 'message'"),
        ([b"message"], "odd number"),
        ([b"origin", b"o", b"message", b"m"], "go together"),
        ([b"seq", b"1", b"message", b"m"], "go together"),
        ([b"origin", b"o" * 65, b"seq", b"1", b"message", b"m"], "origin of 65"),
        ([b"origin", b"o", b"seq", b"0", b"message", b"m"], "out of range"),
        ([b"origin", b"o", b"seq", b"-1", b"message", b"m"], "not a decimal"),
        ([b"origin", b"o", b"seq", b"9" * 20, b"message", b"m"], "not a decimal"),
        ([b"message", Skipped(10**9)], "not a string"),
    ],
)
def test_malformed_entries_are_named(fields: list[object], why: str) -> None:
    with pytest.raises(MalformedEntry, match=why):
        decode_entry(fields)


def test_entries_without_origin_are_plain_messages() -> None:
    entry = decode_entry([b"message", b"hi", b"message", b"ignored copy"])
    assert (entry.origin, entry.seq, entry.message) == (None, None, b"hi")


def test_sequences_drop_copies_and_count_holes_per_origin() -> None:
    seqs = Sequences(max_origins=2)
    assert seqs.check(b"a", 5) == 0  # the first one seen sets the start
    assert seqs.check(b"a", 6) == 0
    assert seqs.check(b"a", 6) is None  # a copy
    assert seqs.check(b"a", 3) is None  # older than the last delivered
    assert seqs.check(b"a", 10) == 3  # 7, 8 and 9 never came
    assert seqs.check(b"b", 1) == 0
    assert seqs.check(b"a", 11) == 0  # a is now the most recent
    assert seqs.check(b"c", 1) == 0  # b is forgotten
    assert (seqs.last(b"a"), seqs.last(b"b"), len(seqs)) == (11, None, 2)


# ========================================================= sans-IO: outbox


def outbox(**options: float) -> Outbox:
    settings: dict[str, float] = {
        "max_bytes": 10 * (100 + ENTRY_OVERHEAD),
        "max_age": 30.0,
        "resend_window": 10.0,
    }
    settings.update(options)
    return Outbox(**settings)  # type: ignore[arg-type]


def test_the_outbox_keeps_order_through_failures_and_acknowledgements() -> None:
    box = outbox()
    for seq in range(1, 6):
        assert not box.append(seq, b"m%d" % seq, now=0.0)
    assert [h.seq for h in box.next_batch(3, 1 << 20)] == [1, 2, 3]
    box.rewind()  # the connection failed before the reply
    assert [h.seq for h in box.next_batch(10, 1 << 20)] == [1, 2, 3, 4, 5]
    assert box.acknowledge(2, now=1.0) == (2, 0)
    box.rewind()
    assert [h.seq for h in box.next_batch(10, 1 << 20)] == [3, 4, 5]
    assert box.acknowledge(3, now=1.0) == (3, 0)
    assert (box.pending, box.waiting, len(box)) == (0, 0, 5)
    # A new Redis instance gets everything held again, counted as resent.
    assert box.new_instance() == 5
    assert [h.seq for h in box.next_batch(10, 1 << 20)] == [1, 2, 3, 4, 5]
    assert box.acknowledge(5, now=2.0) == (0, 5)


def test_the_tail_is_kept_only_for_resend_window_of_connected_time() -> None:
    box = outbox(resend_window=10.0)
    box.append(1, b"x", now=0.0)
    box.next_batch(1, 100)
    box.acknowledge(1, now=0.0)
    assert not box.expire(100.0 - 70.0, connected=False)  # disconnected: kept
    assert len(box) == 1
    assert not box.expire(11.0, connected=True)  # the tail goes silently
    assert len(box) == 0 and box.size == 0


def test_messages_older_than_max_age_are_given_up_and_counted() -> None:
    box = outbox(max_age=5.0)
    for seq in (1, 2, 3):
        box.append(seq, b"x", now=float(seq))
    box.next_batch(1, 100)  # 1 is in flight: its fate is not known yet
    assert box.expire(10.0, connected=False) == Losses(dropped=2)
    box.rewind()  # now 1 may or may not have reached Redis
    assert box.expire(10.0, connected=False) == Losses(unconfirmed=1)
    assert len(box) == 0


def test_a_full_outbox_gives_up_the_tail_then_the_oldest_unsent() -> None:
    box = outbox(max_bytes=3 * (100 + ENTRY_OVERHEAD))
    for seq in (1, 2):
        box.append(seq, b"x" * 100, now=0.0)
    box.next_batch(1, 1 << 20)
    box.acknowledge(1, now=0.0)  # 1 is the tail
    box.next_batch(1, 1 << 20)  # 2 is in flight
    assert not box.append(3, b"x" * 100, now=0.0)  # fits
    assert not box.append(4, b"x" * 100, now=0.0)  # the tail (1) goes silently
    assert box.append(5, b"x" * 100, now=0.0) == Losses(dropped=1)  # 3 goes
    assert [h.seq for h in box.next_batch(10, 1 << 20)] == [4, 5]
    assert box.size <= box.max_bytes


def test_stopping_gives_up_what_redis_did_not_acknowledge() -> None:
    box = outbox()
    for seq in (1, 2, 3):
        box.append(seq, b"x", now=0.0)
    box.next_batch(2, 100)
    box.acknowledge(1, now=0.0)
    assert box.give_up() == Losses(dropped=1, unconfirmed=1)
    assert (len(box), box.pending) == (1, 0)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("publish"), st.integers(0, 300)),
            st.tuples(st.just("send"), st.integers(1, 4)),
            st.tuples(st.just("ack"), st.integers(0, 4)),
            st.tuples(st.just("fail"), st.just(0)),
            st.tuples(st.just("restart"), st.just(0)),
            st.tuples(st.just("tick"), st.integers(0, 20)),
        ),
        max_size=60,
    )
)
def test_outbox_bookkeeping_adds_up(steps: list[tuple[str, int]]) -> None:
    box = outbox(max_bytes=4 * (300 + ENTRY_OVERHEAD), max_age=15.0, resend_window=8.0)
    now, seq, published, sent = 0.0, 0, 0, 0
    losses = Losses()
    order: list[int] = []  # sequence numbers in the order they were sent
    for action, value in steps:
        if action == "publish":
            seq += 1
            published += 1
            losses += box.append(seq, b"x" * value, now)
        elif action == "send":
            order += [h.seq for h in box.next_batch(value, 1 << 20)]
        elif action == "ack":
            first, _again = box.acknowledge(min(value, box.in_flight), now)
            sent += first
        elif action == "fail":
            box.rewind()
        elif action == "restart":
            box.new_instance()
        else:
            now += value
            losses += box.expire(now, connected=value % 2 == 0)
        assert published == sent + box.waiting + losses.dropped + losses.unconfirmed
        assert box.size <= box.max_bytes + 4 * (300 + ENTRY_OVERHEAD)
    # Between failures and restarts, numbers go out in increasing order.
    assert all(isinstance(n, int) for n in order)


# ======================================================== sans-IO: loss log


async def test_loss_lines_are_rate_limited_but_every_count_is_written(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    log = LossLog(logging.getLogger("trionet"), "Redis backplane X", interval=10.0)
    log.define("missed", "messages never arrived here")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.run)
        log.add("missed", 3, "from publisher a")
        assert caplog.messages == [
            "Redis backplane X: 3 messages never arrived here "
            "(3 from publisher a); 3 in total"
        ]
        log.add("missed", 2, "from publisher a")
        log.add("missed", 4, "from publisher b")
        log.add("missed", 0, "nothing")
        assert len(caplog.messages) == 1  # within the interval: held back
        await trio.sleep(10.5)
        assert caplog.messages[1] == (
            "Redis backplane X: 6 messages never arrived here "
            "(4 from publisher b, 2 from publisher a); 9 in total"
        )
        log.add("missed", 1, "from publisher c")
        nursery.cancel_scope.cancel()
    log.flush()  # what is left is written at the end
    assert caplog.messages[2].endswith("(1 from publisher c); 10 in total")
    assert len(caplog.messages) == 3


# ====================================================== a real redis-server


def _missing(what: str) -> None:
    if REQUIRED:
        pytest.fail(f"{what} (TRIONET_REQUIRE_REDIS is set)")
    pytest.skip(what)


class RedisServer:
    """One redis-server process on a loopback port, started and stopped by us
    (by PID); its log is kept."""

    def __init__(self, binary: str, port: int, *args: str) -> None:
        self.binary = binary
        self.port = port
        self.args = args
        self.url = f"redis://127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log: collections.deque[str] = collections.deque(maxlen=2000)
        self._drainer: threading.Thread | None = None

    def start(self) -> None:
        """Start it and wait (bounded) until it accepts connections."""
        assert self.process is None
        process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--logfile",
                "",
                *self.args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.process = process
        assert process.stdout is not None
        deadline = time.monotonic() + STEP
        seen = b""
        while b"Ready to accept connections" not in seen:
            left = deadline - time.monotonic()
            fd = process.stdout.fileno()
            readable, _, _ = select.select([fd], [], [], max(left, 0))
            chunk = os.read(fd, 65536) if readable else b""
            if not chunk:
                self.stop()
                raise RuntimeError(f"redis-server did not start: {seen[-2000:]!r}")
            seen += chunk
        self.log.extend(seen.decode(errors="replace").splitlines())
        stdout = process.stdout

        def drain() -> None:  # so it never blocks on a full pipe
            for line in stdout:
                self.log.append(line.decode(errors="replace"))

        self._drainer = threading.Thread(target=drain, daemon=True)
        self._drainer.start()

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (or SIGKILL) it and wait; without persistence it comes
        back empty, as a new instance."""
        process, self.process = self.process, None
        if process is None:
            return
        process.send_signal(signal.SIGCONT)  # in case a test paused it
        if kill:
            process.kill()
        else:
            process.terminate()
        try:
            process.wait(timeout=STEP)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if self._drainer is not None:
            self._drainer.join(timeout=STEP)
            self._drainer = None
        if process.stdout is not None:
            process.stdout.close()

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def restart(self, kill: bool = False) -> None:
        self.stop(kill)
        await trio.to_thread.run_sync(self.start)

    async def cli(self, *args: str, stdin: bytes = b"") -> str:
        """Run redis-cli against it; its output."""
        binary = shutil.which("redis-cli", path=str(Path(self.binary).parent))
        binary = binary or shutil.which("redis-cli")
        if binary is None:
            _missing("no redis-cli binary")
        assert binary is not None
        with trio.fail_after(STEP):
            result = await trio.run_process(
                [binary, "-p", str(self.port), *args],
                stdin=stdin,
                capture_stdout=True,
                capture_stderr=True,
            )
        return result.stdout.decode()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _redis_binary() -> str:
    binary = os.environ.get("TRIONET_REDIS_SERVER") or shutil.which("redis-server")
    if not binary:
        _missing("no redis-server binary")
    assert binary is not None
    return binary


@asynccontextmanager
async def running_redis(*args: str) -> AsyncIterator[RedisServer]:
    server = RedisServer(_redis_binary(), _free_port(), *args)
    await trio.to_thread.run_sync(server.start)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def redis() -> AsyncIterator[RedisServer]:
    async with running_redis() as server:
        yield server


def backplane(redis: RedisServer, **options: object) -> RedisBackplane:
    # Fast reconnection and health checks, so faults are noticed quickly.
    settings: dict[str, object] = {
        "retry_delay": 0.02,
        "max_retry_delay": 0.2,
        "connect_timeout": 1.0,
        "health_check_interval": 1.0,
        "health_check_timeout": 1.0,
    }
    settings.update(options)
    return RedisBackplane(redis.url, **settings)  # type: ignore[arg-type]


async def idle(cc: ChannelConnection) -> None:
    # Greet first: a client that got "ready" is registered for publishes.
    await cc.publish("ready", "")
    await trio.sleep_forever()


async def receive_news(cc: ChannelConnection, count: int) -> list[str]:
    with trio.fail_after(STEP):
        return [(await cc.receive("news")).decode() for _ in range(count)]


async def clients(
    stack: AsyncExitStack, port: int, count: int
) -> list[ChannelConnection]:
    """``count`` clients of the server on ``port``, each greeted by its handler."""
    connected = []
    for _ in range(count):
        cc = await stack.enter_async_context(connect_channels("127.0.0.1", port))
        with trio.fail_after(STEP):
            await cc.receive("ready")
        connected.append(cc)
    return connected


async def servers(
    stack: AsyncExitStack, *backplanes: RedisBackplane
) -> list[ChannelServer]:
    return [
        await stack.enter_async_context(
            open_channel_server(idle, backplane=bp, grace_period=0)
        )
        for bp in backplanes
    ]


async def read_line(stream: trio.abc.ReceiveStream, decoder: trionet.Decoder) -> bytes:
    while True:
        line = decoder.next_message()
        if line is not None:
            return bytes(line)
        data = await stream.receive_some()
        if not data:
            raise EOFError("the other process closed its output")
        decoder.feed(data)


def stats(bp: RedisBackplane, *names: str) -> tuple[object, ...]:
    snapshot = bp.statistics()
    return tuple(getattr(snapshot, name) for name in names)


def loss_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [m for m in caplog.messages if "given up" in m or "never arrived" in m]


# --------------------------------------------------- a server in a process


def serve_in_subprocess() -> None:
    """A channel server on a backplane, for a test to run in its own process.

    argv: REDIS_URL.  Prints ``{"port": N}`` when it serves.  A client that
    publishes ``N`` on channel "publish" makes it publish ``B:0`` .. ``B:N-1``
    and then ``B:end`` on "news".  Stops when its stdin closes and prints its
    backplane's statistics.
    """
    url = sys.argv[1]

    async def main() -> None:
        bp = RedisBackplane(url)
        server: ChannelServer | None = None

        async def handler(cc: ChannelConnection) -> None:
            assert server is not None
            await cc.publish("ready", "")
            async for channel, data in cc:
                if channel == "publish":
                    for i in range(int(data)):
                        await server.publish("news", f"B:{i}")
                    await server.publish("news", "B:end")

        async with open_channel_server(handler, backplane=bp, grace_period=0) as srv:
            server = srv
            print(json.dumps({"port": srv.port}), flush=True)
            stdin = trio.lowlevel.FdStream(os.dup(0))
            async with stdin:
                while await stdin.receive_some():
                    pass
        print(json.dumps(attrs.asdict(bp.statistics())))

    trio.run(main)


def check_in_order(received: list[str], tags: tuple[str, ...], count: int) -> None:
    """Every tag's messages 0..count-1 then "end", each exactly once, in order."""
    for tag in tags:
        mine = [m.split(":", 1)[1] for m in received if m.startswith(f"{tag}:")]
        assert mine == [str(i) for i in range(count)] + ["end"], tag
    assert len(received) == len(tags) * (count + 1)


async def test_two_processes_every_client_gets_every_publish_once_in_order(
    redis: RedisServer,
) -> None:
    count = 100
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-c",
            "from tests.test_backplane import serve_in_subprocess as s; s()",
            redis.url,
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None and process.stdin is not None
        lines = trionet.Decoder(trionet.Lines())
        with trio.fail_after(STEP * 2):
            port_b = json.loads(await read_line(process.stdout, lines))["port"]
        bp_a = backplane(redis)
        async with AsyncExitStack() as stack:
            (server_a,) = await servers(stack, bp_a)
            assert bp_a.connected
            on_a = await clients(stack, server_a.port, 3)
            on_b = await clients(stack, port_b, 3)
            # Both publishers at once: A here, B in the other process.
            await on_b[0].publish("publish", str(count))
            for i in range(count):
                await server_a.publish("news", f"A:{i}")
            await server_a.publish("news", "A:end")
            for cc in on_a + on_b:
                received = await receive_news(cc, 2 * (count + 1))
                check_in_order(received, ("A", "B"), count)
                assert cc.drain("news") == []
        a = bp_a.statistics()
        assert (a.published, a.sent, a.received) == (count + 1,) * 3
        assert (a.dropped, a.missed, a.malformed, a.pending) == (0, 0, 0, 0)
        await process.stdin.aclose()
        with trio.fail_after(STEP):
            b = json.loads(await read_line(process.stdout, lines))
            assert await process.wait() == 0
        assert (b["received"], b["missed"], b["sent"]) == (count + 1, 0, count + 1)
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()  # our own child, by PID
            await process.wait()
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    await stream.aclose()


async def test_tcp_server_broadcast_over_the_backplane(redis: RedisServer) -> None:
    async def echo(conn: trionet.Connection) -> None:
        async for line in conn:
            await conn.send_line(line)

    options: dict[str, object] = {"framing": trionet.Lines(), "grace_period": 0}
    async with trionet.open_tcp_server(
        echo, backplane=backplane(redis), **options
    ) as one:
        async with trionet.open_tcp_server(
            echo, backplane=backplane(redis), **options
        ) as two:
            async with trionet.connect_tcp(
                "127.0.0.1", one.port, framing=trionet.Lines()
            ) as c1:
                async with trionet.connect_tcp(
                    "127.0.0.1", two.port, framing=trionet.Lines()
                ) as c2:
                    # Each server has its client once an echo came back.
                    for conn in (c1, c2):
                        await conn.send_line("hi")
                        with trio.fail_after(STEP):
                            assert await conn.receive_line() == b"hi"
                    await one.broadcast("from one")
                    await two.broadcast("from two")
                    with trio.fail_after(STEP):
                        for conn in (c1, c2):
                            got = {await conn.receive_line() for _ in range(2)}
                            assert got == {b"from one", b"from two"}


async def test_a_payload_over_the_limit_is_refused_before_anyone_gets_it(
    redis: RedisServer,
) -> None:
    bp = backplane(redis, max_payload=100)
    async with AsyncExitStack() as stack:
        (server,) = await servers(stack, bp)
        (cc,) = await clients(stack, server.port, 1)
        with pytest.raises(trionet.MessageTooLarge, match="max_payload"):
            await server.publish("news", b"x" * 100)  # plus the channel header
        await server.publish("news", "small")
        assert await receive_news(cc, 1) == ["small"]
    assert stats(bp, "published", "sent") == (1, 1)


async def test_a_backplane_serves_one_server_at_a_time(redis: RedisServer) -> None:
    bp = backplane(redis)
    async with open_channel_server(idle, backplane=bp):
        with pytest.raises(RuntimeError, match="one server at a time"):
            async with open_channel_server(idle, backplane=bp):
                pass  # pragma: no cover


async def test_a_unix_socket_url(tmp_path: Path) -> None:
    path = tmp_path / "redis.sock"
    async with running_redis("--unixsocket", str(path)) as redis:
        url = f"unix://{path}"
        bp_a, bp_b = RedisBackplane(url), RedisBackplane(url)
        async with AsyncExitStack() as stack:
            server_a, server_b = await servers(stack, bp_a, bp_b)
            (on_b,) = await clients(stack, server_b.port, 1)
            await server_a.publish("news", "over a unix socket")
            assert await receive_news(on_b, 1) == ["over a unix socket"]
        assert redis.port  # (the TCP port is unused here)


async def test_tls_with_rediss(tmp_path: Path, ca: trustme.CA) -> None:
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    tls_port = _free_port()
    async with running_redis(
        "--tls-port",
        str(tls_port),
        "--tls-cert-file",
        str(tmp_path / "cert.pem"),
        "--tls-key-file",
        str(tmp_path / "key.pem"),
        "--tls-auth-clients",
        "no",
    ):
        url = f"rediss://127.0.0.1:{tls_port}"
        context = ssl.create_default_context()
        ca.configure_trust(context)
        bp_a = RedisBackplane(url, ssl_context=context)
        bp_b = RedisBackplane(url, ssl_context=context)
        async with AsyncExitStack() as stack:
            server_a, server_b = await servers(stack, bp_a, bp_b)
            (on_b,) = await clients(stack, server_b.port, 1)
            await server_a.publish("news", "over TLS")
            assert await receive_news(on_b, 1) == ["over TLS"]
        # Without our CA the certificate does not verify: fatal, not retried.
        untrusting = RedisBackplane(url)
        async with trio.open_nursery() as nursery:
            with pytest.raises(trionet.ConnectError, match="certificate verify failed"):
                await nursery.start(untrusting.serve, lambda message: None)


# ------------------------------------------------- the wire format, by hand


@asynccontextmanager
async def line_server(bp: RedisBackplane) -> AsyncIterator[trionet.Connection]:
    """A TCP server with Lines framing on ``bp``, and one registered client."""

    async def echo(conn: trionet.Connection) -> None:
        async for line in conn:
            await conn.send_line(line)

    async with trionet.open_tcp_server(
        echo, backplane=bp, framing=trionet.Lines(), grace_period=0
    ) as server:
        async with trionet.connect_tcp(
            "127.0.0.1", server.port, framing=trionet.Lines()
        ) as conn:
            await conn.send_line("hi")  # registered once the echo is back
            with trio.fail_after(STEP):
                assert await conn.receive_line() == b"hi"
            yield conn


async def receive_lines(conn: trionet.Connection, count: int) -> list[bytes]:
    with trio.fail_after(STEP):
        return [await conn.receive_line() for _ in range(count)]


async def test_other_services_publish_with_redis_cli(redis: RedisServer) -> None:
    bp = backplane(redis)
    async with line_server(bp) as conn:
        out = await redis.cli("XADD", bp.stream, "*", "message", "hello")
        assert "-" in out  # the new entry's id
        assert await receive_lines(conn, 1) == [b"hello"]
    assert stats(bp, "received", "missed", "malformed") == (1, 0, 0)


async def test_a_channel_message_from_redis_cli(redis: RedisServer) -> None:
    bp = backplane(redis)
    async with AsyncExitStack() as stack:
        (server,) = await servers(stack, bp)
        (cc,) = await clients(stack, server.port, 1)
        # version 1, flags 0, name length 4, "news", then the data.  redis-cli
        # reads \\xHH escapes in double quotes from its standard input.
        command = f'XADD {bp.stream} * message "\\x01\\x00\\x00\\x04newshello"\n'
        await redis.cli(stdin=command.encode())
        assert await receive_news(cc, 1) == ["hello"]


async def test_sequence_numbers_drop_copies_and_name_holes(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    missed: list[tuple[str, int]] = []
    bp = backplane(redis, on_missed=lambda origin, n: missed.append((origin, n)))
    async with line_server(bp) as conn:
        for seq, text in ((1, "one"), (2, "two"), (2, "two again"), (5, "five")):
            await redis.cli(
                "XADD",
                bp.stream,
                "*",
                "origin",
                "svc",
                "seq",
                str(seq),
                "message",
                text,
            )
        # Not messages: no message field; origin without seq; a bad seq.
        await redis.cli("XADD", bp.stream, "*", "data", "x")
        await redis.cli("XADD", bp.stream, "*", "origin", "svc", "message", "m")
        await redis.cli(
            "XADD", bp.stream, "*", "origin", "svc", "seq", "x", "message", "m"
        )
        await redis.cli("XADD", bp.stream, "*", "message", "last")
        assert await receive_lines(conn, 4) == [b"one", b"two", b"five", b"last"]
    s = bp.statistics()
    assert (s.received, s.duplicates, s.missed, s.gaps, s.malformed) == (4, 1, 2, 1, 3)
    assert missed == [("svc", 2)]
    assert (
        "2 messages from other publishers never arrived here "
        "(holes in their sequence numbers) (2 from publisher svc (numbers 3-4)); "
        "2 in total"
    ) in caplog.text
    assert "3 in total" in caplog.messages[-1]  # the malformed ones


# ---------------------------------------------------------- the fault table


async def test_redis_killed_and_restarted_empty_loses_nothing(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Row 1, at a smaller scale: SIGKILL while publishing at a steady rate,
    # the same port again after a pause, no persistence.
    rate, before, during, after = 200, 60, 100, 40
    bp_a, bp_b = backplane(redis), backplane(redis)
    async with AsyncExitStack() as stack:
        server_a, server_b = await servers(stack, bp_a, bp_b)
        (on_a,) = await clients(stack, server_a.port, 1)
        on_b = await clients(stack, server_b.port, 2)
        sent = 0

        async def publish(count: int) -> None:
            nonlocal sent
            for _ in range(count):
                await server_a.publish("news", f"m:{sent}")
                sent += 1
                await trio.sleep(1 / rate)

        await publish(before)
        redis.stop(kill=True)
        await publish(during)  # 0.5 s without Redis
        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish, after)
            await redis.restart()
        total = before + during + after
        expected = [f"m:{i}" for i in range(total)]
        for cc in (on_a, *on_b):
            assert await receive_news(cc, total) == expected
            assert cc.drain("news") == []
    a, b = bp_a.statistics(), bp_b.statistics()
    assert (a.published, a.sent, a.dropped, a.unconfirmed) == (total, total, 0, 0)
    assert (b.received, b.missed, b.gaps) == (total, 0, 0)
    assert a.new_instances == 1 and a.resent == b.duplicates
    assert loss_lines(caplog) == []
    assert "connection for receiving lost (Redis closed the connection)" in caplog.text
    assert "Redis is a new instance" in caplog.text


async def test_redis_down_at_start_then_found(redis: RedisServer) -> None:
    redis.stop()
    bp_a, bp_b = backplane(redis), backplane(redis)
    async with AsyncExitStack() as stack:
        # The servers start anyway and deliver locally.
        server_a, server_b = await servers(stack, bp_a, bp_b)
        assert not bp_a.connected
        (on_a,) = await clients(stack, server_a.port, 1)
        (on_b,) = await clients(stack, server_b.port, 1)
        await server_a.publish("news", "early")
        assert await receive_news(on_a, 1) == ["early"]
        await redis.restart()
        with trio.fail_after(STEP):
            await bp_a.wait_connected()
        await server_a.publish("news", "late")
        # "early" waited for Redis, and B reads from when it started.
        assert await receive_news(on_b, 2) == ["early", "late"]
        assert await receive_news(on_a, 1) == ["late"]
    assert stats(bp_a, "sent", "dropped") == (2, 0)
    assert stats(bp_b, "received", "missed") == (2, 0)


async def test_a_subscriber_dropped_by_redis_as_too_slow_resumes_without_a_gap(
    redis: RedisServer,
) -> None:
    # Row 2.  B reads through a proxy that the test pauses while A publishes;
    # Redis then refuses to hold B's large reply and drops it.
    await redis.cli("CONFIG", "SET", "client-output-buffer-limit", "normal 64kb 32kb 0")
    count, size = 300, 1000
    bp_a = backplane(redis)
    async with TcpProxy(redis.port) as proxy:
        bp_b = backplane(redis, health_check_interval=STEP, health_check_timeout=STEP)
        bp_b._address = attrs.evolve(bp_b._address, port=proxy.port)
        async with AsyncExitStack() as stack:
            server_a, server_b = await servers(stack, bp_a, bp_b)
            (on_b,) = await clients(stack, server_b.port, 1)
            proxy.pause()
            for i in range(count):
                await server_a.publish("news", f"{i}:".ljust(size, "x"))
            await bp_a.flush(STEP)
            assert stats(bp_a, "sent") == (count,)
            proxy.resume()
            got = await receive_news(on_b, count)
            assert [m.split(":")[0] for m in got] == [str(i) for i in range(count)]
    b = bp_b.statistics()
    assert (b.received, b.missed, b.duplicates) == (count, 0, 0)
    assert b.connection_failures >= 1
    assert any("overcoming of output buffer limits" in line for line in redis.log)


async def test_a_frozen_connection_is_noticed_by_the_health_check(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Row 3: the proxy stops forwarding without closing anything.
    interval, timeout = 0.3, 0.3
    bp_a = backplane(redis)
    async with TcpProxy(redis.port) as proxy:
        bp_b = backplane(
            redis, health_check_interval=interval, health_check_timeout=timeout
        )
        bp_b._address = attrs.evolve(bp_b._address, port=proxy.port)
        async with AsyncExitStack() as stack:
            server_a, server_b = await servers(stack, bp_a, bp_b)
            (on_b,) = await clients(stack, server_b.port, 1)
            proxy.freeze()  # the connections open now, for good
            with trio.fail_after(interval + timeout + STEP / 2):
                await bp_b.wait_disconnected()
            await server_a.publish("news", "after the freeze")
            assert await receive_news(on_b, 1) == ["after the freeze"]
    assert "no reply from Redis within 0.6 s (health check" in caplog.text
    assert "ExceptionGroup" not in caplog.text and "sub-exception" not in caplog.text
    assert stats(bp_b, "missed", "received") == (0, 1)


async def test_redis_hung_then_resumed_loses_nothing_and_says_so(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Row 5: SIGSTOP, publish, SIGCONT.  A batch that timed out may still
    # reach Redis: it is sent again, never reported lost.
    fast = {"health_check_interval": 0.3, "health_check_timeout": 0.3}
    bp_a, bp_b = backplane(redis, **fast), backplane(redis, **fast)
    async with AsyncExitStack() as stack:
        server_a, server_b = await servers(stack, bp_a, bp_b)
        (on_b,) = await clients(stack, server_b.port, 1)
        await server_a.publish("news", "0")
        assert await receive_news(on_b, 1) == ["0"]
        redis.signal(signal.SIGSTOP)
        for i in range(1, 11):
            await server_a.publish("news", str(i))
        with trio.fail_after(STEP):
            await bp_a.wait_disconnected()
            await bp_b.wait_disconnected()
        redis.signal(signal.SIGCONT)
        assert await receive_news(on_b, 10) == [str(i) for i in range(1, 11)]
        await bp_a.flush(STEP)
    a, b = bp_a.statistics(), bp_b.statistics()
    assert (a.sent, a.dropped, a.unconfirmed, a.pending) == (11, 0, 0, 0)
    assert (b.received, b.missed) == (11, 0)
    assert loss_lines(caplog) == []
    assert "no reply" in caplog.text


async def test_an_outage_longer_than_the_buffers_is_counted_at_both_ends(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    missed: list[tuple[str, int]] = []
    bp_a = backplane(redis, max_payload=500, max_buffer=3 * (500 + 120))
    bp_b = backplane(redis, on_missed=lambda origin, n: missed.append((origin, n)))
    async with AsyncExitStack() as stack:
        server_a, server_b = await servers(stack, bp_a, bp_b)
        (on_b,) = await clients(stack, server_b.port, 1)
        await server_a.publish("news", "before")
        assert await receive_news(on_b, 1) == ["before"]
        redis.stop()
        with trio.fail_after(STEP):
            await bp_a.wait_disconnected()
        # Three fit in A's buffer; the seven before them are given up.
        for i in range(10):
            await server_a.publish("news", f"{i}:".ljust(400, "x"))
        assert stats(bp_a, "dropped", "pending") == (7, 3)
        await redis.restart()
        got = await receive_news(on_b, 3)
        assert [m.split(":")[0] for m in got] == ["7", "8", "9"]
    a, b = bp_a.statistics(), bp_b.statistics()
    assert (a.published, a.sent, a.dropped, a.unconfirmed) == (11, 4, 7, 0)
    assert (b.received, b.missed, b.gaps) == (4, 7, 1)
    assert missed == [(bp_a.origin, 7)]
    # A's lines (rate-limited) add up to 7; B names the same 7 at once.
    given_up = [line for line in loss_lines(caplog) if "given up" in line]
    assert sum(int(line.split(": ")[1].split()[0]) for line in given_up) == 7
    assert all("pushed out of max_buffer=1860 bytes" in line for line in given_up)
    assert given_up[-1].endswith("; 7 in total")
    assert any(
        "7 messages from other publishers never arrived" in line
        for line in loss_lines(caplog)
    )
    # Never "0 messages": every line names a positive count.
    assert all(" 0 messages" not in line for line in caplog.messages)


async def test_messages_waiting_at_shutdown_are_counted_and_logged(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    bp = backplane(redis)
    async with open_channel_server(
        idle, backplane=bp, grace_period=0, flush_timeout=0.1
    ) as server:
        redis.stop()
        with trio.fail_after(STEP):
            await bp.wait_disconnected()
        await server.publish("news", "never sent")
        await server.aclose(0)
    assert stats(bp, "dropped", "pending") == (1, 0)
    assert "still waiting when the backplane stopped" in caplog.text


# -------------------------------------------------- what is not an outage


async def test_a_wrong_password_fails_at_start_with_one_clear_exception() -> None:
    async with running_redis("--requirepass", "right") as redis:
        bp = RedisBackplane(f"redis://:s3cret@127.0.0.1:{redis.port}", retry_delay=STEP)
        with trio.fail_after(STEP):  # at once: not retried
            async with trio.open_nursery() as nursery:
                with pytest.raises(trionet.ConnectError) as info:
                    await nursery.start(bp.serve, lambda message: None)
        message = str(info.value)
        assert "WRONGPASS" in message and "s3cret" not in message
        assert f"redis://:***@127.0.0.1:{redis.port}" in message
        # No password at all, where one is needed.
        bare = RedisBackplane(redis.url)
        async with trio.open_nursery() as nursery:
            with pytest.raises(trionet.ConnectError, match="NOAUTH"):
                await nursery.start(bare.serve, lambda message: None)


async def test_a_user_who_may_not_write_fails_at_start() -> None:
    async with running_redis() as redis:
        await redis.cli(
            "ACL", "SETUSER", "reader", "on", ">pw", "~*", "+@read", "+info"
        )
        bp = RedisBackplane(f"redis://reader:pw@127.0.0.1:{redis.port}")
        async with trio.open_nursery() as nursery:
            with pytest.raises(trionet.ConnectError, match="NOPERM"):
                await nursery.start(bp.serve, lambda message: None)


async def test_a_key_of_another_type_fails_at_start(redis: RedisServer) -> None:
    bp = backplane(redis)
    await redis.cli("SET", bp.stream, "not a stream")
    async with trio.open_nursery() as nursery:
        with pytest.raises(trionet.ConnectError, match="WRONGTYPE"):
            await nursery.start(bp.serve, lambda message: None)


async def test_a_refused_backplane_reaches_whoever_started_the_server() -> None:
    async with running_redis("--requirepass", "right") as redis:
        bp = RedisBackplane(f"redis://:wrong@127.0.0.1:{redis.port}")
        with pytest.raises(trionet.ConnectError, match="WRONGPASS"):
            async with open_channel_server(idle, backplane=bp):
                pass  # pragma: no cover


# -------------------------------------------------------------- the proxy


@attrs.define
class _Forwarded:
    """One proxied connection: it forwards while its gate is set."""

    gate: trio.Event


class TcpProxy:
    """A loopback TCP proxy to a port, whose forwarding the test can stop.

    ``pause()`` stops forwarding on the connections open now and
    ``resume()`` lets them go on; ``freeze()`` stops them for good (new
    connections are forwarded).  Nothing is closed by pausing.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._live: list[_Forwarded] = []
        self._paused: list[_Forwarded] = []
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> TcpProxy:
        nursery = await self._stack.enter_async_context(trio.open_nursery())
        self._stack.callback(nursery.cancel_scope.cancel)
        listeners = await nursery.start(
            partial(trio.serve_tcp, self._forward, 0, host="127.0.0.1")
        )
        self.port = listeners[0].socket.getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stack.aclose()

    def pause(self) -> None:
        for conn in self._live:
            conn.gate = trio.Event()
        self._paused = list(self._live)

    def resume(self) -> None:
        for conn in self._paused:
            conn.gate.set()
        self._paused = []

    def freeze(self) -> None:
        self.pause()
        self._live = self._paused = []

    async def _forward(self, client: trio.SocketStream) -> None:
        conn = _Forwarded(trio.Event())
        conn.gate.set()
        self._live.append(conn)

        async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
            try:
                while True:
                    await conn.gate.wait()
                    data = await src.receive_some(65536)
                    if not data:
                        break
                    await conn.gate.wait()
                    await dst.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            nursery.cancel_scope.cancel()

        async with client:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            async with upstream, trio.open_nursery() as nursery:
                nursery.start_soon(pump, client, upstream)
                nursery.start_soon(pump, upstream, client)


# ------------------------------------------------------------- statistics


def test_statistics_are_a_frozen_snapshot() -> None:
    bp = RedisBackplane("redis://127.0.0.1:6399")
    snapshot = bp.statistics()
    assert isinstance(snapshot, BackplaneStatistics)
    assert attrs.asdict(snapshot) == {
        name: (False if name == "connected" else 0)
        for name in attrs.fields_dict(BackplaneStatistics)
    }
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        snapshot.sent = 1  # type: ignore[misc]
