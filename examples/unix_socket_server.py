"""A local service on a UNIX domain socket that knows who its clients are.

``trionet.serve_unix`` / ``open_unix_server`` are the TCP server on a socket
file: the same options, receive modes, statistics and shutdown.  The file is
made with the permission bits ``mode`` (default 0o600: only this user may
connect), a file left behind by a dead server is replaced, a live server's
path is never taken, and the file is removed when the server stops.  Each
connection knows the process, user and group at the other end
(``conn.peer_credentials``, Linux), and the ``accept`` filter gets them, so
a server can refuse other users.

The demo

1. leaves a stale socket file at the path (as a crashed server would) and
   starts a server there anyway: the file is replaced;
2. connects a client, which the server greets with the client's own pid and
   uid, and shows the file's mode;
3. tries to start a second server on the same path: refused (EADDRINUSE),
   and the first one goes on serving.  (The second server finds out by
   connecting, so the first one sees a client that leaves at once.)
4. stops the server: the file is gone.

The accept filter admits only this user (any other user is refused before
its handler runs).  Run it with ``python examples/unix_socket_server.py``;
it ends by itself.  With ``--selftest`` it also checks every result and
exits non-zero if one is wrong.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import sys
import tempfile

import trio

import trionet

LINES = trionet.Lines()


def check(condition: bool, what: str) -> None:
    """Fail the self-test (even under ``python -O``) when ``condition`` is false."""
    if not condition:
        raise AssertionError(what)


def only_this_user(who: trionet.PeerCredentials) -> bool:
    """The accept filter: on a UNIX socket it gets the client's credentials."""
    admitted = who.uid == os.geteuid()
    print(f"  accept pid={who.pid} uid={who.uid} gid={who.gid} -> {admitted}")
    return admitted


async def greet(conn: trionet.Connection) -> None:
    who = conn.peer_credentials
    assert who is not None  # (on Linux; None where the system does not say)
    await conn.send(f"hello, process {who.pid} of user {who.uid}")
    async for line in conn:
        await conn.send(b"echo: " + line)


def leave_a_stale_socket(path: str) -> None:
    """What a crashed server leaves behind: a socket file nobody listens on."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.close()


def file_mode(path: str) -> int | None:
    try:
        return stat.S_IMODE(os.lstat(path).st_mode)
    except FileNotFoundError:
        return None


async def main(selftest: bool) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "greeter.sock")
        leave_a_stale_socket(path)
        print(f"a stale socket file at {path}; starting a server there")
        async with trionet.open_unix_server(
            greet, path, framing=LINES, accept=only_this_user
        ) as server:
            mode = file_mode(path)
            print(f"server on {server.path} (port {server.port}), mode {mode:o}")
            async with trionet.connect_unix(path, framing=LINES) as conn:
                greeting = await conn.receive()
                await conn.send("hi")
                echo = await conn.receive()
                print(f"  client got {greeting!r} and {echo!r}")
                print(f"  the server runs as {conn.peer_credentials}")
                server_side = conn.peer_credentials

            print("a second server on the same path:")
            try:
                async with trionet.open_unix_server(greet, path):
                    second_error = None  # pragma: no cover - must not happen
            except OSError as exc:
                second_error = exc
                print(f"  refused: {exc}")
            async with trionet.connect_unix(path, framing=LINES) as conn:
                still = await conn.receive()
                print(f"  the first server still answers: {still!r}")
        stats = server.statistics()
        left = file_mode(path)
        print(
            f"server stopped; the socket file is {'gone' if left is None else 'left'}"
        )
        print(f"server stats: {stats}")

    if selftest:
        me = os.getpid()
        check(mode == 0o600, f"mode {mode:o}")
        check(greeting == f"hello, process {me} of user {os.geteuid()}".encode(), "")
        check(echo == b"echo: hi", f"echo {echo!r}")
        check(server_side is not None and server_side.pid == me, f"{server_side}")
        check(
            isinstance(second_error, OSError)
            and second_error.errno == errno.EADDRINUSE,
            f"second server: {second_error!r}",
        )
        check(still.startswith(b"hello, process"), f"still {still!r}")
        check(left is None, "the socket file was removed")
        # Two clients, and the second server's check that someone listens
        # here: a connection that ends at once.
        check(stats.accepted == 3, f"accepted {stats.accepted}")
        check(stats.rejected == 0, f"rejected {stats.rejected}")
        print("selftest passed")


if __name__ == "__main__":
    trio.run(main, "--selftest" in sys.argv[1:])
