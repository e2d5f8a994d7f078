"""Tests for UDP endpoints (open_udp) and the per-peer server (serve_udp).

All traffic is on loopback.  Senders are paced (a reply per datagram, or a
small burst followed by wait_all_tasks_blocked) so that loopback never drops
anything and the results are deterministic.
"""

from __future__ import annotations

import errno
import logging
import math
import socket
import subprocess
import sys
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import trionet
from trionet import (
    CloseReason,
    ConnectionClosed,
    Datagram,
    DatagramError,
    DatagramTooLarge,
    MessageTooLarge,
    UdpPeer,
    UdpServer,
    open_udp,
    open_udp_server,
    serve_udp,
)

LINUX = sys.platform.startswith("linux")


def _can_bind_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(
    not _can_bind_ipv6_loopback(), reason="cannot bind ::1 here"
)


def _dead_port() -> int:
    """A loopback UDP port that nothing listens on (just released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def echo(peer: UdpPeer) -> None:
    async for data in peer:
        await peer.send(data)


@asynccontextmanager
async def client_of(
    server: UdpServer, host: str = "127.0.0.1"
) -> AsyncIterator[Datagram]:
    async with open_udp(host, remote=(host, server.port)) as endpoint:
        yield endpoint


async def round_trip(endpoint: Datagram, data: bytes) -> bytes:
    await endpoint.send(data)
    return await endpoint.receive()


# --- public surface ---------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "Datagram",
        "DatagramError",
        "DatagramTooLarge",
        "UdpPeer",
        "UdpServer",
        "UdpServerStats",
        "open_udp",
        "open_udp_server",
        "serve_udp",
    ],
)
def test_exported_from_trionet(name: str) -> None:
    obj = getattr(trionet, name)
    assert obj.__module__ == "trionet"
    assert obj.__doc__ and "versionadded:: 0.1" in obj.__doc__


def test_exception_hierarchy() -> None:
    assert issubclass(DatagramTooLarge, MessageTooLarge)
    assert issubclass(DatagramTooLarge, trionet.TrionetError)
    assert issubclass(DatagramError, trionet.TrionetError)
    assert issubclass(DatagramError, OSError)
    assert not issubclass(DatagramError, ConnectionClosed)
    err = DatagramError(errno.ECONNREFUSED, "refused", ("127.0.0.1", 9))
    assert err.errno == errno.ECONNREFUSED
    assert err.address == ("127.0.0.1", 9)
    assert "refused" in str(err)


# --- endpoints ----------------------------------------------------------------


async def test_echo_between_unconnected_endpoints() -> None:
    async with open_udp() as a, open_udp() as b:
        assert a.local_address[0] == "127.0.0.1"
        assert a.local_address[1] != 0
        assert a.remote_address is None
        await a.send_to(b"ping", b.local_address)
        data, sender = await b.receive_from()
        assert (data, sender) == (b"ping", a.local_address)
        await b.send_to(bytearray(b"pong"), sender)
        assert await a.receive_from() == (b"pong", b.local_address)
        await b.send_to(memoryview(b"xyz")[1:], sender)
        assert await a.receive_from() == (b"yz", b.local_address)
        await b.send_to("h\u00e9", sender)
        assert await a.receive_from() == ("h\u00e9".encode(), b.local_address)


async def test_empty_datagram() -> None:
    async with open_udp() as a, open_udp() as b:
        await a.send_to(b"", b.local_address)
        assert await b.receive_from() == (b"", a.local_address)


async def test_async_for_yields_datagrams_and_ends_when_closed() -> None:
    got: list[tuple[bytes, Any]] = []
    async with open_udp() as a, open_udp() as b, trio.open_nursery() as nursery:

        async def read_all() -> None:
            async for data, address in a:
                got.append((data, address))

        nursery.start_soon(read_all)
        for i in range(3):
            await b.send_to(b"%d" % i, a.local_address)
        await trio.testing.wait_all_tasks_blocked()
        await a.aclose()
    assert got == [
        (b"0", b.local_address),
        (b"1", b.local_address),
        (b"2", b.local_address),
    ]


async def test_concurrent_receivers_queue_up() -> None:
    got: list[bytes] = []
    async with open_udp() as a, open_udp() as b, trio.open_nursery() as nursery:

        async def receive_one() -> None:
            data, _ = await a.receive_from()
            got.append(data)

        nursery.start_soon(receive_one)
        nursery.start_soon(receive_one)
        await trio.testing.wait_all_tasks_blocked()
        await b.send_to(b"one", a.local_address)
        await b.send_to(b"two", a.local_address)
    assert sorted(got) == [b"one", b"two"]


async def test_closed_endpoint_raises_connection_closed() -> None:
    async with open_udp() as a, open_udp() as b:
        caught: list[ConnectionClosed] = []
        async with trio.open_nursery() as nursery:

            async def blocked_receive() -> None:
                with pytest.raises(ConnectionClosed) as info:
                    await a.receive_from()
                caught.append(info.value)

            nursery.start_soon(blocked_receive)
            await trio.testing.wait_all_tasks_blocked()
            await a.aclose()
        assert [e.reason for e in caught] == [CloseReason.CLOSED_BY_HOST]
        with pytest.raises(ConnectionClosed) as info:
            await a.send_to(b"x", b.local_address)
        assert info.value.reason is CloseReason.CLOSED_BY_HOST
        with pytest.raises(ConnectionClosed):
            await a.receive_from()
        await a.aclose()  # closing twice is fine
        assert "closed" in repr(a)


async def test_connected_endpoints() -> None:
    async with open_udp() as a, open_udp(remote=a.local_address) as b:
        assert b.remote_address == a.local_address
        await b.send(b"hello")
        data, address = await a.receive_from()
        assert (data, address) == (b"hello", b.local_address)
        await a.send_to(b"back", address)
        assert await b.receive() == b"back"

        # The OS drops datagrams to b that do not come from its remote.
        async with open_udp() as stranger:
            await stranger.send_to(b"not for you", b.local_address)
            await a.send_to(b"from remote", b.local_address)
            assert await b.receive() == b"from remote"


async def test_send_and_receive_need_a_remote() -> None:
    async with open_udp() as a:
        with pytest.raises(RuntimeError, match="send_to"):
            await a.send(b"x")
        with pytest.raises(RuntimeError, match="receive_from"):
            await a.receive()


async def test_connect_to_other_family_fails_clearly() -> None:
    with pytest.raises(trionet.ConnectError) as info:
        async with open_udp("127.0.0.1", remote=("::1", 9)):
            pass  # pragma: no cover
    assert info.value.reason is CloseReason.ERROR
    assert isinstance(info.value.__cause__, OSError)


async def test_wrapping_a_socket() -> None:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    async with Datagram(sock, max_size=10) as a, open_udp() as b:
        assert a.socket is sock
        assert a.max_size == 10
        await b.send_to(b"wrapped", a.local_address)
        assert await a.receive_from() == (b"wrapped", b.local_address)
    assert sock.fileno() == -1
    with (
        trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM) as stream,
        pytest.raises(ValueError, match="SOCK_DGRAM"),
    ):
        Datagram(stream)


# --- broadcast -------------------------------------------------------------


async def test_broadcast_flag_sets_so_broadcast() -> None:
    async with open_udp(broadcast=True) as with_flag, open_udp() as without:
        assert with_flag.socket.getsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST)
        assert not without.socket.getsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST)


async def test_broadcast_on_loopback() -> None:
    try:
        receiver_cm = open_udp("127.255.255.255")
        receiver = await receiver_cm.__aenter__()
    except OSError as exc:  # pragma: no cover - depends on the sandbox
        pytest.skip(f"cannot bind the loopback broadcast address: {exc}")
    try:
        target = ("127.255.255.255", receiver.local_address[1])
        async with open_udp() as plain:
            with pytest.raises(DatagramError) as info:
                await plain.send_to(b"refused", target)
            assert info.value.errno == errno.EACCES
            assert "broadcast=True" in str(info.value)
            assert isinstance(info.value.__cause__, PermissionError)
        async with open_udp(broadcast=True) as sender:
            await sender.send_to(b"to everyone", target)
            assert await receiver.receive_from() == (
                b"to everyone",
                sender.local_address,
            )
    finally:
        await receiver_cm.__aexit__(None, None, None)


@needs_ipv6
async def test_broadcast_needs_ipv4() -> None:
    with pytest.raises(ValueError, match="IPv6"):
        async with open_udp("::1", broadcast=True):
            pass  # pragma: no cover


# --- oversized datagrams ----------------------------------------------------


async def test_oversized_outgoing_is_refused_before_sending() -> None:
    async with open_udp(max_size=100) as a, open_udp() as b:
        with pytest.raises(MessageTooLarge, match="101 bytes"):
            await a.send_to(b"x" * 101, b.local_address)
        async with open_udp(remote=b.local_address, max_size=100) as connected:
            with pytest.raises(MessageTooLarge):
                await connected.send(b"y" * 101)
        await a.send_to(b"z" * 100, b.local_address)
        # The first datagram b sees is the one that fitted.
        assert await b.receive_from() == (b"z" * 100, a.local_address)


async def test_oversized_incoming_is_reported_not_truncated() -> None:
    async with open_udp(max_size=100) as small, open_udp() as big:
        await big.send_to(b"a" * 101, small.local_address)
        await big.send_to(b"b" * 5000, small.local_address)
        await big.send_to(b"c" * 100, small.local_address)
        with pytest.raises(DatagramTooLarge) as info:
            await small.receive_from()
        assert info.value.address == big.local_address
        assert info.value.max_size == 100
        assert info.value.size == (101 if LINUX else None)
        assert str(big.local_address[1]) in str(info.value)
        with pytest.raises(DatagramTooLarge) as info:
            await small.receive_from()
        assert info.value.size == (5000 if LINUX else None)
        # The endpoint is still usable; a datagram of exactly max_size passes.
        assert await small.receive_from() == (b"c" * 100, big.local_address)


async def test_largest_ipv4_datagram_round_trips() -> None:
    async with open_udp() as a, open_udp() as b:
        assert a.max_size == 65507
        await a.send_to(b"m" * 65507, b.local_address)
        assert await b.receive_from() == (b"m" * 65507, a.local_address)
        with pytest.raises(MessageTooLarge):
            await a.send_to(b"m" * 65508, b.local_address)


# --- IPv6 -----------------------------------------------------------------


@needs_ipv6
async def test_ipv6_echo() -> None:
    async with open_udp("::1", max_size=65527) as a, open_udp("::1") as b:
        assert a.local_address[0] == "::1"
        assert len(a.local_address) == 4
        await a.send_to(b"six", b.local_address)
        data, address = await b.receive_from()
        assert data == b"six"
        assert address[:2] == a.local_address[:2]
        await b.send_to(b"xis", address)
        assert (await a.receive_from())[0] == b"xis"


@needs_ipv6
async def test_ipv6_server() -> None:
    async with open_udp_server(echo, host="::1") as server:
        assert server.addresses[0][0] == "::1"
        async with client_of(server, "::1") as client:
            assert await round_trip(client, b"v6") == b"v6"


# --- ICMP errors ----------------------------------------------------------


async def test_port_unreachable_surfaces_on_next_receive() -> None:
    dead = ("127.0.0.1", _dead_port())
    async with open_udp_server(echo) as server, client_of(server) as bystander:
        async with open_udp(remote=dead) as endpoint:
            await endpoint.send(b"anyone there?")
            with pytest.raises(DatagramError) as info:
                await endpoint.receive()
            assert info.value.errno == errno.ECONNREFUSED
            assert info.value.address == dead
            assert isinstance(info.value.__cause__, ConnectionRefusedError)
            assert "unreachable" in str(info.value)
            # The error was reported once; the endpoint still works.
            await endpoint.send(b"again")
            with pytest.raises(DatagramError):
                await endpoint.receive()
        # Unrelated tasks never noticed.
        assert await round_trip(bystander, b"still fine") == b"still fine"


# --- option validation --------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"port": -1}, ValueError),
        ({"port": 65536}, ValueError),
        ({"port": "80"}, TypeError),
        ({"max_size": 0}, ValueError),
        ({"max_size": 65508}, ValueError),
        ({"max_size": 1.5}, TypeError),
        ({"remote": ("127.0.0.1", 0)}, ValueError),
        ({"remote": "127.0.0.1:80"}, ValueError),
        ({"broadcast": 1}, TypeError),
        ({"host": 127}, TypeError),
    ],
)
async def test_open_udp_validates_options(
    kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        async with open_udp(**kwargs):
            pass  # pragma: no cover


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"port": -1}, ValueError),
        ({"idle_timeout": 0}, ValueError),
        ({"idle_timeout": -1.0}, ValueError),
        ({"idle_timeout": math.nan}, ValueError),
        ({"idle_timeout": "5"}, TypeError),
        ({"queue_size": 0}, ValueError),
        ({"queue_size": 1.5}, TypeError),
        ({"max_peers": 0}, ValueError),
        ({"max_size": 0}, ValueError),
        ({"max_size": 65508}, ValueError),
    ],
)
async def test_server_validates_options(
    kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        async with open_udp_server(echo, **kwargs):
            pass  # pragma: no cover


# --- serve_udp ------------------------------------------------------------


async def test_serve_udp_with_nursery_start(nursery: trio.Nursery) -> None:
    server = await nursery.start(partial(serve_udp, host="127.0.0.1"), echo, 0)
    assert isinstance(server, UdpServer)
    assert server.addresses == (("127.0.0.1", server.port),)
    async with client_of(server) as a, client_of(server) as b:
        for i in range(5):
            assert await round_trip(a, b"a%d" % i) == b"a%d" % i
            assert await round_trip(b, b"b%d" % i) == b"b%d" % i
        assert {p.remote_address for p in server.peers} == {
            a.local_address,
            b.local_address,
        }
        stats = server.stats
        assert (stats.received, stats.peers_started, stats.open_peers) == (10, 2, 2)
        assert stats.dropped == stats.peers_rejected == stats.handler_errors == 0
    await server.aclose()
    assert server.peers == ()


async def test_serve_udp_returns_after_aclose() -> None:
    reasons: list[CloseReason | None] = []

    async def handler(peer: UdpPeer) -> None:
        try:
            await peer.send(await peer.receive())
            await peer.receive()
        finally:
            reasons.append(peer.close_reason)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(serve_udp, host="127.0.0.1"), handler, 0)
        async with client_of(server) as client:
            assert await round_trip(client, b"hi") == b"hi"
            await trio.testing.wait_all_tasks_blocked()
            await server.aclose()
    # The nursery exited, so serve_udp returned; the handler was cancelled.
    assert reasons == [CloseReason.SHUTDOWN]


async def test_handler_nursery_peers_see_shutdown() -> None:
    caught: list[ConnectionClosed] = []

    async def handler(peer: UdpPeer) -> None:
        await peer.send(await peer.receive())
        with pytest.raises(ConnectionClosed) as info:
            await peer.receive()
        caught.append(info.value)
        with pytest.raises(ConnectionClosed):
            await peer.send(b"too late")

    async with trio.open_nursery() as handlers, trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(serve_udp, host="127.0.0.1", handler_nursery=handlers),
            handler,
            0,
        )
        async with client_of(server) as client:
            assert await round_trip(client, b"hi") == b"hi"
            await trio.testing.wait_all_tasks_blocked()
            await server.aclose()
    assert [e.reason for e in caught] == [CloseReason.SHUTDOWN]


async def test_wildcard_host_binds_every_family_on_one_port() -> None:
    async with open_udp_server(echo, host=None) as server:
        assert len({address[1] for address in server.addresses}) == 1
        hosts = {address[0] for address in server.addresses}
        assert "0.0.0.0" in hosts
        async with client_of(server) as client:
            assert await round_trip(client, b"v4") == b"v4"
        if "::" in hosts and _can_bind_ipv6_loopback():
            async with client_of(server, "::1") as client6:
                assert await round_trip(client6, b"v6") == b"v6"


async def test_hundred_peers_in_order_with_one_slow_handler() -> None:
    peers, per_peer, slow_id = 100, 200, 0
    release = trio.Event()
    slow_done = trio.Event()
    handled: defaultdict[int, list[int]] = defaultdict(list)
    slow_handled: list[int] = []

    async def handler(peer: UdpPeer) -> None:
        async for data in peer:
            client, seq = map(int, data.split(b":"))
            if client == slow_id:
                if seq == 0:
                    await release.wait()
                slow_handled.append(seq)
                if len(slow_handled) == per_peer:
                    slow_done.set()
                continue
            handled[client].append(seq)
            await peer.send(data)  # the ack paces the sender

    async with open_udp_server(handler) as server, client_of(server) as slow:

        async def fast_client(client_id: int, pace_slow: bool) -> None:
            async with client_of(server) as endpoint:
                for seq in range(per_peer):
                    message = b"%d:%d" % (client_id, seq)
                    assert await round_trip(endpoint, message) == message
                    if pace_slow:
                        # One slow datagram per fast round trip keeps the
                        # socket buffers small.
                        await slow.send(b"%d:%d" % (slow_id, seq))

        with trio.fail_after(120):  # a hang guard, not a timing assertion
            async with trio.open_nursery() as nursery:
                for client_id in range(1, peers):
                    nursery.start_soon(fast_client, client_id, client_id == 1)
            # Every other peer finished while the slow handler was stuck.
            assert not release.is_set()
            assert slow_handled == []
            assert sorted(handled) == list(range(1, peers))
            for client_id in range(1, peers):
                assert handled[client_id] == list(range(per_peer)), client_id
            release.set()
            await slow_done.wait()
        assert slow_handled == list(range(per_peer))
        stats = server.stats
        assert stats.dropped == 0
        assert stats.received == peers * per_peer
        assert stats.peers_started == peers


async def test_full_queue_drops_and_counts() -> None:
    first = trio.Event()
    release = trio.Event()
    handled: list[bytes] = []

    async def handler(peer: UdpPeer) -> None:
        handled.append(await peer.receive())
        first.set()
        await release.wait()
        for _ in range(3):
            handled.append(await peer.receive())
            await peer.send(handled[-1])

    async with (
        open_udp_server(handler, queue_size=2) as server,
        client_of(server) as client,
    ):
        await client.send(b"0")
        await first.wait()
        for i in range(1, 6):
            await client.send(b"%d" % i)
        await trio.testing.wait_all_tasks_blocked()
        assert server.stats.dropped == 3
        release.set()
        assert await client.receive() == b"1"
        assert await client.receive() == b"2"
        # Later datagrams are accepted again.
        assert await round_trip(client, b"6") == b"6"
    assert handled == [b"0", b"1", b"2", b"6"]


async def test_idle_peer_times_out(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="trionet")
    timed_out: list[tuple[float, CloseReason]] = []
    ended = trio.Event()
    arrivals: list[float] = []

    async def handler(peer: UdpPeer) -> None:
        try:
            async for data in peer:
                arrivals.append(trio.current_time())
                await peer.send(data)
        except ConnectionClosed as exc:
            assert peer.close_reason is exc.reason
            timed_out.append((trio.current_time(), exc.reason))
            ended.set()
            raise  # letting the peer's own ConnectionClosed escape is not an error

    async with (
        open_udp_server(handler, idle_timeout=10) as server,
        client_of(server) as client,
    ):
        for i in range(3):
            assert await round_trip(client, b"%d" % i) == b"%d" % i
            await trio.sleep(6)  # virtual time: less than idle_timeout
        with trio.fail_after(
            100
        ):  # virtual seconds: turns a missing timeout into a failure
            await ended.wait()
        assert timed_out == [(arrivals[-1] + 10, CloseReason.TIMEOUT)]
        await trio.testing.wait_all_tasks_blocked()
        assert server.peers == ()
        # The next datagram from the same address starts a new handler.
        assert await round_trip(client, b"back") == b"back"
        assert server.stats.peers_started == 2
        assert server.stats.handler_errors == 0
    # The second handler saw the server shut down.
    assert [reason for _, reason in timed_out] == [
        CloseReason.TIMEOUT,
        CloseReason.SHUTDOWN,
    ]
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_receive_raises_timeout_for_plain_receive(
    autojump_clock: trio.testing.MockClock,
) -> None:
    caught: list[tuple[float, ConnectionClosed]] = []
    done = trio.Event()

    async def handler(peer: UdpPeer) -> None:
        await peer.send(await peer.receive())
        with pytest.raises(ConnectionClosed) as info:
            await peer.receive()
        caught.append((trio.current_time(), info.value))
        # Every later call raises the same reason.
        with pytest.raises(ConnectionClosed) as again:
            await peer.send(b"late")
        assert again.value.reason is CloseReason.TIMEOUT
        done.set()

    async with (
        open_udp_server(handler, idle_timeout=2.5) as server,
        client_of(server) as client,
    ):
        start = trio.current_time()
        assert await round_trip(client, b"x") == b"x"
        with trio.fail_after(100):  # virtual seconds
            await done.wait()
    [(when, error)] = caught
    assert error.reason is CloseReason.TIMEOUT
    assert when == start + 2.5


async def test_max_peers_is_honoured() -> None:
    async def handler(peer: UdpPeer) -> None:
        async for data in peer:
            await peer.send(data)
            if data == b"bye":
                return

    async with (
        open_udp_server(handler, max_peers=2) as server,
        client_of(server) as c1,
        client_of(server) as c2,
        client_of(server) as c3,
    ):
        assert await round_trip(c1, b"1") == b"1"
        assert await round_trip(c2, b"2") == b"2"
        await c3.send(b"3")
        # c1's next datagram is read after c3's.
        assert await round_trip(c1, b"1 again") == b"1 again"
        await trio.testing.wait_all_tasks_blocked()
        stats = server.stats
        assert stats.peers_rejected == 1
        assert stats.peers_started == 2
        assert {p.remote_address for p in server.peers} == {
            c1.local_address,
            c2.local_address,
        }
        # When a handler returns, its slot is free for a new peer.
        assert await round_trip(c1, b"bye") == b"bye"
        await trio.testing.wait_all_tasks_blocked()
        assert await round_trip(c3, b"3 again") == b"3 again"
        assert server.stats.peers_started == 3


async def test_handler_crash_only_ends_that_peer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="trionet")
    seen: list[UdpPeer] = []

    async def handler(peer: UdpPeer) -> None:
        seen.append(peer)
        async for data in peer:
            if data == b"boom":
                raise ValueError("handler bug")
            await peer.send(data)

    async with (
        open_udp_server(handler) as server,
        client_of(server) as good,
        client_of(server) as bad,
    ):
        assert await round_trip(good, b"a") == b"a"
        await bad.send(b"boom")
        assert await round_trip(good, b"b") == b"b"
        await trio.testing.wait_all_tasks_blocked()
        [record] = caplog.records
        assert record.name == "trionet"
        assert record.levelno == logging.ERROR
        assert record.exc_info is not None
        assert isinstance(record.exc_info[1], ValueError)
        assert str(bad.local_address[1]) in record.getMessage()
        bad_peer = next(p for p in seen if p.remote_address == bad.local_address)
        assert bad_peer.close_reason is CloseReason.ERROR
        assert server.stats.handler_errors == 1
        # The good peer is untouched; the bad address gets a new handler.
        assert await round_trip(good, b"c") == b"c"
        assert await round_trip(bad, b"fresh") == b"fresh"
        assert server.stats.peers_started == 3


async def test_peer_aclose_ends_async_for_quietly() -> None:
    finished: list[CloseReason | None] = []

    async def handler(peer: UdpPeer) -> None:
        async for data in peer:
            await peer.send(data)
            if data == b"close":
                await peer.aclose()
        finished.append(peer.close_reason)

    async with open_udp_server(handler) as server, client_of(server) as client:
        assert await round_trip(client, b"close") == b"close"
        await trio.testing.wait_all_tasks_blocked()
        assert finished == [CloseReason.CLOSED_BY_HOST]
        assert server.stats.handler_errors == 0


async def test_handler_return_closes_peer_by_host() -> None:
    peers: list[UdpPeer] = []

    async def handler(peer: UdpPeer) -> None:
        peers.append(peer)
        await peer.send(await peer.receive())

    async with open_udp_server(handler) as server, client_of(server) as client:
        assert await round_trip(client, b"one") == b"one"
        await trio.testing.wait_all_tasks_blocked()
        assert server.peers == ()
        assert await round_trip(client, b"two") == b"two"
    assert [p.close_reason for p in peers] == [CloseReason.CLOSED_BY_HOST] * 2
    assert peers[0] is not peers[1]


async def test_server_oversized_datagrams() -> None:
    events: list[object] = []

    async def handler(peer: UdpPeer) -> None:
        with pytest.raises(MessageTooLarge):
            await peer.send(b"r" * 11)
        for _ in range(2):
            try:
                events.append(await peer.receive())
            except DatagramTooLarge as exc:
                events.append(exc)
        await peer.send(b"done")

    async with (
        open_udp_server(handler, max_size=10) as server,
        client_of(server) as client,
    ):
        await client.send(b"x" * 11)
        await client.send(b"y" * 10)
        assert await client.receive() == b"done"
        assert server.stats.oversized == 1
    too_large, fine = events
    assert isinstance(too_large, DatagramTooLarge)
    assert too_large.address == client.local_address
    assert fine == b"y" * 10


async def test_body_exception_is_not_wrapped() -> None:
    with pytest.raises(KeyError) as info:
        async with open_udp_server(echo) as server:
            async with client_of(server) as client:
                assert await round_trip(client, b"x") == b"x"
            raise KeyError("from the body")
    assert type(info.value) is KeyError
    assert info.value.__context__ is None


async def test_body_exception_keeps_its_context() -> None:
    with pytest.raises(RuntimeError) as info:
        async with open_udp_server(echo):
            try:
                raise LookupError("first")
            except LookupError:
                raise RuntimeError("second") from None
    assert isinstance(info.value.__context__, LookupError)


async def test_cancelling_serve_udp_closes_peers_with_shutdown() -> None:
    peers: list[UdpPeer] = []
    got_first = trio.Event()

    async def handler(peer: UdpPeer) -> None:
        peers.append(peer)
        await peer.receive()
        got_first.set()
        await peer.receive()

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                partial(serve_udp, host="127.0.0.1"), handler, 0
            )
            async with client_of(server) as client:
                await client.send(b"x")
                await got_first.wait()
                scope.cancel()
    assert [p.close_reason for p in peers] == [CloseReason.SHUTDOWN]
    assert server.peers == ()
    assert server.stats.handler_errors == 0


def test_example_runs_its_selftest() -> None:
    example = Path(__file__).parent.parent / "examples" / "udp_echo.py"
    result = subprocess.run(
        [sys.executable, str(example), "--selftest"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "selftest passed" in result.stdout
    assert result.stdout.count("got b'") == 4
