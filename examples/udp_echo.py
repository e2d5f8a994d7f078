"""A UDP echo server and a client, in one process.

Run it with ``python examples/udp_echo.py``; it starts an echo server on
127.0.0.1 (a free port), sends a few datagrams from a client endpoint, prints
the echoes and exits.  ``--selftest`` also checks every echo and exits with
status 1 if one is wrong.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import trio

import trionet

MESSAGES = [b"hello", b"datagrams", b"over", b"loopback"]


async def echo(peer: trionet.UdpPeer) -> None:
    """Send every datagram back to the peer that sent it."""
    async for data in peer:
        await peer.send(data)


async def main(selftest: bool) -> int:
    async with trio.open_nursery() as nursery:
        # host="127.0.0.1": loopback only (the default, None, is every interface).
        serve = partial(trionet.serve_udp, host="127.0.0.1")
        server: trionet.UdpServer = await nursery.start(serve, echo, 0)
        print(f"echo server on 127.0.0.1:{server.port}")
        failures = 0
        async with trionet.open_udp(remote=("127.0.0.1", server.port)) as client:
            for message in MESSAGES:
                await client.send(message)
                with trio.fail_after(5):
                    reply = await client.receive()
                print(f"sent {message!r}, got {reply!r}")
                if reply != message:
                    failures += 1
        print(f"server statistics: {server.statistics()}")
        # The echo handler waits for datagrams until its peer times out, so
        # there is nothing to give it a grace period for: close at once.
        await server.aclose(grace_period=0)
    if selftest:
        print("selftest", "failed" if failures else "passed")
        return 1 if failures else 0
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--selftest", action="store_true", help="check the echoes")
    args = parser.parse_args()
    sys.exit(trio.run(main, args.selftest))
