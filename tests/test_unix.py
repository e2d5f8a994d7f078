"""UNIX domain socket servers and clients: the socket file, peer credentials,
and the same server as TCP.

(Every Connection test of test_connection.py also runs over a UNIX socket
pair: see PAIR_KINDS in conftest.py.)
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from functools import partial

import pytest
import trio
import trio.testing

import trionet
import trionet._listeners
import trionet.channels
from trionet import CloseReason, ConnectError, PeerCredentials
from trionet._transport import SocketTransport

LINES = trionet.Lines()
#: The unprivileged user that permission tests connect as.
NOBODY = 65534
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


async def echo(conn: trionet.Connection) -> None:
    async for line in conn:
        await conn.send(line)


def exists(path: str) -> bool:
    return os.path.lexists(path)


def write_file(path: str, text: str) -> None:
    with open(path, "w") as file:
        file.write(text)


def read_file(path: str) -> str:
    with open(path) as file:
        return file.read()


def leave_a_stale_socket(path: str) -> None:
    """A socket file whose server is gone: bound and listened on, then
    closed without removing the file."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen()
    sock.close()


# ---------------------------------------------------------- one server, two


async def test_serve_unix_in_a_nursery(unix_path: str) -> None:
    async with trio.open_nursery() as nursery:
        server: trionet.Server = await nursery.start(
            partial(trionet.serve_unix, echo, unix_path, framing=LINES)
        )
        assert server.path == unix_path
        assert server.port is None
        assert server.addresses == [unix_path]
        assert stat.S_ISSOCK(os.lstat(unix_path).st_mode)
        async with trionet.connect_unix(unix_path, framing=LINES) as conn:
            await conn.send("ping")
            assert await conn.receive() == b"ping"
            # The same fast transport as TCP (TCP_NODELAY is not tried here).
            assert isinstance(conn._transport, SocketTransport)
            assert conn.remote_address == unix_path
        await server.aclose()
    assert not exists(unix_path)  # removed at shutdown
    stats = server.statistics()
    assert stats.accepted == 1
    assert stats.closed == {CloseReason.CLOSED_BY_PEER: 1}
    assert stats.bytes_received == stats.bytes_sent == len(b"ping\n")


async def test_the_same_options_and_shutdown_as_tcp(unix_path: str) -> None:
    # max_connections, idle_timeout, on_connect/on_close, the grace period
    # and the shutdown's close reason all come from the one Server.
    events: list[str] = []
    release = trio.Event()

    async def hold(conn: trionet.Connection) -> None:
        await conn.send("hello")
        await release.wait()
        await trio.sleep_forever()

    async with trionet.open_unix_server(
        hold,
        unix_path,
        framing=LINES,
        max_connections=1,
        grace_period=0,
        on_connect=lambda conn: events.append("connect"),
        on_close=lambda conn: events.append(f"close {conn.close_reason.name}"),
    ) as server:
        first = await trionet.connect_unix(unix_path, framing=LINES)
        assert await first.receive() == b"hello"
        # At the limit the second client waits in the backlog.
        second = await trionet.connect_unix(unix_path, framing=LINES)
        await trio.testing.wait_all_tasks_blocked()
        assert server.statistics().open == 1
        await server.aclose()
        # The listener and its file are gone at once; the waiting client
        # was never admitted.
        assert not exists(unix_path)
        with pytest.raises(trionet.ConnectionClosed):
            await first.receive()
        await first.aclose()
        await second.aclose()
    assert events == ["connect", "close SHUTDOWN"]
    assert server.statistics().closed == {CloseReason.SHUTDOWN: 1}


