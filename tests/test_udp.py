"""Tests for UDP endpoints (open_udp) and the per-peer server (serve_udp).

All traffic is on loopback.  Senders are paced (a reply per datagram, or a
small burst followed by wait_all_tasks_blocked) so that loopback never drops
anything and the results are deterministic.  Time-dependent behaviour (idle
timeouts, eviction, grace periods) runs on trio's autojump clock.
"""

from __future__ import annotations

import errno
import logging
import math
import socket
import subprocess
import sys
import typing
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
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
    UdpServerOptions,
    open_udp,
    open_udp_server,
    serve_udp,
)
from trionet._udp import _common, _server
from trionet._udp._server import _UdpOptionsDict
from trionet._util import only_own_end

from .conftest import kernel_only

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup

LINUX = sys.platform.startswith("linux")

#: Every test here runs over the kernel and over a memory network.
pytestmark = pytest.mark.usefixtures("network")


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


def local(**options: Any) -> AbstractAsyncContextManager[Datagram]:
    """An endpoint bound to 127.0.0.1, so that its address can be sent to."""
    return open_udp(local_host="127.0.0.1", **options)


def serving(handler: Any, **options: Any) -> AbstractAsyncContextManager[UdpServer]:
    """open_udp_server on loopback; without a grace period unless given one
    (most handlers here wait for datagrams until they are cancelled)."""
    options.setdefault("host", "127.0.0.1")
    options.setdefault("grace_period", 0)
    return open_udp_server(handler, **options)


async def echo(peer: UdpPeer) -> None:
    async for data in peer:
        await peer.send(data)


@attrs.frozen
class Ended:
    """How one Stubborn handler ended."""

    time: float
    address: Any
    reason: CloseReason | None
    cancelled: bool


class Stubborn:
    """A handler that answers its peer's first datagram and then never looks
    at the peer again, so that only a cancellation ends it."""

    def __init__(self) -> None:
        self.ended: list[Ended] = []

    async def __call__(self, peer: UdpPeer) -> None:
        await peer.send(await peer.receive())
        cancelled = False
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled = True
            raise
        finally:
            self.ended.append(
                Ended(
                    trio.current_time(),
                    peer.remote_address,
                    peer.close_reason,
                    cancelled,
                )
            )


@asynccontextmanager
async def client_of(
    server: UdpServer, host: str = "127.0.0.1"
) -> AsyncIterator[Datagram]:
    async with open_udp(local_host=host, remote=(host, server.port)) as endpoint:
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
        "DatagramStatistics",
        "DatagramTooLarge",
        "UdpPeer",
        "UdpServer",
        "UdpServerOptions",
        "UdpServerStatistics",
        "open_udp",
        "open_udp_server",
        "serve_udp",
    ],
)
def test_exported_from_trionet(name: str) -> None:
    obj = getattr(trionet, name)
    assert obj.__module__ == "trionet"
    assert obj.__doc__ and "versionadded:: 0.1" in obj.__doc__


def test_old_names_are_gone() -> None:
    assert not hasattr(trionet, "UdpServerStats")
    assert not hasattr(UdpServer, "stats")


def test_exception_hierarchy() -> None:
    # The peer sent the oversized datagram: a ProtocolError, not the caller's
    # ValueError; both exceptions live with the others.
    assert issubclass(DatagramTooLarge, trionet.ProtocolError)
    assert not issubclass(DatagramTooLarge, MessageTooLarge)
    assert not issubclass(DatagramTooLarge, ValueError)
    assert DatagramTooLarge.__module__ == DatagramError.__module__ == "trionet"
    from trionet import _exceptions

    assert _exceptions.DatagramTooLarge is DatagramTooLarge
    assert _exceptions.DatagramError is DatagramError
    assert issubclass(DatagramError, trionet.TrionetError)
    assert issubclass(DatagramError, OSError)
    assert not issubclass(DatagramError, ConnectionClosed)
    err = DatagramError(errno.ECONNREFUSED, "refused", ("127.0.0.1", 9))
    assert err.errno == errno.ECONNREFUSED
    assert err.address == ("127.0.0.1", 9)
    assert "refused" in str(err)
    too_large = DatagramTooLarge(("::1", 5, 0, 0), 70000, 100)
    assert str(too_large) == (
        "discarded a datagram of 70000 bytes from [::1]:5: max_size is 100"
    )
    assert "more than 100 bytes from an unknown sender" in str(
        DatagramTooLarge(None, None, 100)
    )


# --- endpoints ----------------------------------------------------------------


async def test_echo_between_unconnected_endpoints() -> None:
    async with local() as a, local() as b:
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
        assert a.statistics() == trionet.DatagramStatistics(
            received=3, bytes_received=9, sent=1, bytes_sent=4, oversized=0
        )
        assert b.statistics().sent == 3
        assert b.statistics().bytes_sent == 4 + 2 + 3
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            a.statistics().received = 0  # type: ignore[misc]


async def test_empty_datagram() -> None:
    async with local() as a, local() as b:
        await a.send_to(b"", b.local_address)
        assert await b.receive_from() == (b"", a.local_address)


async def test_open_udp_arguments_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        async with open_udp("127.0.0.1"):  # type: ignore[misc]
            pass  # pragma: no cover


async def test_local_host_defaults_to_the_wildcard_of_the_family() -> None:
    async with open_udp() as unconnected:
        assert unconnected.local_address[0] == "0.0.0.0"
    async with local() as target, open_udp(remote=target.local_address) as client:
        # Bound to 0.0.0.0; once connected, the OS names the source address.
        assert client.socket.family == socket.AF_INET
        assert client.remote_address == target.local_address
        await client.send(b"from the wildcard")
        data, sender = await target.receive_from()
        assert data == b"from the wildcard"
        assert sender[1] == client.local_address[1]


@needs_ipv6
async def test_local_host_defaults_to_the_ipv6_wildcard_for_an_ipv6_remote() -> None:
    async with (
        open_udp(local_host="::1") as target,
        open_udp(remote=target.local_address[:2]) as client,
    ):
        assert client.socket.family == socket.AF_INET6
        await client.send(b"six")
        assert (await target.receive_from())[0] == b"six"


async def test_async_for_yields_datagrams_and_ends_when_closed() -> None:
    got: list[tuple[bytes, Any]] = []
    async with local() as a, local() as b, trio.open_nursery() as nursery:

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
    async with local() as a, local() as b, trio.open_nursery() as nursery:

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
    async with local() as a, local() as b:
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
    async with local() as a, local(remote=a.local_address) as b:
        assert b.remote_address == a.local_address
        await b.send(b"hello")
        data, address = await a.receive_from()
        assert (data, address) == (b"hello", b.local_address)
        await a.send_to(b"back", address)
        assert await b.receive() == b"back"

        # The OS drops datagrams to b that do not come from its remote.
        async with local() as stranger:
            await stranger.send_to(b"not for you", b.local_address)
            await a.send_to(b"from remote", b.local_address)
            assert await b.receive() == b"from remote"


async def test_send_and_receive_need_a_remote() -> None:
    async with local() as a:
        with pytest.raises(RuntimeError, match="send_to"):
            await a.send(b"x")
        with pytest.raises(RuntimeError, match="receive_from"):
            await a.receive()


async def test_connect_to_other_family_fails_clearly() -> None:
    with pytest.raises(trionet.ConnectError) as info:
        async with open_udp(local_host="127.0.0.1", remote=("::1", 9)):
            pass  # pragma: no cover
    assert info.value.reason is CloseReason.ERROR
    assert isinstance(info.value.__cause__, OSError)
    assert "local_host and remote must be of the same address family" in str(info.value)


@kernel_only
async def test_wrapping_a_socket() -> None:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    async with Datagram(sock, max_size=10) as a, local() as b:
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
    with (
        trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other,
        pytest.raises(ValueError, match="oversized"),
    ):
        Datagram(other, oversized="ignore")  # type: ignore[arg-type]


