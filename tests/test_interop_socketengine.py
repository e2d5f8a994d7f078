"""trionet.compat.socketengine against the real socket.engine 1.0.0.

Real socket.engine clients and a real host run in subprocesses
(tests/interop/engine_peer.py) behind a recording proxy.  The old clients
must get replies, ``write_ALL`` lines and images from a trionet host, and
send more than one image (the host answers ``__ack``); a trionet client must
work against the real host, images both ways included.  Skipped when
socket.engine is not installed (``.ci/run`` installs it).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from trionet.compat import socketengine
from trionet.compat.socketengine import EngineConnection

from .interop.support import need, open_peer, open_proxy

ACK_LINE = b'{"type": "__ack", "data": "__ack"}\n'
#: Long enough that socket.engine's 256-byte reads would cut a character in
#: two if it travelled as UTF-8 (which kills the old reader's thread).
ACCENTS = "é" * 300 + " ✓"


@pytest.fixture(autouse=True)
def socket_engine() -> None:
    need("socket.engine 1.0.0")


def line(channel: str, value: object) -> bytes:
    """A message exactly as socket.engine writes it."""
    return (json.dumps({"type": channel, "data": value}) + "\n").encode()


async def test_old_clients_get_replies_write_all_and_images() -> None:
    reports_in, reports = trio.open_memory_channel[tuple[str, Any]](16)
    connections: list[EngineConnection] = []

    async def handler(conn: EngineConnection) -> None:
        connections.append(conn)
        async for channel, value in conn:
            await reports_in.send((channel, value))
            if channel == "test":
                await conn.write("reply", f"got {value}")

    with trio.fail_after(120):
        async with socketengine.open_engine_server(handler, host="127.0.0.1") as server:
            async with open_proxy(server.port) as proxy:
                async with open_peer(
                    "engine_peer.py", "client", str(proxy.port)
                ) as alice:
                    assert (await alice.receive())["connected"]
                    await alice.ask(cmd="write", channel="test", data="alice is here")
                    assert await reports.receive() == ("test", "alice is here")
                    answer = await alice.ask(
                        cmd="wait_get", channel="reply", expect="got alice is here"
                    )
                    assert answer["ok"], answer

                    async with open_peer(
                        "engine_peer.py", "client", str(proxy.port)
                    ) as bob:
                        assert (await bob.receive())["connected"]
                        await bob.ask(cmd="write", channel="test", data="bob too")
                        assert await reports.receive() == ("test", "bob too")
                        # One value per client, its latest; reading takes nothing.
                        expected = ["alice is here", "bob too"]
                        assert server.get_ALL("test") == expected
                        assert server.get_ALL("test") == expected
                        assert server.get_ALL("nothing") == []

                        status = {"ready": True, "clients": 2, "note": ACCENTS}
                        await server.write_ALL("status", status)
                        await server.write_ALL("texts", ACCENTS)
                        for peer in (alice, bob):
                            for channel, value in [
                                ("status", status),
                                ("texts", ACCENTS),
                            ]:
                                answer = await peer.ask(
                                    cmd="wait_get", channel=channel, expect=value
                                )
                                assert answer["ok"], answer

                    # Two images from alice: the second goes out only because
                    # the first was answered with __ack.
                    first = await alice.ask(cmd="writeImg", seed=1)
                    assert first["sent"]
                    assert await reports.receive() == ("__image", first["b64"])
                    assert (await alice.ask(cmd="wait_canWrite"))["ok"]
                    second = await alice.ask(cmd="writeImg", seed=2)
                    assert second["sent"]
                    assert await reports.receive() == ("__image", second["b64"])

                    # An image from the host.
                    await server.write_ALL("__image", first["b64"])
                    answer = await alice.ask(
                        cmd="wait_get", channel="__image", expect=first["b64"]
                    )
                    assert answer["ok"], answer
                    assert (await alice.ask(cmd="errors"))["errors"] == []
                    await alice.send(cmd="exit")
                    await proxy.wires[0].ended["c>s"].wait()

    alice_wire = proxy.wires[0]
    assert alice_wire.stream("c>s") == b"".join(
        [
            line("test", "alice is here"),
            line("__image", first["b64"]),
            line("__image", second["b64"]),
        ]
    )
    assert alice_wire.stream("s>c") == b"".join(
        [
            line("reply", "got alice is here"),
            line("status", status),
            line("texts", ACCENTS),
            ACK_LINE,
            ACK_LINE,
            line("__image", first["b64"]),
        ]
    )
    assert alice_wire.stream("s>c").isascii()
    assert [conn.ignored for conn in connections] == [0, 0]


async def test_trionet_client_against_the_real_host() -> None:
    with trio.fail_after(120):
        async with open_peer("engine_peer.py", "host") as host:
            port = (await host.receive())["port"]
            async with open_proxy(port) as proxy:
                async with socketengine.connect_engine("127.0.0.1", proxy.port) as conn:
                    await conn.write("test", "client is connected!")
                    answer = await host.ask(
                        cmd="wait_get_ALL",
                        channel="test",
                        expect=["client is connected!"],
                    )
                    assert answer["ok"], answer

                    await host.ask(cmd="write_ALL", channel="news", data={"a": [1, 2]})
                    assert await conn.receive() == ("news", {"a": [1, 2]})
                    assert conn.get("news") == {"a": [1, 2]}

                    # Values socket.engine's reader would die of, were they
                    # not escaped: non-ASCII text cut by its 256-byte reads.
                    await conn.write("texts", ACCENTS)
                    answer = await host.ask(
                        cmd="wait_get_ALL", channel="texts", expect=[ACCENTS]
                    )
                    assert answer["ok"] and answer["errors"] == [], answer

                    # Images from the host: the trionet client answers each
                    # with __ack, so the host can send the next one.
                    first = await host.ask(cmd="writeImg_ALL", seed=1)
                    assert await conn.receive() == ("__image", first["b64"])
                    assert (await host.ask(cmd="wait_canWrite"))["ok"]
                    second = await host.ask(cmd="writeImg_ALL", seed=2)
                    assert await conn.receive() == ("__image", second["b64"])

                    # An image to the host (it does not answer; none needed).
                    await conn.write("__image", second["b64"])
                    answer = await host.ask(
                        cmd="wait_get_ALL", channel="__image", expect=[second["b64"]]
                    )
                    assert answer["ok"], answer
                    assert conn.ignored == 0
                await proxy.wires[0].ended["c>s"].wait()

    wire = proxy.wires[0]
    assert wire.stream("c>s") == b"".join(
        [
            line("test", "client is connected!"),
            line("texts", ACCENTS),
            ACK_LINE,
            ACK_LINE,
            line("__image", second["b64"]),
        ]
    )
    assert wire.stream("c>s").isascii()
    assert wire.stream("s>c").startswith(line("news", {"a": [1, 2]}))
