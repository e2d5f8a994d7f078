"""TCP servers and clients over real loopback: lifecycle, isolation, close reasons."""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
from functools import partial

import pytest
import trio
import trio.testing

import trionet
from trionet import CloseReason, ConnectError, ConnectionClosed

from .conftest import kernel_only

if sys.version_info < (3, 11):
    from exceptiongroup import ExceptionGroup

#: Every test here runs over the kernel and over a memory network.
pytestmark = pytest.mark.usefixtures("network")


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no ::1 here")


async def echo_lines(conn: trionet.Connection) -> None:
    async for line in conn:
        await conn.send(line)


async def test_serve_tcp_in_a_nursery_and_connect() -> None:
    async with trio.open_nursery() as nursery:
        server: trionet.Server = await nursery.start(
            lambda task_status: trionet.serve_tcp(
                echo_lines,
                0,
                host="127.0.0.1",
                framing=trionet.Lines(),
                task_status=task_status,
            )
        )
        assert isinstance(server, trionet.Server)
        assert server.addresses == [("127.0.0.1", server.port)]
        async with trionet.connect_tcp(
            "127.0.0.1", server.port, framing=trionet.Lines()
        ) as conn:
            await conn.send(b"ping")
            assert await conn.receive() == b"ping"
        await server.aclose()
    # serve_tcp returned by itself once the server was closed.
    assert server.statistics().open == 0


async def test_open_tcp_server_block_and_close_reasons() -> None:
    closed: list[CloseReason | None] = []
    async with trionet.open_tcp_server(
        echo_lines,
        framing=trionet.Lines(),
        on_close=lambda c: closed.append(c.close_reason),
    ) as server:
        # The client closes: the server side sees CLOSED_BY_PEER.
        async with trionet.connect_tcp("127.0.0.1", server.port) as conn:
            await conn.send_line(b"hi")
            assert await conn.receive_line() == b"hi"
        assert conn.close_reason is CloseReason.CLOSED_BY_HOST
        await trio.testing.wait_all_tasks_blocked()
        assert closed == [CloseReason.CLOSED_BY_PEER]
        assert server.connections == []


async def test_handler_return_closes_with_closed_by_host() -> None:
    async def hello_then_disconnect(conn: trionet.Connection) -> None:
        await conn.send_line(b"hello")

    async with trionet.open_tcp_server(hello_then_disconnect) as server:
        async with trionet.connect_tcp("127.0.0.1", server.port) as conn:
            assert await conn.receive_line() == b"hello"
            with pytest.raises(ConnectionClosed) as info:
                await conn.receive_line()
            assert info.value.reason is CloseReason.CLOSED_BY_PEER
        await trio.testing.wait_all_tasks_blocked()
        assert server.statistics().closed == {CloseReason.CLOSED_BY_HOST: 1}


async def test_handler_crash_is_isolated(caplog: pytest.LogCaptureFixture) -> None:
    async def handler(conn: trionet.Connection) -> None:
        line = await conn.receive_line()
        if line == b"crash":
            raise RuntimeError("handler bug")
        await conn.send_line(line)
        await echo_lines(conn)

    caplog.set_level(logging.ERROR, logger="trionet")
    async with trionet.open_tcp_server(handler, framing=trionet.Lines()) as server:
        async with trionet.connect_tcp(
            "127.0.0.1", server.port, framing=trionet.Lines()
        ) as good:
            await good.send(b"fine")
            assert await good.receive() == b"fine"
            async with trionet.connect_tcp("127.0.0.1", server.port) as bad:
                await bad.send_line(b"crash")
                with pytest.raises(ConnectionClosed):
                    await bad.receive_line()
            # The other connection and the server keep going.
            await good.send(b"still here")
            assert await good.receive() == b"still here"
        await trio.testing.wait_all_tasks_blocked()
        assert server.statistics().closed[CloseReason.ERROR] == 1
        assert [type(e) for e in server.handler_exceptions] == [RuntimeError]
    assert "handler bug" in caplog.text


async def test_body_exception_is_not_wrapped_in_a_group() -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with trionet.open_tcp_server(echo_lines) as server:
            async with trionet.connect_tcp("127.0.0.1", server.port):
                raise Boom


@kernel_only
async def test_connect_refused_is_a_connect_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(ConnectError) as info:
            await trionet.connect_tcp("127.0.0.1", port)
    assert info.value.reason is CloseReason.ERROR
    assert isinstance(info.value.__cause__, OSError)
    assert isinstance(info.value, OSError)
    # The operating system's reason, not only "all attempts failed".
    refused = os.strerror(errno.ECONNREFUSED)
    assert str(info.value) == f"cannot connect to 127.0.0.1:{port}: {refused}"


