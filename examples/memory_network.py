"""Testing a small app over trionet's in-memory network, in virtual time.

Run it with ``python examples/memory_network.py``.  The app -- a key-value
service over TCP that drops clients idle for 30 seconds, and a UDP collector
that counts heartbeats -- is ordinary trionet code.  The scenario runs it,
unchanged, on a memory network with two hosts ("db" runs the app, "app" the
clients) and a mock clock, and plays:

1. a client that goes quiet and is dropped after exactly 30 seconds;
2. a partition between the hosts: a request times out, and after the heal
   the same connection works again;
3. 1000 heartbeats over a link that loses 10% of the datagrams: the
   collector counts exactly the ones the network says it delivered.

Minutes of virtual time take a fraction of a second.  ``--selftest`` checks
each step and exits with status 1 if one is wrong.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from functools import partial

import trio
import trio.testing

import trionet
import trionet.testing

KV_PORT = 7000
HEARTBEAT_PORT = 7001
LINES = trionet.Lines()

# -- the app under test (nothing here knows about the memory network) ---------


class App:
    """A key-value store over TCP, and a heartbeat counter over UDP."""

    def __init__(self) -> None:
        self.store: dict[bytes, bytes] = {}
        self.heartbeats: Counter[bytes] = Counter()
        self.closed: list[trionet.CloseReason | None] = []

    async def serve_client(self, conn: trionet.Connection) -> None:
        """``SET key value`` answers ``OK``; ``GET key`` answers the value."""
        async for line in conn:
            command, _, rest = line.partition(b" ")
            if command == b"SET":
                key, _, value = rest.partition(b" ")
                self.store[key] = value
                await conn.send(b"OK")
            elif command == b"GET":
                await conn.send(self.store.get(rest, b"(none)"))
            else:
                await conn.send(b"ERROR unknown command")

    async def count_heartbeats(self, peer: trionet.UdpPeer) -> None:
        async for data in peer:
            self.heartbeats[data.split(b" ")[0]] += 1

    async def run(
        self,
        *,
        host: str | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve both until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    trionet.serve_tcp,
                    self.serve_client,
                    KV_PORT,
                    host=host,
                    framing=LINES,
                    idle_timeout=30,
                    on_close=lambda conn: self.closed.append(conn.close_reason),
                )
            )
            await nursery.start(
                partial(
                    trionet.serve_udp, self.count_heartbeats, HEARTBEAT_PORT, host=host
                )
            )
            task_status.started()


async def request(conn: trionet.Connection, line: str) -> bytes:
    await conn.send(line)
    return await conn.receive()


# -- the scenario ---------------------------------------------------------------


async def scenario() -> list[str]:
    """Play the three steps; return what went wrong (nothing, if all is well)."""
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        print(("  ok: " if ok else "  FAILED: ") + what)
        if not ok:
            failures.append(what)

    app = App()
    async with trionet.testing.memory_network(seed=1) as net:
        net.add_host("db")
        net.add_host("app")
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(app.run, host="db"))
            with net.on_host("app"):
                print("1. a client that goes quiet")
                async with trionet.connect_tcp("db", KV_PORT, framing=LINES) as conn:
                    check(await request(conn, "SET colour blue") == b"OK", "SET")
                    quiet_since = trio.current_time()
                    try:
                        await conn.receive()
                    except trionet.ConnectionClosed as exc:
                        print(f"  the server hung up: {exc.reason}")
                    waited = trio.current_time() - quiet_since
                    check(waited == 30, f"dropped after {waited:g} s of silence")
                    await trio.testing.wait_all_tasks_blocked()  # (on_close ran)
                    check(
                        app.closed == [trionet.CloseReason.TIMEOUT], "closed as TIMEOUT"
                    )

                print("2. a partition between app and db")
                async with trionet.connect_tcp("db", KV_PORT, framing=LINES) as conn:
                    net.partition("app", "db")
                    with trio.move_on_after(5) as deadline:
                        await request(conn, "GET colour")
                    check(deadline.cancelled_caught, "the request timed out")
                    net.heal("app", "db")
                    # The first request's reply was only delayed: it comes now.
                    check(await conn.receive() == b"blue", "its reply after the heal")
                    answer = await request(conn, "GET colour")
                    check(answer == b"blue", "the connection works again")

                print("3. heartbeats over a link that loses 10% of datagrams")
                net.set_faults("app", "db", loss=0.1)
                async with trionet.open_udp(remote=("db", HEARTBEAT_PORT)) as udp:
                    for number in range(1000):
                        await udp.send(b"app-1 %d" % number)
                await trio.testing.wait_all_tasks_blocked()
                delivered = sum(
                    not record.dropped for record in net.traffic().datagrams
                )
                counted = app.heartbeats[b"app-1"]
                print(f"  {counted} of 1000 heartbeats counted")
                check(counted == delivered, "the collector counted every delivery")
                check(850 < counted < 950, "about 10% were lost")
            nursery.cancel_scope.cancel()
    return failures


def main(selftest: bool) -> int:
    started = time.perf_counter()
    clock = trio.testing.MockClock(autojump_threshold=0)
    failures = trio.run(scenario, clock=clock)
    print(
        f"{clock.current_time():.0f} s of virtual time in "
        f"{time.perf_counter() - started:.2f} s"
    )
    if selftest:
        print("selftest", "failed" if failures else "passed")
        return 1 if failures else 0
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--selftest", action="store_true", help="check each step")
    args = parser.parse_args()
    sys.exit(main(args.selftest))
