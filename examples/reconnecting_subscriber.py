"""A channel subscriber that survives server restarts (socket.engine's client
kept retrying a refused connection; trionet's does it the trio way).

``trionet.reconnecting(host, port, ...)`` is an async iterator of
connections: each iteration connects -- waiting between failed attempts,
with capped exponential backoff and jitter -- and hands over the open
connection; when the loop body is done with it (the server went away, or
the body moved on), the next iteration connects again.  No task runs in the
background, so nothing swallows an error, and leaving the ``async with``
block closes the current connection.  For :mod:`trionet.channels`, each
connection becomes a ``ChannelConnection``.

The demo runs a news server on a fixed port that publishes two issues to
each subscriber, then shuts down and comes back (three lives in all), and
one subscriber that

- starts before the server is up (its first attempts are refused),
- reads the news of every life of the server, one connection each,
- gives up once the server has been gone for good for ``reconnect_timeout``
  seconds, with a ConnectError that carries the last failure.

Every failed attempt and every connection's end is logged on the "trionet"
logger (printed here).  Run it with ``python examples/reconnecting_subscriber.py``;
it ends by itself in a few seconds.  With ``--selftest`` it also checks every
result and exits non-zero if one is wrong.
"""

from __future__ import annotations

import logging
import socket
import sys

import trio

import trionet
import trionet.channels

LIVES = 3
#: How long the server stays down between two lives (a restart).
DOWN_FOR = 0.3


def check(condition: bool, what: str) -> None:
    """Fail the self-test (even under ``python -O``) when ``condition`` is false."""
    if not condition:
        raise AssertionError(what)


def pick_port() -> int:
    """A free loopback port, for a server that must come back on the same one."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def news_server(port: int, read: trio.Semaphore) -> None:
    """Three lives of a server: publish two issues to the subscriber, stop."""
    await trio.sleep(DOWN_FOR)  # (down at first)
    for life in range(1, LIVES + 1):
        subscribed = trio.Event()

        async def handler(
            cc: trionet.channels.ChannelConnection, subscribed: trio.Event = subscribed
        ) -> None:
            subscribed.set()
            await trio.sleep_forever()

        async with trionet.channels.open_channel_server(
            handler, port, host="127.0.0.1", grace_period=0
        ) as server:
            print(f"server: life {life} on 127.0.0.1:{port}")
            await subscribed.wait()
            for issue in (1, 2):
                await server.publish("news", f"life {life}, issue {issue}")
                await read.acquire()  # (the subscriber read it)
        print(f"server: life {life} over")
        if life < LIVES:
            await trio.sleep(DOWN_FOR)  # restarting
    print("server: gone for good")


async def subscriber(port: int, read: trio.Semaphore) -> dict[str, object]:
    news: list[bytes] = []
    async with trionet.reconnecting(
        "127.0.0.1",
        port,
        backoff_initial=0.05,
        backoff_max=0.4,
        reconnect_timeout=1.5,
    ) as connections:
        try:
            async for conn in connections:
                async with trionet.channels.ChannelConnection(conn) as cc:
                    async for channel, data in cc:  # one connection's life
                        print(f"subscriber: {channel}: {data.decode()}")
                        news.append(data)
                        read.release()
        except trionet.ConnectError as exc:
            print(f"subscriber: {exc}")
            error: trionet.ConnectError | None = exc
        else:  # pragma: no cover - the loop only ends by giving up
            error = None
        stats = connections.statistics()
    print(f"subscriber: {stats}")
    return {"news": news, "error": error, "stats": stats}


async def main(selftest: bool) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("  log %(levelname)s: %(message)s"))
    logger = logging.getLogger("trionet")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    port = pick_port()
    read = trio.Semaphore(0, max_value=2 * LIVES)
    result: dict[str, object] = {}
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(news_server, port, read)
                result.update(await subscriber(port, read))
    finally:
        logger.removeHandler(handler)

    if selftest:
        expected = [
            f"life {life}, issue {issue}".encode()
            for life in range(1, LIVES + 1)
            for issue in (1, 2)
        ]
        check(result["news"] == expected, f"news {result['news']!r}")
        stats = result["stats"]
        assert isinstance(stats, trionet.ReconnectingStatistics)
        check(stats.connections == LIVES, f"connections {stats.connections}")
        check(
            stats.closed == {trionet.CloseReason.CLOSED_BY_PEER: LIVES},
            f"close reasons {stats.closed}",
        )
        check(stats.failures >= 2, f"failures {stats.failures}")
        error = result["error"]
        check(isinstance(error, trionet.ConnectError), f"error {error!r}")
        assert isinstance(error, trionet.ConnectError)
        check("reconnect_timeout" in str(error), str(error))
        check(isinstance(error.__cause__, trionet.ConnectError), "the last failure")
        print("selftest passed")


if __name__ == "__main__":
    trio.run(main, "--selftest" in sys.argv[1:])
