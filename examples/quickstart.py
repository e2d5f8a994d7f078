"""The README's demo: an echo server and a client talking over loopback.

Run it with ``python examples/quickstart.py``; ``--selftest`` also checks the
replies and exits non-zero if one is wrong.
"""

from __future__ import annotations

import sys

import trio

import trionet


async def echo(conn: trionet.Connection) -> None:
    # One task per connection; the loop ends when the client closes.
    async for line in conn:
        await conn.send(b"echo: " + line)


async def main(selftest: bool) -> None:
    lines = trionet.Lines()
    async with trionet.open_tcp_server(echo, framing=lines, host="127.0.0.1") as server:
        print(f"server listening on 127.0.0.1:{server.port}")
        async with trionet.connect_tcp("127.0.0.1", server.port, framing=lines) as conn:
            for text in ["hello", "trionet", "goodbye"]:
                await conn.send(text)
                reply = await conn.receive()
                print(f"client sent {text!r}, got {reply.decode()!r}")
                if selftest:
                    assert reply == b"echo: " + text.encode(), reply
        print(f"client closed: {conn.close_reason}")
    print(f"server stats: {server.statistics()}")
    if selftest:
        assert server.statistics().closed == {trionet.CloseReason.CLOSED_BY_PEER: 1}


if __name__ == "__main__":
    trio.run(main, "--selftest" in sys.argv[1:])