# --- broadcast -------------------------------------------------------------


async def test_broadcast_flag_sets_so_broadcast() -> None:
    async with open_udp(broadcast=True) as with_flag, open_udp() as without:
        assert with_flag.socket.getsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST)
        assert not without.socket.getsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST)


async def test_broadcast_on_loopback() -> None:
    try:
        receiver_cm = open_udp(local_host="127.255.255.255")
        receiver = await receiver_cm.__aenter__()
    except OSError as exc:  # pragma: no cover - depends on the sandbox
        pytest.skip(f"cannot bind the loopback broadcast address: {exc}")
    try:
        target = ("127.255.255.255", receiver.local_address[1])
        async with local() as plain:
            with pytest.raises(DatagramError) as info:
                await plain.send_to(b"refused", target)
            assert info.value.errno == errno.EACCES
            assert "broadcast=True" in str(info.value)
            assert isinstance(info.value.__cause__, PermissionError)
        async with local(broadcast=True) as sender:
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
        async with open_udp(local_host="::1", broadcast=True):
            pass  # pragma: no cover


# --- oversized datagrams ----------------------------------------------------


async def test_oversized_outgoing_is_refused_before_sending() -> None:
    async with local(max_size=100) as a, local() as b:
        with pytest.raises(MessageTooLarge, match="101 bytes"):
            await a.send_to(b"x" * 101, b.local_address)
        async with local(remote=b.local_address, max_size=100) as connected:
            with pytest.raises(MessageTooLarge):
                await connected.send(b"y" * 101)
        await a.send_to(b"z" * 100, b.local_address)
        # The first datagram b sees is the one that fitted.
        assert await b.receive_from() == (b"z" * 100, a.local_address)
        assert a.statistics().sent == 1


async def test_a_receive_loop_goes_on_past_an_oversized_datagram(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trionet")
    async with local(max_size=100) as small, local() as stranger, local() as friend:
        await stranger.send_to(b"a" * 5000, small.local_address)
        await friend.send_to(b"b" * 100, small.local_address)
        # The oversized datagram was discarded; the receive returned the next.
        assert await small.receive_from() == (b"b" * 100, friend.local_address)
        stats = small.statistics()
        assert (stats.oversized, stats.received, stats.bytes_received) == (1, 1, 100)
    [record] = caplog.records
    assert record.levelno == logging.INFO
    message = record.getMessage()
    assert f"from 127.0.0.1:{stranger.local_address[1]}" in message
    assert "max_size is 100" in message
    if LINUX:
        assert "5000 bytes" in message


async def test_async_for_goes_on_past_an_oversized_datagram() -> None:
    got: list[bytes] = []
    async with local(max_size=10) as small, local() as big:
        for data in (b"1", b"x" * 11, b"2", b"y" * 65507, b"3"):
            await big.send_to(data, small.local_address)
        async for data, _ in small:
            got.append(data)
            if len(got) == 3:
                break
        assert small.statistics().oversized == 2
    assert got == [b"1", b"2", b"3"]


async def test_oversized_discards_are_logged_at_most_every_ten_seconds(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trionet")
    async with local(max_size=10) as small, local() as big:
        for _ in range(3):
            await big.send_to(b"x" * 11, small.local_address)
        await big.send_to(b"ok", small.local_address)
        assert (await small.receive_from())[0] == b"ok"
        assert len(caplog.records) == 1
        assert "1 oversized datagram(s) discarded" in caplog.records[0].getMessage()
        await trio.sleep(9)
        await big.send_to(b"x" * 11, small.local_address)
        await big.send_to(b"ok", small.local_address)
        assert (await small.receive_from())[0] == b"ok"
        assert len(caplog.records) == 1  # still within ten seconds
        await trio.sleep(1)
        await big.send_to(b"x" * 11, small.local_address)
        await big.send_to(b"ok", small.local_address)
        assert (await small.receive_from())[0] == b"ok"
        # The next message counts every discard since the last one.
        assert len(caplog.records) == 2
        assert "4 oversized datagram(s) discarded" in caplog.records[1].getMessage()
        assert small.statistics().oversized == 5


async def test_oversized_raise_reports_each_datagram_not_truncated() -> None:
    async with local(max_size=100, oversized="raise") as small, local() as big:
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
        assert small.statistics().oversized == 2


async def test_largest_ipv4_datagram_round_trips() -> None:
    async with local() as a, local() as b:
        assert a.max_size == 65507
        await a.send_to(b"m" * 65507, b.local_address)
        assert await b.receive_from() == (b"m" * 65507, a.local_address)
        with pytest.raises(MessageTooLarge):
            await a.send_to(b"m" * 65508, b.local_address)


# --- IPv6 -----------------------------------------------------------------


@needs_ipv6
async def test_ipv6_echo() -> None:
    async with (
        open_udp(local_host="::1", max_size=65527) as a,
        open_udp(local_host="::1") as b,
    ):
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
    async with serving(echo, host="::1") as server:
        assert server.addresses[0][0] == "::1"
        async with client_of(server, "::1") as client:
            assert await round_trip(client, b"v6") == b"v6"


# --- ICMP errors ----------------------------------------------------------


async def test_port_unreachable_surfaces_on_next_receive() -> None:
    dead = ("127.0.0.1", _dead_port())
    async with serving(echo) as server, client_of(server) as bystander:
        async with local(remote=dead) as endpoint:
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
        ({"local_port": -1}, ValueError),
        ({"local_port": 65536}, ValueError),
        ({"local_port": "80"}, TypeError),
        ({"max_size": 0}, ValueError),
        ({"max_size": 65508}, ValueError),
        ({"max_size": 65528}, ValueError),
        ({"max_size": 1.5}, TypeError),
        ({"remote": ("127.0.0.1", 0)}, ValueError),
        ({"remote": "127.0.0.1:80"}, ValueError),
        ({"broadcast": 1}, TypeError),
        ({"local_host": 127}, TypeError),
        ({"oversized": "ignore"}, ValueError),
        ({"host": "127.0.0.1"}, TypeError),  # the old name
        ({"so_rcvbuf": 0}, ValueError),
        ({"so_rcvbuf": 1.5}, TypeError),
        ({"so_sndbuf": -1}, ValueError),
        ({"so_sndbuf": "big"}, TypeError),
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
        ({"port": "0"}, TypeError),
        ({"idle_timeout": 0}, ValueError),
        ({"idle_timeout": -1.0}, ValueError),
        ({"idle_timeout": math.nan}, ValueError),
        ({"idle_timeout": "5"}, TypeError),
        ({"queue_size": 0}, ValueError),
        ({"queue_size": 1.5}, TypeError),
        ({"queue_bytes": 0}, ValueError),
        ({"max_peers": 0}, ValueError),
        ({"max_size": 0}, ValueError),
        ({"max_size": 65508}, ValueError),  # over IPv4's limit
        ({"grace_period": -1}, ValueError),
        ({"reuse_port": 1}, TypeError),
        ({"host": 127}, TypeError),
        ({"no_such_option": 1}, TypeError),
        ({"so_rcvbuf": 0}, ValueError),
        ({"so_rcvbuf": 2.5}, TypeError),
        ({"so_sndbuf": 0}, ValueError),
        ({"so_sndbuf": True}, TypeError),
    ],
)
async def test_server_validates_options(
    kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        async with open_udp_server(echo, **kwargs):
            pass  # pragma: no cover


def test_options_are_declared_once() -> None:
    # serve_udp's keyword arguments are typed by a TypedDict that must agree
    # with UdpServerOptions, field for field and type for type.
    attrs.resolve_types(UdpServerOptions)
    fields = {field.name: field.type for field in attrs.fields(UdpServerOptions)}
    assert typing.get_type_hints(_UdpOptionsDict) == fields
    defaults = UdpServerOptions()
    assert defaults.idle_timeout == 60.0
    assert defaults.grace_period == 5.0
    assert defaults.queue_size == 256
    assert defaults.queue_bytes == 1024 * 1024
    assert defaults.max_peers == 1024
    assert defaults.max_size == 65507
    assert defaults.so_rcvbuf is None
    assert defaults.so_sndbuf is None
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        defaults.max_peers = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        UdpServerOptions(1.0)  # type: ignore[misc]  # keyword-only


async def test_aclose_validates_the_grace_period() -> None:
    async with serving(echo) as server:
        with pytest.raises(ValueError, match="grace_period"):
            await server.aclose(grace_period=-1)


# --- serve_udp ------------------------------------------------------------


async def test_serve_udp_with_nursery_start(nursery: trio.Nursery) -> None:
    server = await nursery.start(partial(serve_udp, host="127.0.0.1"), echo, 0)
    assert isinstance(server, UdpServer)
    assert server.addresses == (("127.0.0.1", server.port),)
    assert server.options == UdpServerOptions()
    async with client_of(server) as a, client_of(server) as b:
        for i in range(5):
            assert await round_trip(a, b"a%d" % i) == b"a%d" % i
            assert await round_trip(b, b"b%d" % i) == b"b%d" % i
        assert {p.remote_address for p in server.peers} == {
            a.local_address,
            b.local_address,
        }
        stats = server.statistics()
        assert (stats.received, stats.peers_started, stats.open_peers) == (10, 2, 2)
        assert stats.dropped == stats.peers_rejected == stats.handler_errors == 0
    await server.aclose(grace_period=0)
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
            await server.aclose(grace_period=0)
    # The nursery exited, so serve_udp returned; the handler was cancelled.
    assert reasons == [CloseReason.SHUTDOWN]


async def test_wildcard_host_binds_every_family_on_one_port() -> None:
    async with open_udp_server(echo, host=None, grace_period=0) as server:
        assert len({address[1] for address in server.addresses}) == 1
        hosts = {address[0] for address in server.addresses}
        assert "0.0.0.0" in hosts
        async with client_of(server) as client:
            assert await round_trip(client, b"v4") == b"v4"
        if "::" in hosts and _can_bind_ipv6_loopback():
            async with client_of(server, "::1") as client6:
                assert await round_trip(client6, b"v6") == b"v6"


async def test_open_udp_server_binds_every_interface_by_default() -> None:
    async with open_udp_server(echo, grace_period=0) as server:
        assert "0.0.0.0" in {address[0] for address in server.addresses}
        async with client_of(server) as client:
            assert await round_trip(client, b"any") == b"any"
    with pytest.raises(TypeError):
        async with open_udp_server(echo, 0, "127.0.0.1"):  # type: ignore[misc]
            pass  # pragma: no cover


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

    async with serving(handler) as server, client_of(server) as slow:

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
        stats = server.statistics()
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
        serving(handler, queue_size=2) as server,
        client_of(server) as client,
    ):
        await client.send(b"0")
        await first.wait()
        for i in range(1, 6):
            await client.send(b"%d" % i)
        await trio.testing.wait_all_tasks_blocked()
        assert server.statistics().dropped == 3
        release.set()
        assert await client.receive() == b"1"
        assert await client.receive() == b"2"
        # Later datagrams are accepted again.
        assert await round_trip(client, b"6") == b"6"
    assert handled == [b"0", b"1", b"2", b"6"]


