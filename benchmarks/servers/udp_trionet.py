"""trionet UDP echo servers: serve_udp with a handler per peer, or one
open_udp endpoint in a loop.

    python udp_trionet.py datagrams --api serve|loop

``serve``: :func:`trionet.serve_udp`, handler ``async for data in peer:
await peer.send(data)`` (one task per peer, in order; the default options,
so a 60-second idle timeout).  ``loop``: one :func:`trionet.open_udp`
endpoint, ``async for data, address in endpoint: await
endpoint.send_to(data, address)``.  Both with ``so_rcvbuf``.
"""

from __future__ import annotations

import functools

import _common
import trio

import trionet


async def echo(peer: trionet.UdpPeer) -> None:
    async for data in peer:
        await peer.send(data)


async def serve() -> None:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            functools.partial(
                trionet.serve_udp,
                echo,
                0,
                host="127.0.0.1",
                so_rcvbuf=_common.UDP_RCVBUF,
            )
        )
        _common.announce(server.port)


async def loop() -> None:
    async with trionet.open_udp(
        local_host="127.0.0.1", so_rcvbuf=_common.UDP_RCVBUF
    ) as endpoint:
        _common.announce(endpoint.local_address[1])
        async for data, address in endpoint:
            await endpoint.send_to(data, address)


if __name__ == "__main__":
    api = _common.pop_option("--api", "serve")
    _common.setup(__doc__ or "", ("datagrams",))
    trio.run(serve if api == "serve" else loop)
