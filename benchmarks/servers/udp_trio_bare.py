"""Bare trio UDP echo server: the baseline, a recvfrom/sendto loop.

    python udp_trio_bare.py datagrams

One task on one trio socket: ``await sock.recvfrom()``, then
``await sock.sendto(data, address)``, for ever.
"""

from __future__ import annotations

import _common
import trio


async def main() -> None:
    sock = trio.socket.from_stdlib_socket(_common.udp_socket())
    _common.announce(sock.getsockname()[1])
    while True:
        data, address = await sock.recvfrom(_common.UDP_MAX)
        await sock.sendto(data, address)


if __name__ == "__main__":
    _common.setup(__doc__ or "", ("datagrams",))
    trio.run(main)