async def test_queue_bytes_bounds_each_peer() -> None:
    first = trio.Event()
    release = trio.Event()
    handled: list[bytes] = []

    async def handler(peer: UdpPeer) -> None:
        handled.append(await peer.receive())
        first.set()
        await release.wait()
        async for data in peer:
            handled.append(data)
            await peer.send(b"got %d" % len(data))

    async with (
        serving(handler, queue_size=100, queue_bytes=250, max_size=1000) as server,
        client_of(server) as client,
    ):
        await client.send(b"first")
        await first.wait()
        for tag in b"abcd":
            await client.send(bytes([tag]) * 100)
        await trio.testing.wait_all_tasks_blocked()
        # 100 + 100 bytes fit in 250; the third and fourth do not.
        assert server.statistics().dropped == 2
        release.set()
        assert await client.receive() == b"got 100"
        assert await client.receive() == b"got 100"
        # Into an empty queue a datagram larger than queue_bytes still goes.
        assert await round_trip(client, b"e" * 1000) == b"got 1000"
        assert server.statistics().dropped == 2
    assert handled == [b"first", b"a" * 100, b"b" * 100, b"e" * 1000]


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
        serving(handler, idle_timeout=10) as server,
        client_of(server) as client,
    ):
        for i in range(3):
            assert await round_trip(client, b"%d" % i) == b"%d" % i
            await trio.sleep(6)  # virtual time: less than idle_timeout
        with trio.fail_after(100):  # virtual seconds: a missing timeout fails
            await ended.wait()
        assert timed_out == [(arrivals[-1] + 10, CloseReason.TIMEOUT)]
        await trio.testing.wait_all_tasks_blocked()
        assert server.peers == ()
        # The next datagram from the same address starts a new handler.
        assert await round_trip(client, b"back") == b"back"
        assert server.statistics().peers_started == 2
        assert server.statistics().handler_errors == 0
    # The second handler saw the server shut down.
    assert [reason for _, reason in timed_out] == [
        CloseReason.TIMEOUT,
        CloseReason.SHUTDOWN,
    ]
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_idle_timeout_is_sixty_seconds_by_default(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ended: list[tuple[float, CloseReason | None]] = []
    done = trio.Event()

    async def handler(peer: UdpPeer) -> None:
        try:
            await echo(peer)
        finally:
            ended.append((trio.current_time(), peer.close_reason))
            done.set()

    async with serving(handler) as server, client_of(server) as client:
        assert server.idle_timeout == 60.0
        start = trio.current_time()
        assert await round_trip(client, b"hello") == b"hello"
        with trio.fail_after(1000):  # virtual seconds
            await done.wait()
    assert ended == [(start + 60, CloseReason.TIMEOUT)]


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
        serving(handler, idle_timeout=2.5) as server,
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
        serving(handler, max_peers=2) as server,
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
        stats = server.statistics()
        assert stats.peers_rejected == 1
        assert stats.peers_evicted == 0  # nobody was idle long enough
        assert stats.peers_started == 2
        assert {p.remote_address for p in server.peers} == {
            c1.local_address,
            c2.local_address,
        }
        # When a handler returns, its slot is free for a new peer.
        assert await round_trip(c1, b"bye") == b"bye"
        await trio.testing.wait_all_tasks_blocked()
        assert await round_trip(c3, b"3 again") == b"3 again"
        assert server.statistics().peers_started == 3


# --- a spray of source ports cannot lock new peers out (eviction) ------------


async def test_a_spray_of_source_ports_cannot_lock_out_new_peers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Many source ports fill the peer cap; once they stop sending, a new
    peer is admitted within 5 s (far less than the 60 s idle_timeout) by
    evicting the least recently active sprayed peer."""
    cap, spray = 8, 64
    stubborn = Stubborn()  # only a cancellation frees its slot

    with trio.fail_after(1000):  # virtual seconds: a hang fails the test
        async with (
            serving(stubborn, max_peers=cap) as server,
            client_of(server) as newcomer,
        ):
            assert server.idle_timeout == 60.0
            sprayed: list[Any] = []
            async with trio.open_nursery() as nursery:
                for _ in range(spray):
                    sprayed.append(await nursery.start(_sprayer, server.port))
                await trio.testing.wait_all_tasks_blocked()
                stats = server.statistics()
                assert (stats.peers_started, stats.peers_rejected) == (cap, spray - cap)
                first = [p.remote_address for p in server.peers]
                assert first == sprayed[:cap]

                # While the spray is fresh, the newcomer is refused.
                start = trio.current_time()
                await newcomer.send(b"let me in")
                await trio.testing.wait_all_tasks_blocked()
                assert server.statistics().peers_rejected == spray - cap + 1
                assert len(server.peers) == cap

                # The spray has stopped; the newcomer tries once a second.
                with trio.fail_after(100):  # virtual seconds: a lock-out fails
                    while True:
                        await newcomer.send(b"let me in")
                        with trio.move_on_after(1):
                            assert await newcomer.receive() == b"let me in"
                            break
                assert trio.current_time() == start + 5
                nursery.cancel_scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            stats = server.statistics()
            assert stats.peers_evicted == 1
            # The evicted peer was the least recently active, closed with
            # TIMEOUT, and its handler cancelled so that its slot was free.
            [evicted] = stubborn.ended
            assert evicted.address == first[0]
            assert evicted.reason is CloseReason.TIMEOUT
            assert evicted.cancelled
            assert newcomer.local_address in {p.remote_address for p in server.peers}
            assert len(server.peers) == cap


async def _sprayer(
    port: int, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
) -> None:
    """One sprayed source port: sends one datagram and keeps its port bound."""
    async with open_udp(local_host="127.0.0.1", remote=("127.0.0.1", port)) as ep:
        await ep.send(b"spray")
        task_status.started(ep.local_address)
        await trio.sleep_forever()


async def test_eviction_spares_active_peers_and_recent_ones(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        serving(echo, max_peers=2) as server,
        client_of(server) as active,
        client_of(server) as idle,
        client_of(server) as newcomer,
    ):
        assert await round_trip(idle, b"i") == b"i"
        assert await round_trip(active, b"a") == b"a"
        # 4 s later nobody has been idle for 5 s: the newcomer is refused.
        await trio.sleep(4)
        assert await round_trip(active, b"a") == b"a"
        await newcomer.send(b"n")
        await trio.testing.wait_all_tasks_blocked()
        assert server.statistics().peers_rejected == 1
        # At 6 s the idle peer has been silent for 6 s; the active one for 2.
        await trio.sleep(2)
        with trio.fail_after(10):  # virtual seconds: a refusal fails
            assert await round_trip(newcomer, b"n") == b"n"
        stats = server.statistics()
        assert (stats.peers_evicted, stats.peers_rejected) == (1, 1)
        assert {p.remote_address for p in server.peers} == {
            active.local_address,
            newcomer.local_address,
        }


async def test_eviction_waits_for_a_shorter_idle_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ignores_its_peer = Stubborn()  # never receives: never notices a timeout
    with trio.fail_after(1000):  # virtual seconds: a hang fails the test
        async with (
            serving(ignores_its_peer, max_peers=1, idle_timeout=2) as server,
            client_of(server) as first,
            client_of(server) as second,
        ):
            assert await round_trip(first, b"1") == b"1"
            await trio.sleep(1.5)
            await second.send(b"2")
            await trio.testing.wait_all_tasks_blocked()
            assert server.statistics().peers_rejected == 1
            await trio.sleep(0.5)  # idle for idle_timeout (2 s), less than 5 s
            with trio.fail_after(10):  # virtual seconds: a refusal fails
                assert await round_trip(second, b"2") == b"2"
            assert server.statistics().peers_evicted == 1


# --- handler ends and failures ----------------------------------------------


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
        serving(handler) as server,
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
        assert server.statistics().handler_errors == 1
        [exc] = server.handler_exceptions
        assert isinstance(exc, ValueError)
        # The good peer is untouched; the bad address gets a new handler.
        assert await round_trip(good, b"c") == b"c"
        assert await round_trip(bad, b"fresh") == b"fresh"
        assert server.statistics().peers_started == 3


async def test_handler_exceptions_keeps_the_last_hundred(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.CRITICAL, logger="trionet")

    async def handler(peer: UdpPeer) -> None:
        data = await peer.receive()
        await peer.send(data)
        raise RuntimeError(data.decode())

    async with serving(handler) as server, client_of(server) as client:
        for i in range(101):
            assert await round_trip(client, b"%d" % i) == b"%d" % i
        await trio.testing.wait_all_tasks_blocked()
        assert server.statistics().handler_errors == 101
        kept = server.handler_exceptions
        assert [str(e) for e in kept] == [str(i) for i in range(1, 101)]
        kept.clear()  # a copy
        assert len(server.handler_exceptions) == 100


async def test_peer_aclose_ends_async_for_quietly() -> None:
    finished: list[CloseReason | None] = []

    async def handler(peer: UdpPeer) -> None:
        async for data in peer:
            await peer.send(data)
            if data == b"close":
                await peer.aclose()
        finished.append(peer.close_reason)

    async with serving(handler) as server, client_of(server) as client:
        assert await round_trip(client, b"close") == b"close"
        await trio.testing.wait_all_tasks_blocked()
        assert finished == [CloseReason.CLOSED_BY_HOST]
        assert server.statistics().handler_errors == 0


async def test_handler_return_closes_peer_by_host() -> None:
    peers: list[UdpPeer] = []

    async def handler(peer: UdpPeer) -> None:
        peers.append(peer)
        await peer.send(await peer.receive())

    async with serving(handler) as server, client_of(server) as client:
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
        serving(handler, max_size=10) as server,
        client_of(server) as client,
    ):
        await client.send(b"x" * 11)
        await client.send(b"y" * 10)
        assert await client.receive() == b"done"
        assert server.statistics().oversized == 1
    too_large, fine = events
    assert isinstance(too_large, DatagramTooLarge)
    assert too_large.address == client.local_address
    assert fine == b"y" * 10


# --- the end of a handler's own peer is no handler failure --------------------


class _Other(Exception):
    pass


def test_only_own_end_of_a_single_exception() -> None:
    def is_own(exc: BaseException) -> bool:
        return isinstance(exc, ConnectionClosed)

    assert only_own_end(ConnectionClosed(CloseReason.TIMEOUT), is_own)
    assert not only_own_end(_Other(), is_own)
    assert not only_own_end(KeyboardInterrupt(), is_own)


def test_only_own_end_of_groups() -> None:
    mine = ConnectionClosed(CloseReason.CLOSED_BY_PEER)
    theirs = ConnectionClosed(CloseReason.CLOSED_BY_PEER)

    def is_own(exc: BaseException) -> bool:
        return exc is mine

    assert only_own_end(ExceptionGroup("", [mine]), is_own)
    assert only_own_end(ExceptionGroup("", [mine, mine]), is_own)
    nested = ExceptionGroup("", [ExceptionGroup("", [mine]), mine])
    assert only_own_end(ExceptionGroup("", [nested]), is_own)
    assert not only_own_end(ExceptionGroup("", [mine, theirs]), is_own)
    assert not only_own_end(
        ExceptionGroup("", [ExceptionGroup("", [mine, _Other()])]), is_own
    )
    with_interrupt = BaseExceptionGroup("", [mine, KeyboardInterrupt()])
    assert not only_own_end(with_interrupt, is_own)


async def test_a_disconnect_in_the_handlers_own_nursery_is_no_failure(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler that runs a reader and a writer in its own nursery gets its
    peer's idle timeout as ExceptionGroup([ConnectionClosed]): not logged at
    ERROR, not counted, not kept."""
    caplog.set_level(logging.DEBUG, logger="trionet")
    raised: list[BaseException] = []
    ended = trio.Event()
    peers: list[UdpPeer] = []

    async def handler(peer: UdpPeer) -> None:
        peers.append(peer)
        outgoing, incoming = trio.open_memory_channel[bytes](10)

        async def reader() -> None:
            async with outgoing:
                async for data in peer:
                    await outgoing.send(data)

        async def writer() -> None:
            async for data in incoming:
                await peer.send(data)
            await trio.sleep_forever()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                nursery.start_soon(writer)
        except BaseException as exc:
            raised.append(exc)
            ended.set()
            raise

    async with (
        serving(handler, idle_timeout=3) as server,
        client_of(server) as client,
    ):
        assert await round_trip(client, b"x") == b"x"
        with trio.fail_after(60):  # virtual seconds
            await ended.wait()
        await trio.testing.wait_all_tasks_blocked()
        [group] = raised
        assert isinstance(group, ExceptionGroup)
        assert [type(e) for e in group.exceptions] == [ConnectionClosed]
        assert peers[0].close_reason is CloseReason.TIMEOUT
        assert server.statistics().handler_errors == 0
        assert server.handler_exceptions == []
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_group_of_the_peers_own_oversized_datagram_is_no_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="trionet")
    peers: list[UdpPeer] = []

    async def handler(peer: UdpPeer) -> None:
        peers.append(peer)

        async def read() -> None:
            async for data in peer:
                await peer.send(data)

        async with trio.open_nursery() as outer:
            outer.start_soon(read)

    async with (
        serving(handler, max_size=10) as server,
        client_of(server) as client,
    ):
        assert await round_trip(client, b"fits") == b"fits"
        await client.send(b"x" * 11)
        await trio.testing.wait_all_tasks_blocked()
        assert server.statistics().handler_errors == 0
        assert server.handler_exceptions == []
        # The peer sent what we refuse: it ends as a protocol error.
        assert peers[0].close_reason is CloseReason.PROTOCOL_ERROR
        # A new datagram from the address starts a fresh handler.
        assert await round_trip(client, b"again") == b"again"
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_group_with_a_real_error_is_a_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="trionet")
    peers: list[UdpPeer] = []

    async def handler(peer: UdpPeer) -> None:
        peers.append(peer)
        await peer.send(await peer.receive())
        await peer.aclose()

        async def own_end() -> None:
            await peer.receive()

        async def bug() -> None:
            raise _Other("a handler bug")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(own_end)
            nursery.start_soon(bug)

    async with serving(handler) as server, client_of(server) as client:
        assert await round_trip(client, b"x") == b"x"
        await trio.testing.wait_all_tasks_blocked()
        assert server.statistics().handler_errors == 1
        [group] = server.handler_exceptions
        assert isinstance(group, ExceptionGroup)
        assert group.subgroup(_Other) is not None
        # The peer was already closed by the handler: that reason stays.
        assert peers[0].close_reason is CloseReason.CLOSED_BY_HOST
    [record] = caplog.records
    assert record.levelno == logging.ERROR