@kernel_only
async def test_connect_timeout(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    async def never_connects(*args: object, **kwargs: object) -> trio.SocketStream:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    monkeypatch.setattr(trio, "open_tcp_stream", never_connects)
    start = trio.current_time()
    with pytest.raises(ConnectError) as info:
        await trionet.connect_tcp("127.0.0.1", 9, connect_timeout=2.5)
    assert info.value.reason is CloseReason.TIMEOUT
    assert trio.current_time() - start == pytest.approx(2.5)


async def test_all_listeners_share_one_port() -> None:
    hosts = ["127.0.0.1", "::1"] if _has_ipv6_loopback() else ["127.0.0.1", "127.0.0.2"]
    async with trionet.open_tcp_server(echo_lines, host=hosts) as server:
        assert len(server.addresses) == 2
        assert {address[1] for address in server.addresses} == {server.port}
        for host in hosts:
            async with trionet.connect_tcp(
                host, server.port, framing=trionet.Lines()
            ) as c:
                await c.send(host)
                assert await c.receive() == host.encode()


async def test_host_none_listens_everywhere() -> None:
    async with trio.open_nursery() as nursery:
        server: trionet.Server = await nursery.start(trionet.serve_tcp, echo_lines, 0)
        families = {len(address) for address in server.addresses}
        assert 2 in families  # at least the IPv4 wildcard
        async with trionet.connect_tcp("127.0.0.1", server.port) as conn:
            await conn.send_line(b"x")
            assert await conn.receive_line() == b"x"
        nursery.cancel_scope.cancel()


@needs_ipv6
async def test_ipv6_addresses_have_four_fields() -> None:
    async with trionet.open_tcp_server(echo_lines, host="::1") as server:
        async with trionet.connect_tcp("::1", server.port) as conn:
            assert conn.remote_address is not None
            assert len(conn.remote_address) == 4
            assert conn.remote_address[:2] == ("::1", server.port)


async def test_cancelling_serve_tcp_closes_connections_with_shutdown() -> None:
    reasons: list[CloseReason | None] = []
    async with trio.open_nursery() as nursery:
        server: trionet.Server = await nursery.start(
            lambda task_status: trionet.serve_tcp(
                echo_lines,
                0,
                host="127.0.0.1",
                on_close=lambda c: reasons.append(c.close_reason),
                task_status=task_status,
            )
        )
        conn = await trionet.connect_tcp("127.0.0.1", server.port)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert reasons == [CloseReason.SHUTDOWN]
    with pytest.raises(ConnectionClosed) as info:
        await conn.receive_line()
    assert info.value.reason is CloseReason.CLOSED_BY_PEER
    await conn.aclose()


async def test_empty_server_block_closes_cleanly() -> None:
    # The block ends before the accept loop has run once.
    async with trionet.open_tcp_server(echo_lines) as server:
        pass
    assert server.statistics().open == 0


async def test_body_exception_group_is_not_double_wrapped() -> None:
    with pytest.raises(ExceptionGroup) as info:
        async with trionet.open_tcp_server(echo_lines):
            raise ExceptionGroup("mine", [ValueError("inner")])
    assert info.value.message == "mine"
    assert [type(e) for e in info.value.exceptions] == [ValueError]


async def test_protocol_error_escaping_a_handler_is_no_handler_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with trionet.open_tcp_server(
        echo_lines, framing=trionet.Lines(max_length=4)
    ) as server:
        async with trionet.connect_tcp("127.0.0.1", server.port) as conn:
            await conn.send_all(b"far too long\n")
            assert await conn.receive_some() == b""
        await trio.testing.wait_all_tasks_blocked()
        assert server.statistics().closed == {CloseReason.PROTOCOL_ERROR: 1}
        assert server.handler_exceptions == []
    assert "raised" not in caplog.text


async def test_handler_nursery_hosts_the_connection_tasks() -> None:
    reasons: list[CloseReason | None] = []
    running = trio.Event()

    async def handler(conn: trionet.Connection) -> None:
        running.set()
        await trio.sleep_forever()

    def on_close(conn: trionet.Connection) -> None:
        reasons.append(conn.close_reason)

    with trio.fail_after(10):
        async with trio.open_nursery() as handlers:
            async with trio.open_nursery() as nursery:
                server = await nursery.start(
                    partial(
                        trionet.serve_tcp,
                        handler,
                        0,
                        host="127.0.0.1",
                        handler_nursery=handlers,
                        grace_period=0,
                        on_close=on_close,
                    )
                )
                async with trionet.connect_tcp("127.0.0.1", server.port) as conn:
                    await running.wait()
                    # The connection task lives under the given nursery.
                    names = [
                        task.name
                        for host in handlers.child_tasks
                        for inner in host.child_nurseries
                        for task in inner.child_tasks
                    ]
                    assert names == ["trionet connection"]
                    await server.aclose()
                    assert await conn.receive_some() == b""
                    assert conn.eof_received
                    assert conn.close_reason is None
                assert conn.close_reason is CloseReason.CLOSED_BY_PEER
            # Nothing of the server is left in ``handlers``: it can end.
            assert not handlers.child_tasks
    assert reasons == [CloseReason.SHUTDOWN]


def test_server_options_are_declared_once() -> None:
    """serve_tcp's keyword arguments are typed by TypedDicts that must agree
    with ServerOptions, field for field and type for type; the channel
    server's are the same but for ``framing``, which it fixes itself."""
    import typing

    import attrs

    import trionet._server
    from trionet._server import _OptionsDict, _TransportOptionsDict

    # (ServerOptions says it lives in "trionet": resolve its annotations in
    # the module that defines it.)
    attrs.resolve_types(
        trionet.ServerOptions, globalns=vars(trionet._server), include_extras=False
    )
    fields = {field.name: field.type for field in attrs.fields(trionet.ServerOptions)}
    assert typing.get_type_hints(_OptionsDict) == fields
    del fields["framing"]
    assert typing.get_type_hints(_TransportOptionsDict) == fields
