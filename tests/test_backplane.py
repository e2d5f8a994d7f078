"""RedisBackplane against a real redis-server: fan-out across processes, order,
exactly-once delivery, losing and regaining Redis, size limits, hostile input.

Each test that needs Redis starts its own redis-server on a free loopback
port (no persistence) and stops it by PID.  Without a redis-server binary or
coredis the tests are skipped -- unless TRIONET_REQUIRE_REDIS is set (CI),
when they fail instead.  TRIONET_REDIS_SERVER names the binary (default: the
one on PATH).
"""

from __future__ import annotations

import gc
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio

import trionet
from trionet.channels import (
    ChannelConnection,
    ChannelServer,
    RedisBackplane,
    connect_channels,
    open_channel_server,
)

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = bool(os.environ.get("TRIONET_REQUIRE_REDIS"))
STEP = 10.0  # seconds any one step may take before the test fails


def _missing(what: str) -> None:
    if REQUIRED:
        pytest.fail(f"{what} (TRIONET_REQUIRE_REDIS is set)")
    pytest.skip(what)


class RedisServer:
    """One redis-server process on a loopback port, started and stopped by us."""

    def __init__(self, binary: str, port: int) -> None:
        self.binary = binary
        self.port = port
        self.url = f"redis://127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None
        self._drainer: threading.Thread | None = None

    def start(self) -> None:
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
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.process = process
        assert process.stdout is not None
        # Ready when it says so; bounded by a deadline.
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
        # Keep reading its log so it never blocks on a full pipe.
        self._drainer = threading.Thread(
            target=lambda: process.stdout.read(), daemon=True
        )
        self._drainer.start()

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()  # our own child, by PID
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    binary = os.environ.get("TRIONET_REDIS_SERVER") or shutil.which("redis-server")
    if not binary:
        _missing("no redis-server binary")
    try:
        import coredis  # noqa: F401
    except ModuleNotFoundError:
        _missing("coredis is not installed (pip install 'trionet[redis]')")
    assert binary is not None
    server = RedisServer(binary, _free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
        # coredis leaves the buffers of a connection attempt that failed
        # (Redis was down) unclosed; collect them here rather than let their
        # ResourceWarning land in whichever test runs at the next collection.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()


def backplane(redis: RedisServer, **options: object) -> RedisBackplane:
    # Fast reconnection so a restarted Redis is found again quickly.
    return RedisBackplane(
        redis.url,
        retry_delay=0.02,
        max_retry_delay=0.2,
        **options,  # type: ignore[arg-type]
    )


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


async def read_line(stream: trio.abc.ReceiveStream, decoder: trionet.Decoder) -> bytes:
    while True:
        line = decoder.next_message()
        if line is not None:
            return bytes(line)
        data = await stream.receive_some()
        if not data:
            raise EOFError("the other process closed its output")
        decoder.feed(data)


# --------------------------------------------------- a server in a process


def serve_in_subprocess() -> None:
    """A channel server on a backplane, for a test to run in its own process.

    argv: REDIS_URL.  Prints ``{"port": N}`` when it serves.  A client that
    publishes ``N`` on channel "publish" makes it publish ``B:0`` .. ``B:N-1``
    and then ``B:end`` on "news".  Stops when its stdin closes and prints its
    backplane's stats.
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
        stats = bp.stats
        print(json.dumps({"received": stats.received, "missed": stats.missed}))

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
            server_a = await stack.enter_async_context(
                open_channel_server(idle, backplane=bp_a, grace_period=0)
            )
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
        stats = bp_a.stats
        assert stats.published == count + 1
        assert stats.sent == count + 1
        assert stats.received == count + 1
        assert (stats.not_delivered, stats.missed, stats.malformed) == (0, 0, 0)
        await process.stdin.aclose()
        with trio.fail_after(STEP):
            stats_b = json.loads(await read_line(process.stdout, lines))
            assert await process.wait() == 0
        assert stats_b == {"received": count + 1, "missed": 0}
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()  # our own child, by PID
            await process.wait()
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    await stream.aclose()


async def test_losing_redis_keeps_local_delivery_and_counts_the_gap(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    bp_a, bp_b = backplane(redis), backplane(redis)
    async with AsyncExitStack() as stack:
        server_a = await stack.enter_async_context(
            open_channel_server(idle, backplane=bp_a, grace_period=0)
        )
        server_b = await stack.enter_async_context(
            open_channel_server(idle, backplane=bp_b, grace_period=0)
        )
        (on_a,) = await clients(stack, server_a.port, 1)
        (on_b,) = await clients(stack, server_b.port, 1)
        for i in range(10):
            await server_a.publish("news", f"up:{i}")
        expected = [f"up:{i}" for i in range(10)]
        assert await receive_news(on_a, 10) == expected
        assert await receive_news(on_b, 10) == expected

        redis.stop()
        with trio.fail_after(STEP):
            await bp_a.wait_disconnected()
            await bp_b.wait_disconnected()
        for i in range(5):
            await server_a.publish("news", f"down:{i}")
        # Local delivery goes on; the gap is counted at once.
        assert await receive_news(on_a, 5) == [f"down:{i}" for i in range(5)]
        assert bp_a.stats.not_delivered == 5

        redis.start()
        with trio.fail_after(STEP):
            await bp_a.wait_connected()
            await bp_b.wait_connected()
        for i in range(10):
            await server_a.publish("news", f"again:{i}")
        await server_b.publish("news", "from-b")
        expected = [f"again:{i}" for i in range(10)]
        for cc in (on_a, on_b):
            # B never saw the "down" messages: its next ones are these.
            got = await receive_news(cc, 11)
            assert [m for m in got if m != "from-b"] == expected
            assert "from-b" in got
    a, b = bp_a.stats, bp_b.stats
    assert (a.published, a.sent, a.not_delivered) == (25, 20, 5)
    assert (b.received, b.missed) == (20, 5)
    assert (a.received, a.missed) == (1, 0)
    assert a.connection_failures >= 1 and b.connection_failures >= 1
    assert not a.connected and not b.connected  # the servers are closed
    assert "unavailable" in caplog.text
    assert "reconnected" in caplog.text


async def test_redis_down_at_start_then_found(redis: RedisServer) -> None:
    redis.stop()
    bp_a, bp_b = backplane(redis), backplane(redis)
    async with AsyncExitStack() as stack:
        # The servers start anyway and deliver locally.
        server_a = await stack.enter_async_context(
            open_channel_server(idle, backplane=bp_a, grace_period=0)
        )
        server_b = await stack.enter_async_context(
            open_channel_server(idle, backplane=bp_b, grace_period=0)
        )
        assert not bp_a.connected
        (on_a,) = await clients(stack, server_a.port, 1)
        (on_b,) = await clients(stack, server_b.port, 1)
        await server_a.publish("news", "early")
        assert await receive_news(on_a, 1) == ["early"]
        redis.start()
        with trio.fail_after(STEP):
            await bp_a.wait_connected()
            await bp_b.wait_connected()
        await server_a.publish("news", "late")
        assert await receive_news(on_b, 1) == ["late"]
        assert await receive_news(on_a, 1) == ["late"]
    assert bp_a.stats.not_delivered == 1
    # B never heard of "early" -- A's first message it saw was "late".
    assert (bp_b.stats.received, bp_b.stats.missed) == (1, 0)


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
        server = await stack.enter_async_context(
            open_channel_server(idle, backplane=bp, grace_period=0)
        )
        (cc,) = await clients(stack, server.port, 1)
        with pytest.raises(trionet.MessageTooLarge, match="max_payload"):
            await server.publish("news", b"x" * 100)  # plus the channel header
        await server.publish("news", "small")
        assert await receive_news(cc, 1) == ["small"]
    assert bp.stats.published == 1


async def test_foreign_and_replayed_messages_are_dropped_and_counted(
    redis: RedisServer,
) -> None:
    import coredis

    bp_a, bp_b = backplane(redis), backplane(redis)
    captured: list[bytes] = []
    async with AsyncExitStack() as stack:
        server_a = await stack.enter_async_context(
            open_channel_server(idle, backplane=bp_a, grace_period=0)
        )
        server_b = await stack.enter_async_context(
            open_channel_server(idle, backplane=bp_b, grace_period=0)
        )
        client: coredis.Redis[bytes] = coredis.Redis.from_url(redis.url)
        await stack.enter_async_context(client)
        pubsub = await stack.enter_async_context(
            client.pubsub(channels=[bp_a.channel], ignore_subscribe_messages=True)
        )
        (on_b,) = await clients(stack, server_b.port, 1)
        await server_a.publish("news", "genuine")
        assert await receive_news(on_b, 1) == ["genuine"]
        with trio.fail_after(STEP):
            async for message in pubsub:
                captured.append(message["data"])
                break
        # Not an envelope; a wrong version; and a replay of A's message.
        for junk in (b"", b"hello", b"\x02" + captured[0][1:], captured[0]):
            await client.publish(bp_a.channel, junk)
        await server_a.publish("news", "still fine")
        assert await receive_news(on_b, 1) == ["still fine"]
        assert on_b.drain("news") == []
    assert bp_b.stats.malformed == 4
    assert bp_b.stats.received == 2
    assert bp_a.stats.malformed == 3  # A ignores its own replayed message


async def test_a_backplane_serves_one_server_at_a_time(redis: RedisServer) -> None:
    bp = backplane(redis)
    async with open_channel_server(idle, backplane=bp):
        with pytest.RaisesGroup(
            pytest.RaisesExc(RuntimeError, match="one server at a time"),
            flatten_subgroups=True,
        ):
            async with open_channel_server(idle, backplane=bp):
                pass  # pragma: no cover


# ------------------------------------------------------ no Redis needed


def test_the_url_is_shown_without_its_password() -> None:
    pytest.importorskip("coredis")
    bp = RedisBackplane("redis://user:s3cret@127.0.0.1:6399/0")
    assert "s3cret" not in bp.url and "s3cret" not in repr(bp)
    assert bp.url == "redis://user:***@127.0.0.1:6399/0"
    assert bp.channel == "trionet:broadcast"
    other = RedisBackplane("redis://127.0.0.1:6399", channel_prefix="chat")
    assert other.channel == "chat:broadcast"
    assert other.origin != bp.origin


@pytest.mark.parametrize(
    "options",
    [{"max_payload": 0}, {"queue_size": 0}, {"retry_delay": 0}, {"channel_prefix": ""}],
)
def test_options_are_checked(options: dict[str, object]) -> None:
    pytest.importorskip("coredis")
    with pytest.raises(ValueError):
        RedisBackplane("redis://127.0.0.1:6399", **options)  # type: ignore[arg-type]


def test_without_coredis_the_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "coredis", None)
    with pytest.raises(ModuleNotFoundError, match=r"trionet\[redis\]"):
        RedisBackplane("redis://127.0.0.1:6399")