# --- shutdown -------------------------------------------------------------


async def test_aclose_gives_handlers_the_grace_period(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Admission stops at once; existing peers go on receiving and sending
    during the grace period; aclose returns when the handlers are done."""
    finished: list[tuple[float, CloseReason | None]] = []

    async def handler(peer: UdpPeer) -> None:
        async for data in peer:
            await peer.send(data)
            if data == b"last":
                await trio.sleep(3)
                await peer.send(b"bye")
                break
        finished.append((trio.current_time(), peer.close_reason))

    stopped = trio.Event()
    async with trio.open_nursery() as nursery:

        async def run(task_status: trio.TaskStatus[UdpServer]) -> None:
            await serve_udp(handler, 0, host="127.0.0.1", task_status=task_status)
            stopped.set()

        server: UdpServer = await nursery.start(run)
        async with client_of(server) as client, client_of(server) as late:
            assert await round_trip(client, b"before") == b"before"
            start = trio.current_time()
            closed_at: list[float] = []

            async def close() -> None:
                await server.aclose(grace_period=10)
                closed_at.append(trio.current_time())

            nursery.start_soon(close)
            await trio.testing.wait_all_tasks_blocked()
            # A new peer is refused at once ...
            await late.send(b"new")
            await trio.testing.wait_all_tasks_blocked()
            assert server.statistics().peers_rejected == 1
            assert server.statistics().peers_started == 1
            # ... while the existing one goes on both ways.
            await trio.sleep(1)
            assert await round_trip(client, b"during") == b"during"
            assert await round_trip(client, b"last") == b"last"
            assert await client.receive() == b"bye"
            await stopped.wait()
    assert finished == [(start + 4, None)]
    # aclose returned once the handler was done, well inside the grace period.
    assert closed_at == [start + 4]


async def test_aclose_cancels_handlers_after_the_grace_period(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stubborn = Stubborn()
    with trio.fail_after(1000):  # virtual seconds: a hang fails the test
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                partial(serve_udp, host="127.0.0.1", grace_period=7), stubborn, 0
            )
            async with client_of(server) as client:
                assert await round_trip(client, b"x") == b"x"
                start = trio.current_time()
                await server.aclose()  # the grace_period option: 7 s
                assert trio.current_time() == start + 7
    [ended] = stubborn.ended
    assert (ended.time, ended.reason, ended.cancelled) == (
        start + 7,
        CloseReason.SHUTDOWN,
        True,
    )


async def test_aclose_cut_short_still_completes_the_shutdown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stubborn = Stubborn()
    with trio.fail_after(100):  # virtual seconds: a hang fails the test
        async with trio.open_nursery() as handlers:
            async with trio.open_nursery() as nursery:
                server = await nursery.start(
                    partial(serve_udp, host="127.0.0.1", handler_nursery=handlers),
                    stubborn,
                    0,
                )
                async with client_of(server) as client:
                    assert await round_trip(client, b"x") == b"x"
                    start = trio.current_time()
                    with trio.move_on_after(0.1):
                        await server.aclose()
                    assert trio.current_time() == start + 0.1
            # serve_udp returned: the nursery above has exited.
            assert trio.current_time() == start + 5  # the default grace period
    [ended] = stubborn.ended
    assert (ended.time, ended.reason, ended.cancelled) == (
        start + 5,
        CloseReason.SHUTDOWN,
        True,
    )
    assert server.statistics().open_peers == 0


async def test_a_handler_calling_aclose_makes_serve_udp_return(
    autojump_clock: trio.testing.MockClock,
) -> None:
    servers: list[UdpServer] = []
    cancelled: list[float] = []

    async def handler(peer: UdpPeer) -> None:
        async for data in peer:
            await peer.send(data)
            if data == b"shutdown":
                try:
                    await servers[0].aclose(grace_period=1)
                except trio.Cancelled:
                    # Its own wait is cancelled after the grace period.
                    cancelled.append(trio.current_time())
                    raise

    with trio.fail_after(100):  # virtual seconds: a hang fails the test
        async with trio.open_nursery() as nursery:
            servers.append(
                await nursery.start(partial(serve_udp, host="127.0.0.1"), handler, 0)
            )
            async with client_of(servers[0]) as client:
                assert await round_trip(client, b"shutdown") == b"shutdown"
                start = trio.current_time()
    assert trio.current_time() == start + 1
    assert cancelled == [start + 1]
    assert servers[0].peers == ()


async def test_a_later_shorter_grace_period_shortens_the_shutdown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stubborn = Stubborn()
    returned: list[tuple[str, float]] = []
    with trio.fail_after(1000):  # virtual seconds: a hang fails the test
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                partial(serve_udp, host="127.0.0.1"), stubborn, 0
            )
            async with client_of(server) as client:
                assert await round_trip(client, b"x") == b"x"
            start = trio.current_time()

            async def close(name: str, grace: float) -> None:
                await server.aclose(grace_period=grace)
                returned.append((name, trio.current_time()))

            nursery.start_soon(close, "first", 100)
            await trio.sleep(1)
            nursery.start_soon(close, "second", 2)
            await trio.sleep(1)
            nursery.start_soon(close, "longer, later", 50)  # does not lengthen it
    assert sorted(returned) == [
        ("first", start + 3),
        ("longer, later", start + 3),
        ("second", start + 3),
    ]


async def test_handlers_run_in_one_inner_nursery_of_handler_nursery() -> None:
    caught: list[ConnectionClosed] = []
    parents: list[trio.Nursery | None] = []
    cancelled = trio.Event()

    async def handler(peer: UdpPeer) -> None:
        parents.append(trio.lowlevel.current_task().parent_nursery)
        await peer.send(await peer.receive())
        with pytest.raises(ConnectionClosed) as info:
            await peer.receive()
        caught.append(info.value)
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    with trio.fail_after(30):  # a hang guard, not a timing assertion
        async with trio.open_nursery() as handlers:
            async with trio.open_nursery() as nursery:
                server = await nursery.start(
                    partial(serve_udp, host="127.0.0.1", handler_nursery=handlers),
                    handler,
                    0,
                )
                async with client_of(server) as a, client_of(server) as b:
                    assert await round_trip(a, b"a") == b"a"
                    assert await round_trip(b, b"b") == b"b"
                    await trio.testing.wait_all_tasks_blocked()
                    await server.aclose(grace_period=0)
            # The handlers were cancelled, though handlers stays open.
            assert cancelled.is_set()
            [inner] = set(parents)
            assert inner is not handlers and inner is not nursery
            assert inner is not None and inner.parent_task.parent_nursery is handlers
    assert [e.reason for e in caught] == [CloseReason.SHUTDOWN] * 2


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
    assert server.statistics().handler_errors == 0


async def test_cancelling_serve_udp_cancels_handlers_in_handler_nursery_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stubborn = Stubborn()
    with trio.fail_after(100):  # virtual seconds: a hang fails the test
        async with trio.open_nursery() as handlers:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    server = await nursery.start(
                        partial(serve_udp, host="127.0.0.1", handler_nursery=handlers),
                        stubborn,
                        0,
                    )
                    async with client_of(server) as client:
                        assert await round_trip(client, b"x") == b"x"
                        start = trio.current_time()
                        scope.cancel()
    [ended] = stubborn.ended
    assert (ended.time, ended.reason, ended.cancelled) == (
        start,
        CloseReason.SHUTDOWN,
        True,
    )
    assert all(s.fileno() == -1 for s in (e.sock for e in server._sockets))
    # aclose after the fact returns at once.
    await server.aclose()


async def test_aclose_twice_and_after_stopping() -> None:
    peers: list[UdpPeer] = []

    async def handler(peer: UdpPeer) -> None:
        peers.append(peer)
        await echo(peer)

    async with serving(handler) as server, client_of(server) as client:
        assert await round_trip(client, b"x") == b"x"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.aclose)
            nursery.start_soon(server.aclose)
        # Both calls returned once the one shutdown was over.
        assert [p.close_reason for p in peers] == [CloseReason.SHUTDOWN]
        assert server.peers == ()
        assert all(s.fileno() == -1 for s in (e.sock for e in server._sockets))
        await server.aclose()  # after stopping: returns at once
    # (and once more when the block ends)


async def test_body_exception_is_not_wrapped() -> None:
    with pytest.raises(KeyError) as info:
        async with serving(echo) as server:
            async with client_of(server) as client:
                assert await round_trip(client, b"x") == b"x"
            raise KeyError("from the body")
    assert type(info.value) is KeyError
    assert info.value.__context__ is None


async def test_body_exception_keeps_its_context() -> None:
    with pytest.raises(RuntimeError) as info:
        async with serving(echo):
            try:
                raise LookupError("first")
            except LookupError:
                raise RuntimeError("second") from None
    assert isinstance(info.value.__context__, LookupError)


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


# --- kernel buffer sizes ------------------------------------------------------


def _buffer_sizes(sock: Any) -> tuple[int, int]:
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
    )


def _expected_sizes(rcvbuf: int, sndbuf: int) -> tuple[int, int]:
    # Linux reports twice the size asked for (its bookkeeping overhead).
    return (2 * rcvbuf, 2 * sndbuf) if LINUX else (rcvbuf, sndbuf)


async def test_open_udp_sets_the_kernel_buffer_sizes() -> None:
    async with (
        local(so_rcvbuf=65536, so_sndbuf=32768) as sized,
        local() as default,
    ):
        assert _buffer_sizes(sized.socket) == _expected_sizes(65536, 32768)
        assert _buffer_sizes(default.socket) != _buffer_sizes(sized.socket)
        await default.send_to(b"still works", sized.local_address)
        assert (await sized.receive_from())[0] == b"still works"


async def test_serve_udp_sets_the_kernel_buffer_sizes() -> None:
    async with serving(echo, host=None, so_rcvbuf=65536, so_sndbuf=32768) as server:
        for endpoint in server._sockets:  # every address family
            assert _buffer_sizes(endpoint.sock) == _expected_sizes(65536, 32768)
        async with client_of(server) as client:
            assert await round_trip(client, b"sized") == b"sized"


# --- the fast path: cancellation never loses or reorders a datagram ----------


async def cancelled_when_blocked(call: Callable[[], Awaitable[object]]) -> bool:
    """Run ``call()`` in a scope cancelled as soon as every task waits;
    return whether that cancellation ended it."""
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as scope:

            async def cancel_when_blocked() -> None:
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()

            nursery.start_soon(cancel_when_blocked)
            await call()
    return scope.cancelled_caught


class PauseHook:
    """Makes every call that finished at once pass through the scheduler
    (SCHEDULE_EVERY = 1) and runs ``on_pause`` in the caller's pause, after
    the datagram was taken or sent -- where a cancellation must not undo it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.on_pause: Any = None
        self.pauses = 0
        original = _common.Pacer.pause
        monkeypatch.setattr(_common, "SCHEDULE_EVERY", 1)

        async def pause(pacer: _common.Pacer) -> None:
            self.pauses += 1
            if self.on_pause is not None:
                self.on_pause()
            await original(pacer)

        monkeypatch.setattr(_common.Pacer, "pause", pause)


async def test_cancelled_endpoint_receives_lose_and_reorder_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hook = PauseHook(monkeypatch)
    got: list[bytes] = []
    async with local(so_rcvbuf=1 << 20) as receiver, local() as sender:
        for i in range(10):
            await sender.send_to(b"%d" % i, receiver.local_address)
        for _ in range(3):
            got.append((await receiver.receive_from())[0])
        # Cancelled at its start: takes nothing.
        with trio.CancelScope() as scope:
            scope.cancel()
            await receiver.receive_from()
        assert scope.cancelled_caught
        # Cancelled in the pause after taking a datagram: returns it all the
        # same; the next receive in that scope is the one cancelled.
        with trio.CancelScope() as scope:
            hook.on_pause = scope.cancel
            while True:
                got.append((await receiver.receive_from())[0])
        hook.on_pause = None
        assert scope.cancelled_caught
        assert got == [b"0", b"1", b"2", b"3"]
        async for data, _ in receiver:
            got.append(data)
            if len(got) == 10:
                break
        assert got == [b"%d" % i for i in range(10)]

        # Cancelled while waiting for an empty socket: takes nothing.
        assert await cancelled_when_blocked(receiver.receive_from)
        await sender.send_to(b"after", receiver.local_address)
        assert (await receiver.receive_from())[0] == b"after"
        assert receiver.statistics().received == 11
        assert hook.pauses > 0


async def test_cancelled_peer_receives_lose_and_reorder_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch of queued datagrams cut by cancellations at every point of a
    handler's receive: all arrive, in order, none dropped."""
    hook = PauseHook(monkeypatch)
    queued = trio.Event()
    got: list[bytes] = []
    outcomes: list[str] = []
    done = trio.Event()

    async def handler(peer: UdpPeer) -> None:
        got.append(await peer.receive())
        await queued.wait()
        with trio.CancelScope() as scope:
            scope.cancel()
            await peer.receive()
        outcomes.append(f"start {scope.cancelled_caught}")
        with trio.CancelScope() as scope:
            hook.on_pause = scope.cancel
            while True:
                got.append(await peer.receive())
        hook.on_pause = None
        outcomes.append(f"pause {scope.cancelled_caught}")
        async for data in peer:
            got.append(data)
            if len(got) == 10:
                break
        outcomes.append(f"waiting {await cancelled_when_blocked(peer.receive)}")
        await peer.send(b"waited")
        got.append(await peer.receive())
        done.set()

    with trio.fail_after(30):  # a hang guard, not a timing assertion
        await _cut_batch(handler, done, queued)
    assert outcomes == ["start True", "pause True", "waiting True"]
    assert got == [b"%d" % i for i in range(10)] + [b"after"]
    assert hook.pauses > 0


async def _cut_batch(handler: Any, done: trio.Event, queued: trio.Event) -> None:
    async with serving(handler) as server, client_of(server) as client:
        await client.send(b"0")
        await trio.testing.wait_all_tasks_blocked()
        for i in range(1, 10):
            await client.send(b"%d" % i)
        await trio.testing.wait_all_tasks_blocked()
        assert server.peers[0]._queue  # the batch is queued
        queued.set()
        assert await client.receive() == b"waited"
        await client.send(b"after")
        await done.wait()
        stats = server.statistics()
        assert (stats.received, stats.dropped) == (11, 0)


async def test_a_cancelled_handler_leaves_its_queue_counted_as_dropped() -> None:
    """A peer whose handler is cancelled for good (here: the server shuts
    down) while datagrams wait in its queue drops them -- counted, never
    silently."""
    first = trio.Event()

    async def handler(peer: UdpPeer) -> None:
        await peer.receive()
        first.set()
        await trio.sleep_forever()

    async with serving(handler) as server, client_of(server) as client:
        await client.send(b"first")
        await first.wait()
        for i in range(4):
            await client.send(b"%d" % i)
        await trio.testing.wait_all_tasks_blocked()
        [peer] = server.peers
        assert len(peer._queue) == 4
        await server.aclose(grace_period=0)
        stats = server.statistics()
        assert (stats.received, stats.dropped) == (5, 4)
        assert peer.close_reason is CloseReason.SHUTDOWN
        assert not peer._queue and peer._queued_bytes == 0


async def test_eviction_counts_the_queue_it_drops(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stubborn = Stubborn()  # answers once, then never receives again
    with trio.fail_after(100):  # virtual seconds: a hang fails the test
        async with (
            serving(stubborn, max_peers=1) as server,
            client_of(server) as old,
            client_of(server) as newcomer,
        ):
            assert await round_trip(old, b"hello") == b"hello"
            for i in range(3):
                await old.send(b"%d" % i)  # queued: nobody receives them
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(5)
            assert await round_trip(newcomer, b"let me in") == b"let me in"
            stats = server.statistics()
            assert (stats.peers_evicted, stats.dropped) == (1, 3)


@kernel_only  # (sends from a stdlib socket of its own)
async def test_a_reader_batch_larger_than_read_batch_keeps_order() -> None:
    count = 3 * _server.READ_BATCH + 7
    got: list[bytes] = []
    done = trio.Event()

    async def handler(peer: UdpPeer) -> None:
        async for data in peer:
            got.append(data)
            if len(got) == count:
                done.set()

    async with serving(handler, so_rcvbuf=1 << 20) as server:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
            # No checkpoint in between: every datagram is in the server's
            # socket before its reader runs.
            for i in range(count):
                raw.sendto(b"%d" % i, ("127.0.0.1", server.port))
            with trio.fail_after(30):  # a hang guard, not a timing assertion
                await done.wait()
        assert got == [b"%d" % i for i in range(count)]
        stats = server.statistics()
        assert (stats.received, stats.dropped, stats.peers_started) == (count, 0, 1)


async def test_concurrent_peer_receives_are_served_in_fifo_order() -> None:
    got: list[tuple[str, bytes]] = []
    peers: list[UdpPeer] = []
    start_second = trio.Event()

    async def handler(peer: UdpPeer) -> None:
        peers.append(peer)

        async def receiver(name: str) -> None:
            while True:
                got.append((name, await peer.receive()))
                await peer.send(name.encode())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver, "first")
            await start_second.wait()
            nursery.start_soon(receiver, "second")

    async with serving(handler) as server, client_of(server) as client:
        assert await round_trip(client, b"hello") == b"first"
        await trio.testing.wait_all_tasks_blocked()
        start_second.set()
        await trio.testing.wait_all_tasks_blocked()
        assert len(peers[0]._receivers) == 2  # both wait: first, then second
        answers = []
        for i in range(4):
            answers.append(await round_trip(client, b"%d" % i))
            await trio.testing.wait_all_tasks_blocked()
    # Each datagram went to one waiting receive, the longest waiting first.
    assert answers == [b"first", b"second", b"first", b"second"]
    assert got == [
        ("first", b"hello"),
        ("first", b"0"),
        ("second", b"1"),
        ("first", b"2"),
        ("second", b"3"),
    ]


# --- sends that have to wait ----------------------------------------------


def _fill(sock: socket.socket) -> int:
    """Send into a UNIX datagram socket until its peer's queue is full."""
    for sent in range(10_000):
        try:
            sock.send(b"fill")
        except BlockingIOError:
            return sent
    raise AssertionError("the kernel never refused")  # pragma: no cover


def _drain(sock: socket.socket) -> list[bytes]:
    got = []
    while True:
        try:
            got.append(sock.recv(100))
        except BlockingIOError:
            return got


async def test_endpoint_send_waits_for_a_full_kernel_buffer_and_is_cancellable() -> (
    None
):
    # A UNIX datagram pair pushes back for real when the reader lags (UDP on
    # loopback drops instead).
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    theirs.setblocking(False)
    with theirs:
        async with Datagram(trio.socket.from_stdlib_socket(ours)) as endpoint:
            filled = _fill(ours)
            done: list[str] = []
            assert await cancelled_when_blocked(partial(endpoint.send, b"cancelled"))
            assert endpoint.statistics().sent == 0

            # Waiting senders go in FIFO order, and one that arrives while
            # they wait queues behind them though the kernel has room.
            async def send(data: bytes) -> None:
                await endpoint.send(data)
                done.append(data.decode())

            async with trio.open_nursery() as nursery:
                for name in (b"1", b"2", b"3"):
                    nursery.start_soon(send, name)
                    await trio.testing.wait_all_tasks_blocked()
                assert done == []
                drained = _drain(theirs)
                nursery.start_soon(send, b"4")
            assert drained == [b"fill"] * filled
            assert done == ["1", "2", "3", "4"]
            assert _drain(theirs) == [b"1", b"2", b"3", b"4"]
            assert endpoint.statistics().sent == 4

            # Closing the endpoint ends a waiting send.
            _fill(ours)
            async with trio.open_nursery() as nursery:

                async def send_and_fail() -> None:
                    with pytest.raises(ConnectionClosed) as info:
                        await endpoint.send(b"never")
                    assert info.value.reason is CloseReason.CLOSED_BY_HOST
                    done.append("closed")

                nursery.start_soon(send_and_fail)
                await trio.testing.wait_all_tasks_blocked()
                await endpoint.aclose()
            assert done[-1] == "closed"
        assert b"never" not in _drain(theirs)


class _RefusingSocket:
    """Stands in for a server socket on the send side: while ``refusing``,
    ``sendto`` raises BlockingIOError (the kernel's buffer is full), and a
    wait for it to become writable waits on a full UNIX datagram socket,
    which :meth:`release` empties."""

    def __init__(self, real: socket.socket) -> None:
        self.real = real
        self.refusing = True
        self.sent: list[bytes] = []
        self._full, self._reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._full.setblocking(False)
        self._reader.setblocking(False)
        _fill(self._full)

    def fileno(self) -> int:
        return self._full.fileno()

    def sendto(self, data: bytes, address: Any) -> int:
        if self.refusing:
            raise BlockingIOError(errno.EAGAIN, "refused")
        self.sent.append(data)
        return self.real.sendto(data, address)

    def release(self) -> None:
        self.refusing = False
        _drain(self._reader)

    def close(self) -> None:
        self._full.close()
        self._reader.close()


# (A stand-in for a kernel socket whose buffer is full: a memory socket's
# send never blocks.)
@kernel_only
async def test_peer_send_waits_for_a_full_kernel_buffer_and_is_cancellable() -> None:
    outcomes: list[str] = []
    scopes: list[trio.CancelScope] = []

    async def handler(peer: UdpPeer) -> None:
        data = await peer.receive()
        if data == b"idle":
            await trio.sleep_forever()
        if data == b"cancel":
            with trio.CancelScope() as scope:
                scopes.append(scope)
                await peer.send(b"cancelled")
            outcomes.append(f"cancelled {scope.cancelled_caught}")
            return
        outcomes.append(f"waiting {data.decode()}")
        await peer.send(b"reply " + data)
        outcomes.append(f"sent {data.decode()}")

    async with serving(handler) as server:
        endpoint = server._sockets[0]
        real = endpoint.sock
        refusing = _RefusingSocket(real)
        # Only the send side: the reader, waiting by now, keeps the real one.
        await trio.testing.wait_all_tasks_blocked()
        endpoint.sock = refusing  # type: ignore[assignment]  # a stand-in
        try:
            with trio.fail_after(30):  # a hang guard, not a timing assertion
                await _wait_to_send(server, refusing, outcomes, scopes)
        finally:
            endpoint.sock = real
            refusing.close()
    assert outcomes[-2:] == ["sent a", "sent b"]


async def _wait_to_send(
    server: UdpServer,
    refusing: _RefusingSocket,
    outcomes: list[str],
    scopes: list[trio.CancelScope],
) -> None:
    async with (
        client_of(server) as canceller,
        client_of(server) as a,
        client_of(server) as b,
        client_of(server) as c,
    ):
        await canceller.send(b"cancel")
        await trio.testing.wait_all_tasks_blocked()
        [scope] = scopes
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert outcomes == ["cancelled True"]
        await c.send(b"idle")
        # Two peers' handlers wait to send on the one socket, in order.
        await a.send(b"a")
        await trio.testing.wait_all_tasks_blocked()
        await b.send(b"b")
        await trio.testing.wait_all_tasks_blocked()
        assert outcomes == ["cancelled True", "waiting a", "waiting b"]
        assert refusing.sent == []
        [c_peer] = [p for p in server.peers if p.remote_address == c.local_address]
        refusing.release()
        # The kernel has room again, but a and b wait: c queues behind them.
        await c_peer.send(b"reply c")
        assert refusing.sent == [b"reply a", b"reply b", b"reply c"]
        assert await a.receive() == b"reply a"
        assert await b.receive() == b"reply b"
        assert await c.receive() == b"reply c"


# --- a busy endpoint or handler lets other tasks run ---------------------------


async def test_a_busy_endpoint_lets_other_tasks_run() -> None:
    other_ran = trio.Event()

    async def other() -> None:
        other_ran.set()

    async with local() as endpoint, trio.open_nursery() as nursery:
        nursery.start_soon(other)
        await endpoint.send_to(b"ping", endpoint.local_address)
        rounds = 0
        while not other_ran.is_set():
            # The datagram is always there already: no call has to wait.
            data, address = await endpoint.receive_from()
            await endpoint.send_to(data, address)
            rounds += 1
            # (Capped, so that a broken pacer fails instead of looping on.)
            assert rounds <= min(_common.SCHEDULE_EVERY, 1000), "other never ran"


@kernel_only  # (sends from a stdlib socket of its own)
async def test_a_busy_handler_lets_other_tasks_run() -> None:
    count = 200
    assert count > 2 * _common.SCHEDULE_EVERY  # what the test relies on
    release = trio.Event()
    done = trio.Event()
    handled = 0
    gaps: list[int] = []

    async def handler(peer: UdpPeer) -> None:
        nonlocal handled
        await release.wait()
        async for _ in peer:
            handled += 1
            if handled == count:
                done.set()

    async def ticker() -> None:
        seen = 0
        while not done.is_set():
            await trio.lowlevel.checkpoint()
            gaps.append(handled - seen)
            seen = handled

    async with serving(handler, so_rcvbuf=1 << 20) as server:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
            for i in range(count):
                raw.sendto(b"%d" % i, ("127.0.0.1", server.port))
            await trio.testing.wait_all_tasks_blocked()
        # Everything is queued: the handler never has to wait.
        assert len(server.peers[0]._queue) == count
        with trio.fail_after(30):  # a hang guard, not a timing assertion
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ticker)
                release.set()
                await done.wait()
    assert sum(gaps) == count
    # The handler passes through the scheduler every SCHEDULE_EVERY receives;
    # trio runs each runnable task once per batch, in either order, so the
    # ticker sees at most two such stretches between its own turns.
    assert max(gaps) <= 2 * _common.SCHEDULE_EVERY


