"""asyncio UDP echo server: a DatagramProtocol (optionally on uvloop).

    python udp_asyncio.py datagrams [--uvloop]

``datagram_received`` answers with ``transport.sendto(data, address)``.
"""

from __future__ import annotations

import asyncio
import sys

import _common


class Echo(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(data, addr)


async def main() -> None:
    loop = asyncio.get_running_loop()
    sock = _common.udp_socket()
    _common.announce(sock.getsockname()[1])
    transport, _ = await loop.create_datagram_endpoint(Echo, sock=sock)
    try:
        await asyncio.Event().wait()
    finally:
        transport.close()


if __name__ == "__main__":
    use_uvloop = "--uvloop" in sys.argv
    if use_uvloop:
        sys.argv.remove("--uvloop")
    _common.setup(__doc__ or "", ("datagrams",))
    if use_uvloop:
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())
