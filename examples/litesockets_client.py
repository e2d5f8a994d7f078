"""A TCP client that sends a request and prints the reply (litesockets' client).

litesockets' README connects a ``TcpClient`` to www.google.com:80, sends an
HTTP request with ``addWrite`` and prints what its reader callback gets.  No
outside network is used here, so this script starts a small HTTP/1.1 server
on 127.0.0.1 first and plays www.google.com's part with it.

The client reads the reply the way HTTP is built: the status line and the
headers as lines ending in ``\\r\\n``, then exactly ``Content-Length`` bytes of
body.  Both modes read the same connection, one after the other.

Run it with ``python examples/litesockets_client.py``; it ends by itself.
With ``--selftest`` it also checks the reply and exits non-zero if it is
wrong.

litesockets                        trionet
---------------------------------  ---------------------------------------------
SocketExecuter()                   trio.run(main): one task per connection
TcpClient(host, port).connect()    async with trionet.connect_tcp(host, port)
SE.addClient(client)               (nothing: the connection is ready to use)
client.addWrite(data)              await conn.send_all(data)
client.reader = onRead             await conn.receive_line() / receive_exactly(n)
                                   / receive_some(), or ``async for`` in a task
time.sleep(5)                      the ``async with`` block ends when done
"""

from __future__ import annotations

import sys

import trio

import trionet

#: HTTP separates lines with CRLF.
HTTP_LINES = trionet.Lines(delimiter=b"\r\n", max_length=8192)

PAGE = b"<html><body><h1>Hello from trionet</h1></body></html>\n"


def check(condition: bool, what: str) -> None:
    """Fail the self-test (even under ``python -O``) when ``condition`` is false."""
    if not condition:
        raise AssertionError(what)


async def read_head(conn: trionet.Connection) -> tuple[bytes, dict[bytes, bytes]]:
    """Read a start line and the header lines up to the empty line."""
    start = await conn.receive_line()
    headers: dict[bytes, bytes] = {}
    while line := await conn.receive_line():
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return start, headers


async def web_server(conn: trionet.Connection) -> None:
    """The stand-in for www.google.com: answers every GET with one page."""
    # ``async with conn`` is not needed: the server closes the connection
    # when this handler returns.
    while True:
        try:
            request, headers = await read_head(conn)
        except trionet.ConnectionClosed:
            return  # the client went away between requests
        print(f"  server got: {request.decode()!r} from {headers[b'user-agent']!r}")
        await conn.send_all(
            b"HTTP/1.1 200 OK\r\n"
            b"Content-Type: text/html\r\n"
            b"Content-Length: %d\r\n"
            b"\r\n" % len(PAGE) + PAGE
        )


async def main(selftest: bool) -> None:
    async with trionet.open_tcp_server(
        web_server, framing=HTTP_LINES, host="127.0.0.1"
    ) as server:
        host, port = "127.0.0.1", server.port
        print(f"web server on {host}:{port}")

        # The client itself: connect, write the request, read the reply.
        with trio.fail_after(10):
            async with trionet.connect_tcp(host, port, framing=HTTP_LINES) as conn:
                await conn.send_all(
                    b"GET / HTTP/1.1\r\n"
                    b"User-Agent: curl/X.XX.0\r\n"
                    b"Host: %s:%d\r\n"
                    b"Accept: */*\r\n"
                    b"\r\n" % (host.encode(), port)
                )
                status, headers = await read_head(conn)
                body = await conn.receive_exactly(int(headers[b"content-length"]))

        print(f"client got: {status.decode()!r}")
        for name, value in headers.items():
            print(f"  {name.decode()}: {value.decode()}")
        print(f"  body: {body.decode().strip()}")
        print(f"client closed: {conn.close_reason}")

    if selftest:
        check(status == b"HTTP/1.1 200 OK", f"status line {status!r}")
        check(headers[b"content-type"] == b"text/html", f"headers {headers!r}")
        check(body == PAGE, f"body {body!r}")
        check(
            conn.close_reason is trionet.CloseReason.CLOSED_BY_HOST,
            f"client close reason {conn.close_reason!r}",
        )
        closed = server.statistics().closed
        check(
            closed == {trionet.CloseReason.CLOSED_BY_PEER: 1},
            f"server close reasons {closed!r}",
        )
        print("selftest passed")


if __name__ == "__main__":
    trio.run(main, "--selftest" in sys.argv[1:])
