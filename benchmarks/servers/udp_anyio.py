"""anyio UDP echo server, on trio or asyncio.

    python udp_anyio.py datagrams --backend trio|asyncio

``async for data, (host, port) in udp: await udp.sendto(data, host, port)``.
"""

from __future__ import annotations

import socket

import _common
import anyio
from anyio.abc import SocketAttribute


async def main() -> None:
    async with await anyio.create_udp_socket(
        socket.AF_INET, local_host="127.0.0.1"
    ) as udp:
        raw = udp.extra(SocketAttribute.raw_socket)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _common.UDP_RCVBUF)
        _common.announce(udp.extra(SocketAttribute.local_port))
        async for data, (host, port) in udp:
            await udp.sendto(data, host, port)


if __name__ == "__main__":
    backend = _common.pop_option("--backend", "trio")
    _common.setup(__doc__ or "", ("datagrams",))
    anyio.run(main, backend=backend)