# --- idle timeouts (the idle watcher) -----------------------------------------


async def test_idle_peers_time_out_each_at_its_own_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Each peer times out idle_timeout after its own last datagram -- also
    one whose receive starts waiting later with an earlier deadline than the
    watcher is sleeping towards."""
    ended: dict[bytes, tuple[float, str]] = {}
    both = trio.Event()

    async def handler(peer: UdpPeer) -> None:
        first = await peer.receive()
        if first == b"busy":
            await trio.sleep(4)  # busy elsewhere, then receives
        with pytest.raises(ConnectionClosed) as info:
            await peer.receive()
        assert info.value.reason is CloseReason.TIMEOUT
        ended[first] = (trio.current_time(), str(info.value))
        if len(ended) == 2:
            both.set()

    with trio.fail_after(100):  # virtual seconds: a missing timeout fails
        async with (
            serving(handler, idle_timeout=10) as server,
            client_of(server) as busy,
            client_of(server) as quiet,
        ):
            start = trio.current_time()
            await busy.send(b"busy")  # waits from start + 4, deadline start + 10
            await trio.sleep(1)
            await quiet.send(b"quiet")  # waits from start + 1, deadline start + 11
            await both.wait()
    assert ended[b"busy"][0] == start + 10
    assert ended[b"quiet"][0] == start + 11
    assert "for 10 seconds" in ended[b"busy"][1]


async def test_a_receive_after_a_long_busy_spell_times_out_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    results: list[tuple[float, float, CloseReason]] = []
    finished = trio.Event()

    async def handler(peer: UdpPeer) -> None:
        await peer.receive()
        await trio.sleep(25)  # longer than idle_timeout, nothing arrived
        called = trio.current_time()
        with pytest.raises(ConnectionClosed) as info:
            await peer.receive()
        results.append((called, trio.current_time(), info.value.reason))
        finished.set()

    with trio.fail_after(100):  # virtual seconds
        async with (
            serving(handler, idle_timeout=10) as server,
            client_of(server) as client,
        ):
            start = trio.current_time()
            await client.send(b"x")
            await finished.wait()
    assert results == [(start + 25, start + 25, CloseReason.TIMEOUT)]


# --- addresses that need a name lookup -------------------------------------


async def test_send_to_a_host_name_and_a_malformed_address() -> None:
    async with local() as a, local() as b:
        await a.send_to(b"by name", ("localhost", b.local_address[1]))
        assert await b.receive_from() == (b"by name", a.local_address)
        with pytest.raises(ValueError, match="tuple"):
            await a.send_to(b"x", ("127.0.0.1",))
        assert a.statistics().sent == 1
