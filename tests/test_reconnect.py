"""trionet.reconnecting: connections one after another, through server
restarts, with backoff, limits, statistics and deterministic cleanup; and
connect_tcp(local_address=...)."""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable, Iterator

import pytest
import trio
import trio.testing

import trionet
import trionet._reconnect
import trionet.channels
from trionet import CloseReason, ConnectError

LINES = trionet.Lines()

#: Every test here runs over the kernel and over a memory network.
pytestmark = pytest.mark.usefixtures("network")


@pytest.fixture
def reserved_port() -> Iterator[int]:
    """A loopback port kept for the whole test: bound (SO_REUSEADDR) but never
    listening, so servers can come and go on it and nobody else takes it."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


class Jitter:
    """Stands in for the random draw of the backoff: records each bound
    (ceiling) and when it was drawn, returns ``fraction`` of it, and wakes
    whoever waits for a condition on the iterator's state."""

    def __init__(self, fraction: float = 1.0) -> None:
        self.fraction = fraction
        self.ceilings: list[float] = []
        self.times: list[float] = []
        self._waiting: list[tuple[Callable[[], bool], trio.Event]] = []

    def __call__(self, low: float, high: float) -> float:
        assert low == 0
        self.ceilings.append(high)
        self.times.append(trio.current_time())
        for condition, event in self._waiting:
            if condition():
                event.set()
        return high * self.fraction

    async def until(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition()`` holds at a draw (checked at each one)."""
        event = trio.Event()
        self._waiting.append((condition, event))
        await event.wait()


@pytest.fixture
def jitter(monkeypatch: pytest.MonkeyPatch) -> Jitter:
    recorder = Jitter()
    monkeypatch.setattr(trionet._reconnect, "_uniform", recorder)
    return recorder


def greeter(name: str, greeted: trio.Event | None = None) -> trionet._server.Handler:
    """A handler that says ``name`` and keeps the connection until shutdown."""

    async def greet(conn: trionet.Connection) -> None:
        await conn.send(name)
        if greeted is not None:
            greeted.set()
        await trio.sleep_forever()

    return greet


# ----------------------------------------------------------- a server's life


async def test_through_a_servers_whole_life(
    autojump_clock: trio.testing.MockClock,
    reserved_port: int,
    jitter: Jitter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="trionet")
    port = reserved_port
    got: list[bytes] = []
    arrived = [trio.Event(), trio.Event()]
    connections = trionet.reconnecting("127.0.0.1", port, framing=LINES, max_attempts=4)

    def failures() -> int:
        return connections.statistics().failures

    async def server_life() -> None:
        # Down at first: the client fails three times.
        await jitter.until(lambda: failures() >= 3)
        async with trionet.open_tcp_server(
            greeter("server 1"), port, host="127.0.0.1", grace_period=0, framing=LINES
        ):
            await arrived[0].wait()
            before = failures()
        # Restarting: down for two more failed attempts, then up again.
        await jitter.until(lambda: failures() >= before + 2)
        async with trionet.open_tcp_server(
            greeter("server 2"), port, host="127.0.0.1", grace_period=0, framing=LINES
        ):
            await arrived[1].wait()
        # ... and gone for good.

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server_life)
        async with connections:
            with pytest.raises(ConnectError) as info:
                async for conn in connections:
                    async for line in conn:  # one connection's life
                        arrived[len(got)].set()
                        got.append(line)
            stats = connections.statistics()
    assert got == [b"server 1", b"server 2"]
    assert stats.connections == 2
    assert stats.closed == {CloseReason.CLOSED_BY_PEER: 2}
    assert stats.consecutive_failures == 4
    assert stats.failures >= 3 + 2 + 4
    assert stats.attempts == stats.failures + stats.connections
    assert not stats.connected
    # The clear error at the end carries the last failure.
    error = info.value
    assert error.reason is CloseReason.ERROR
    assert "max_attempts (4) reached" in str(error)
    assert isinstance(error.__cause__, ConnectError)
    assert "Connection refused" in str(error.__cause__)
    assert connections.last_failure is error.__cause__
    # It has ended: iterating again stops at once.
    with pytest.raises(StopAsyncIteration):
        await connections.__anext__()
    # Every failure and every end is in the log, at a sensible level.
    where = f"127.0.0.1:{port}"
    records = [(r.levelno, r.getMessage()) for r in caplog.records]
    warnings = [m for level, m in records if level == logging.WARNING]
    assert (
        warnings == [f"cannot connect to {where}: Connection refused; trying again"] * 3
    )  # the first failure at the start, and after each connection
    ends = [m for _, m in records if m.startswith(f"connection to {where} ended")]
    assert len(ends) == 2
    assert all(m.endswith(": CLOSED_BY_PEER") for m in ends)
    assert any(m.startswith(f"connected to {where} after 3 failed") for _, m in records)
    debug = [m for level, m in records if level == logging.DEBUG]
    assert any("(attempt 2)" in m for m in debug)


async def test_the_backoff_doubles_up_to_its_cap(
    autojump_clock: trio.testing.MockClock, reserved_port: int, jitter: Jitter
) -> None:
    jitter.fraction = 0.5  # the wait is the drawn value, whatever it is
    connections = trionet.reconnecting(
        "127.0.0.1", reserved_port, max_attempts=12, backoff_max=20
    )
    with pytest.raises(ConnectError):
        async for _ in connections:
            pass  # pragma: no cover - never connects
    assert jitter.ceilings == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 20, 20, 20]
    # Each attempt waited exactly the drawn time after the one before.
    gaps = [b - a for a, b in zip(jitter.times, jitter.times[1:], strict=False)]
    assert gaps == pytest.approx([c * 0.5 for c in jitter.ceilings[:-1]], abs=1e-6)


async def test_the_real_jitter_stays_below_the_bound(
    autojump_clock: trio.testing.MockClock, reserved_port: int
) -> None:
    connections = trionet.reconnecting(
        "127.0.0.1", reserved_port, max_attempts=30, backoff_initial=1, backoff_max=4
    )
    start = trio.current_time()
    with pytest.raises(ConnectError):
        async for _ in connections:
            pass  # pragma: no cover - never connects
    elapsed = trio.current_time() - start
    # 29 waits, each drawn below min(4, 2**n): below their sum, above none.
    assert 0 < elapsed < 1 + 2 + 4 * 27


async def test_a_long_lived_connection_resets_the_backoff(
    autojump_clock: trio.testing.MockClock, jitter: Jitter
) -> None:
    async with trionet.open_tcp_server(
        greeter("hi"), host="127.0.0.1", framing=LINES, grace_period=0
    ) as server:
        count = 0
        async with trionet.reconnecting(
            "127.0.0.1", server.port, framing=LINES, reset_after=5
        ) as connections:
            async for conn in connections:
                assert await conn.receive() == b"hi"
                count += 1
                if count == 1:
                    await trio.sleep(6)  # (this connection lives 6 s)
                    continue  # -> closed; the next attempt goes at once
                if count == 2:
                    assert jitter.ceilings == []
                    continue  # short-lived: the next attempt waits
                break
            stats = connections.statistics()
    assert jitter.ceilings == [0.1]
    assert stats.connections == 3
    assert stats.closed == {CloseReason.CLOSED_BY_HOST: 2}
    assert stats.failures == 0
    assert server.statistics().accepted == 3


async def test_giving_up_after_reconnect_timeout(
    autojump_clock: trio.testing.MockClock, reserved_port: int, jitter: Jitter
) -> None:
    start = trio.current_time()
    with pytest.raises(ConnectError) as info:
        async with trionet.reconnecting(
            "127.0.0.1", reserved_port, reconnect_timeout=5
        ) as connections:
            async for _ in connections:
                pass  # pragma: no cover - never connects
    assert trio.current_time() - start <= 5
    assert "no connection within reconnect_timeout (5 s)" in str(info.value)
    assert "Connection refused" in str(info.value.__cause__)
    # The waits so far: 0.1 + 0.2 + 0.4 + 0.8 + 1.6 = 3.1 s; the next (3.2 s)
    # would start after the deadline, so it gave up instead.
    assert jitter.ceilings == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2]


async def test_a_summary_line_at_most_once_a_minute(
    autojump_clock: trio.testing.MockClock,
    reserved_port: int,
    jitter: Jitter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="trionet")
    with pytest.raises(ConnectError):
        async for _ in trionet.reconnecting(
            "127.0.0.1", reserved_port, max_attempts=14
        ):
            pass  # pragma: no cover - never connects
    # Waits: 0.1 ... 25.6 (51.1 s in all), then 30 s each.  The first
    # failure is a WARNING; then an INFO summary once 60 s have passed since
    # the last line above DEBUG (attempts 11, at 81.1 s, and 13, at 141.1 s).
    levels = [r.levelno for r in caplog.records]
    assert levels.count(logging.WARNING) == 1
    assert levels[0] == logging.WARNING
    summaries = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    where = f"127.0.0.1:{reserved_port}"
    assert [m.split(";")[0] for m in summaries] == [
        f"still no connection to {where}: 11 failed attempts in 81.1 s",
        f"still no connection to {where}: 13 failed attempts in 141.1 s",
    ]
    assert levels.count(logging.DEBUG) == 14 - 3


# ----------------------------------------------------------------- cleanup


async def test_a_bare_async_for_left_by_break_closes_the_connection() -> None:
    ended = trio.Event()

    async def greet_then_read(conn: trionet.Connection) -> None:
        await conn.send("hi")
        async for _ in conn:
            pass  # pragma: no cover - the client sends nothing

    async with trionet.open_tcp_server(
        greet_then_read,
        host="127.0.0.1",
        framing=LINES,
        on_close=lambda conn: ended.set(),
    ) as server:
        async for conn in trionet.reconnecting("127.0.0.1", server.port, framing=LINES):
            assert await conn.receive() == b"hi"
            break
        # Leaving the loop dropped the iterator, which closed the connection.
        assert conn.close_reason is CloseReason.CLOSED_BY_HOST
        await ended.wait()
        assert server.statistics().closed == {CloseReason.CLOSED_BY_PEER: 1}


async def test_an_exception_in_the_body_closes_the_connection_gracefully() -> None:
    received: list[bytes] = []

    async def collect(conn: trionet.Connection) -> None:
        async for line in conn:
            received.append(line)

    async with trionet.open_tcp_server(
        collect, host="127.0.0.1", framing=LINES
    ) as server:
        with pytest.raises(KeyError):  # as itself, not in a group
            async with trionet.reconnecting(
                "127.0.0.1", server.port, framing=LINES
            ) as connections:
                async for conn in connections:
                    await conn.send("last words")
                    raise KeyError("the body failed")
        assert conn.close_reason is CloseReason.CLOSED_BY_HOST
        assert connections.statistics().closed == {CloseReason.CLOSED_BY_HOST: 1}
        assert connections.connection is None
    assert received == [b"last words"]


async def test_cancelled_while_waiting_to_reconnect_leaves_nothing_behind(
    autojump_clock: trio.testing.MockClock, reserved_port: int, jitter: Jitter
) -> None:
    with trio.move_on_after(10) as scope:
        async with trionet.reconnecting("127.0.0.1", reserved_port) as connections:
            async for _ in connections:
                pass  # pragma: no cover - never connects
    assert scope.cancelled_caught
    assert connections.statistics().failures >= 5
    # (and no socket is left open: the fixture checks every test for that)


async def test_continue_moves_on_to_a_new_connection() -> None:
    async with trionet.open_tcp_server(
        greeter("hi"), host="127.0.0.1", framing=LINES, grace_period=0
    ) as server:
        seen: list[trionet.Connection] = []
        async with trionet.reconnecting(
            "127.0.0.1", server.port, framing=LINES
        ) as connections:
            async for conn in connections:
                seen.append(conn)
                if len(seen) == 3:
                    break
                # (the body moves on without reading: this one is closed)
        assert [c.close_reason for c in seen[:2]] == [CloseReason.CLOSED_BY_HOST] * 2
        assert seen[2].close_reason is CloseReason.CLOSED_BY_HOST  # by aclose
        assert len(set(map(id, seen))) == 3


# ------------------------------------------------- TLS, UNIX paths, channels


async def test_reconnecting_over_tls(
    autojump_clock: trio.testing.MockClock,
    reserved_port: int,
    jitter: Jitter,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    got: list[bytes] = []
    arrived = [trio.Event(), trio.Event()]

    async def servers() -> None:
        for name, event in zip(["one", "two"], arrived, strict=True):
            async with trionet.open_tcp_server(
                greeter(name),
                reserved_port,
                host="127.0.0.1",
                framing=LINES,
                ssl_context=server_context,
                grace_period=0,
            ):
                await event.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(servers)
        async with trionet.reconnecting(
            "127.0.0.1",
            reserved_port,
            framing=LINES,
            ssl_context=client_context,
            server_hostname="localhost",
        ) as connections:
            async for conn in connections:
                async for line in conn:
                    got.append(line)
                    arrived[len(got) - 1].set()
                if len(got) == 2:
                    break
    assert got == [b"one", b"two"]


async def test_a_channel_subscriber_survives_a_restart_on_a_unix_path(
    autojump_clock: trio.testing.MockClock, unix_path: str, jitter: Jitter
) -> None:
    news: list[bytes] = []
    received = [trio.Event(), trio.Event()]

    async def publisher() -> None:
        for issue in range(2):
            subscribed = trio.Event()

            async def handler(
                cc: trionet.channels.ChannelConnection,
                subscribed: trio.Event = subscribed,
            ) -> None:
                subscribed.set()
                await trio.sleep_forever()

            async with trionet.channels.open_unix_channel_server(
                handler, unix_path, grace_period=0
            ) as server:
                await subscribed.wait()
                await server.publish("news", f"issue {issue}")
                await received[issue].wait()
            # (the server is down here until the next one starts)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(publisher)
        async with trionet.reconnecting(path=unix_path) as connections:
            async for conn in connections:
                async with trionet.channels.ChannelConnection(conn) as cc:
                    async for channel, data in cc:
                        assert channel == "news"
                        news.append(data)
                        received[len(news) - 1].set()
                # (each server's shutdown ended the subscription cleanly)
                if len(news) == 2:
                    break
    stats = connections.statistics()
    assert news == [b"issue 0", b"issue 1"]
    assert stats.connections == 2
    assert stats.closed == {CloseReason.CLOSED_BY_PEER: 2}


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((), {}, "give host and port"),
        (("127.0.0.1",), {}, "give host and port"),
        (("127.0.0.1", 80), {"path": "/tmp/x.sock"}, "not both"),
        ((), {"path": "/tmp/x.sock", "local_address": "127.0.0.1"}, "UNIX"),
        (("h", 1), {"backoff_factor": 0.5}, "backoff_factor must be >= 1"),
        (("h", 1), {"backoff_initial": 0}, "backoff_initial must be > 0"),
        (("h", 1), {"max_attempts": 0}, "max_attempts must be at least 1"),
        (("h", 1), {"reconnect_timeout": -1}, "reconnect_timeout must be > 0"),
        (("h", 1), {"reset_after": -1}, "reset_after must be >= 0"),
    ],
)
def test_bad_arguments(
    args: tuple[object, ...], kwargs: dict[str, object], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        trionet.reconnecting(*args, **kwargs)  # type: ignore[arg-type]


async def test_other_errors_are_raised_at_once(unix_path: str) -> None:
    # A TLS context that needs a host name, over a UNIX path: the caller's
    # mistake, not a failure to connect, so no retrying.
    client = ssl.create_default_context()
    async with trionet.open_unix_server(greeter("hi"), unix_path, grace_period=0):
        connections = trionet.reconnecting(path=unix_path, ssl_context=client)
        with pytest.raises(ValueError, match="server_hostname"):
            await connections.__anext__()
        assert connections.statistics().attempts == 1


# ------------------------------------------------------------ local_address


def _loopback_alias() -> bool:
    try:
        with socket.socket() as sock:
            sock.bind(("127.0.0.2", 0))
    except OSError:
        return False
    return True


needs_alias = pytest.mark.skipif(not _loopback_alias(), reason="no 127.0.0.2 here")


@needs_alias
async def test_connect_tcp_binds_the_local_address() -> None:
    seen: list[object] = []

    async def where_from(conn: trionet.Connection) -> None:
        seen.append(conn.remote_address)

    async with trionet.open_tcp_server(
        where_from,
        host="127.0.0.1",
        accept=lambda address: seen.append(address) or True,
    ) as server:
        async with trionet.connect_tcp(
            "127.0.0.1", server.port, local_address="127.0.0.2"
        ) as conn:
            assert conn.local_address is not None
            assert conn.local_address[0] == "127.0.0.2"
            assert await conn.receive_some() == b""  # the handler returned
        connections = trionet.reconnecting(
            "127.0.0.1", server.port, local_address="127.0.0.2"
        )
        async for conn in connections:
            assert conn.local_address is not None
            assert conn.local_address[0] == "127.0.0.2"
            break
        await connections.aclose()
    assert [address[0] for address in seen] == ["127.0.0.2"] * 4  # type: ignore[index]


async def test_a_local_address_that_cannot_be_used_is_a_connect_error() -> None:
    async with trionet.open_tcp_server(greeter("hi"), host="127.0.0.1") as server:
        with pytest.raises(ConnectError) as info:
            # 192.0.2.1 (TEST-NET-1) is no address of this host.
            await trionet.connect_tcp(
                "127.0.0.1", server.port, local_address="192.0.2.1"
            )
    assert info.value.reason is CloseReason.ERROR
    assert "local_address='192.0.2.1'" in str(info.value)
    assert f"cannot connect to 127.0.0.1:{server.port}" in str(info.value)


async def test_reconnecting_returns_the_documented_class() -> None:
    connections = trionet.reconnecting("127.0.0.1", 9)
    assert isinstance(connections, trionet.Reconnecting)
    assert repr(connections) == "<trionet.Reconnecting 127.0.0.1:9 not connected>"
    await connections.aclose()
    with pytest.raises(StopAsyncIteration):
        await connections.__anext__()
    assert connections.statistics().attempts == 0