async def test_tls_over_a_unix_socket(
    unix_path: str, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    async with trionet.open_unix_server(
        echo, unix_path, framing=LINES, ssl_context=server_context
    ):
        with pytest.raises(ValueError, match="server_hostname"):
            await trionet.connect_unix(
                unix_path, framing=LINES, ssl_context=client_context
            )
        async with trionet.connect_unix(
            unix_path,
            framing=LINES,
            ssl_context=client_context,
            server_hostname="localhost",
        ) as conn:
            await conn.send("secret")
            assert await conn.receive() == b"secret"
            assert conn.peer_credentials is not None  # (the socket underneath)


async def test_connect_unix_failures_are_connect_errors(unix_path: str) -> None:
    with pytest.raises(ConnectError) as info:
        await trionet.connect_unix(unix_path)
    assert info.value.reason is CloseReason.ERROR
    assert f"cannot connect to {unix_path}: No such file or directory" in str(
        info.value
    )
    leave_a_stale_socket(unix_path)
    with pytest.raises(ConnectError, match="Connection refused"):
        await trionet.connect_unix(unix_path)


async def test_channels_over_a_unix_socket(unix_path: str) -> None:
    async def handler(cc: trionet.channels.ChannelConnection) -> None:
        async for channel, data in cc:
            await cc.publish(channel, b"re: " + data)

    async with trionet.channels.open_unix_channel_server(handler, unix_path) as server:
        assert server.path == unix_path
        assert server.port is None
        async with trionet.channels.connect_unix_channels(unix_path) as cc:
            await cc.publish("news", "hello")
            assert await cc.receive("news") == b"re: hello"
            await server.publish("all", "to everyone")
            assert await cc.receive("all") == b"to everyone"
    assert not exists(unix_path)


# ------------------------------------------------------------ the socket file


@pytest.mark.parametrize("mode", [0o600, 0o660, 0o666])
async def test_the_socket_file_gets_exactly_its_mode(unix_path: str, mode: int) -> None:
    old = os.umask(0o077)  # a umask that would take group and other bits away
    try:
        async with trionet.open_unix_server(echo, unix_path, mode=mode):
            assert stat.S_IMODE(os.lstat(unix_path).st_mode) == mode
    finally:
        os.umask(old)


async def test_the_socket_file_is_never_more_open_than_its_mode(
    unix_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Between bind() and the final chmod the file exists with whatever bits
    # bind gave it: look at them there, under the most permissive umask.
    modes_at_bind: list[int] = []
    chmod = os.chmod

    def watching_chmod(path: str, mode: int) -> None:
        modes_at_bind.append(stat.S_IMODE(os.lstat(path).st_mode))
        chmod(path, mode)

    monkeypatch.setattr(trionet._listeners.os, "chmod", watching_chmod)
    old = os.umask(0)
    try:
        async with trionet.open_unix_server(echo, unix_path, mode=0o640):
            pass
    finally:
        os.umask(old)
    assert modes_at_bind
    assert modes_at_bind[0] & ~0o640 == 0


async def test_the_default_mode_lets_only_this_user_in(unix_path: str) -> None:
    async with trionet.open_unix_server(echo, unix_path):
        assert stat.S_IMODE(os.lstat(unix_path).st_mode) == 0o600


async def test_a_stale_socket_file_is_replaced(unix_path: str) -> None:
    leave_a_stale_socket(unix_path)
    with pytest.raises(ConnectError, match="refused"):
        await trionet.connect_unix(unix_path)  # nobody listens on it
    async with trionet.open_unix_server(echo, unix_path, framing=LINES):
        async with trionet.connect_unix(unix_path, framing=LINES) as conn:
            await conn.send("new server")
            assert await conn.receive() == b"new server"


async def test_a_live_servers_path_is_never_taken(unix_path: str) -> None:
    async with trionet.open_unix_server(echo, unix_path, framing=LINES) as first:
        inode = os.lstat(unix_path).st_ino
        with pytest.raises(OSError, match="in use") as info:
            async with trionet.open_unix_server(echo, unix_path):
                pass  # pragma: no cover - must not be reached
        assert info.value.errno == errno.EADDRINUSE
        # The first server still has its file, and still serves.
        assert os.lstat(unix_path).st_ino == inode
        async with trionet.connect_unix(unix_path, framing=LINES) as conn:
            await conn.send("still here")
            assert await conn.receive() == b"still here"
    # The probe that found it alive was an (accepted, at once ended) client.
    assert first.statistics().accepted == 2


async def test_a_file_that_is_not_a_socket_is_left_alone(unix_path: str) -> None:
    write_file(unix_path, "precious")
    with pytest.raises(OSError, match="not a socket") as info:
        async with trionet.open_unix_server(echo, unix_path):
            pass  # pragma: no cover - must not be reached
    assert info.value.errno == errno.EEXIST
    assert read_file(unix_path) == "precious"


async def test_a_replaced_file_survives_the_old_servers_shutdown(
    unix_path: str,
) -> None:
    first_done = trio.Event()
    async with trio.open_nursery() as nursery:
        first: trionet.Server = await nursery.start(
            partial(trionet.serve_unix, echo, unix_path)
        )
        os.unlink(unix_path)  # the path is taken over by a newer server
        newer: trionet.Server = await nursery.start(
            partial(trionet.serve_unix, echo, unix_path, framing=LINES)
        )
        inode = os.lstat(unix_path).st_ino
        await first.aclose()
        first_done.set()
        # The newer server's file is still there, and works.
        assert os.lstat(unix_path).st_ino == inode
        async with trionet.connect_unix(unix_path, framing=LINES) as conn:
            await conn.send("newer")
            assert await conn.receive() == b"newer"
        await newer.aclose()
    assert first_done.is_set()
    assert not exists(unix_path)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"reuse_port": True}, "reuse_port does not apply"),
        ({"mode": 0o1777}, "mode must be"),
        ({"mode": True}, "mode must be"),
    ],
)
async def test_bad_unix_server_arguments(
    unix_path: str, options: dict[str, object], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        async with trionet.open_unix_server(echo, unix_path, **options):  # type: ignore[arg-type]
            pass  # pragma: no cover - must not be reached
    assert not exists(unix_path)


async def test_an_abstract_or_empty_path_is_refused() -> None:
    for path in ["", "\0abstract"]:
        with pytest.raises(ValueError, match="path must name a file"):
            async with trionet.open_unix_server(echo, path):
                pass  # pragma: no cover - must not be reached


# ---------------------------------------------------------- peer credentials


async def test_peer_credentials_on_both_ends(unix_path: str) -> None:
    seen: list[PeerCredentials | None] = []
    filtered: list[object] = []

    async def handler(conn: trionet.Connection) -> None:
        seen.append(conn.peer_credentials)
        await conn.send("hi")

    def accept(who: object) -> bool:
        filtered.append(who)
        return True

    mine = PeerCredentials(os.getpid(), os.geteuid(), os.getegid())
    async with trionet.open_unix_server(
        handler, unix_path, framing=LINES, accept=accept
    ):
        async with trionet.connect_unix(unix_path, framing=LINES) as conn:
            assert await conn.receive() == b"hi"
            assert conn.peer_credentials == mine  # the server is this process
    assert seen == [mine]
    assert filtered == [mine]  # the accept filter gets the credentials
    assert isinstance(filtered[0], PeerCredentials)
    assert (filtered[0].pid, filtered[0].uid, filtered[0].gid) == tuple(mine)


async def test_no_peer_credentials_over_tcp_or_memory() -> None:
    async with trionet.open_tcp_server(echo, host="127.0.0.1") as server:
        async with trionet.connect_tcp("127.0.0.1", server.port) as conn:
            assert conn.peer_credentials is None
    async with trionet.testing.connection_pair() as (a, b):
        assert a.peer_credentials is None
        assert b.peer_credentials is None


@pytest.fixture
def shared_dir() -> Iterator[str]:
    """A directory another user may enter (the socket's mode decides)."""
    directory = tempfile.mkdtemp(prefix="trionet-")
    os.chmod(directory, 0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def connect_as_nobody(path: str) -> subprocess.CompletedProcess[str]:
    """A child process running as the user 'nobody' connects to ``path`` and
    prints what it reads ("closed" for nothing), or the connect error's
    errno name."""
    code = (
        "import errno, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        "    s.connect(sys.argv[1])\n"
        "except OSError as e:\n"
        "    print(errno.errorcode[e.errno]); sys.exit(0)\n"
        "try:\n"
        "    reply = s.recv(100)\n"
        "except ConnectionResetError:\n"
        "    reply = b''\n"
        "print(reply.decode().strip() or 'closed')\n"
    )
    return subprocess.run(
        [OTHER_PYTHON, "-c", code, path],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


#: A Python the user 'nobody' can run (a venv's may live where it cannot).
OTHER_PYTHON = "/usr/bin/python3"


def _can_run_as_nobody() -> bool:
    if not IS_ROOT or not sys.platform.startswith("linux"):
        return False
    try:
        result = subprocess.run(
            [OTHER_PYTHON, "-c", "pass"],
            user=NOBODY,
            group=NOBODY,
            extra_groups=[],
            capture_output=True,
            timeout=30,
            check=False,
        )
    except OSError:
        return False
    return result.returncode == 0


needs_root = pytest.mark.skipif(
    not _can_run_as_nobody(),
    reason="runs a client as another user (needs root, Linux, /usr/bin/python3)",
)


@needs_root
@pytest.mark.parametrize(("mode", "expected"), [(0o600, "EACCES"), (0o666, "hi")])
async def test_the_mode_decides_who_may_connect(
    shared_dir: str, mode: int, expected: str
) -> None:
    path = os.path.join(shared_dir, "s.sock")

    async def greet(conn: trionet.Connection) -> None:
        await conn.send("hi")

    async with trionet.open_unix_server(greet, path, framing=LINES, mode=mode):
        result = await trio.to_thread.run_sync(connect_as_nobody, path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


@needs_root
async def test_an_accept_filter_can_refuse_other_users(shared_dir: str) -> None:
    path = os.path.join(shared_dir, "s.sock")
    seen: list[PeerCredentials] = []

    def only_my_user(who: PeerCredentials) -> bool:
        seen.append(who)
        return who.uid == os.geteuid()

    async def greet(conn: trionet.Connection) -> None:
        await conn.send("hi")

    async with trionet.open_unix_server(
        greet, path, framing=LINES, mode=0o666, accept=only_my_user
    ) as server:
        result = await trio.to_thread.run_sync(connect_as_nobody, path)
        async with trionet.connect_unix(path, framing=LINES) as conn:
            assert await conn.receive() == b"hi"  # this user is let in
    assert result.stdout.strip() == "closed", result.stderr
    assert [who.uid for who in seen] == [NOBODY, os.geteuid()]
    assert seen[0].gid == NOBODY
    assert seen[0].pid not in (0, os.getpid())  # the child's own pid
    stats = server.statistics()
    assert stats.rejected == 1
    assert stats.closed[CloseReason.REJECTED] == 1
